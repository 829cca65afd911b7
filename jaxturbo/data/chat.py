"""Prompts -> token ids, plain or through the model's chat template, and the ids a turn ends at.

    ids = encode_prompt(tokenizer, "What is 2+3?", chat=True)   # user turn + assistant header
    stops = stop_ids_for(cfg, tokenizer)                         # eos + end-of-turn tokens

The tokenizer is a transformers tokenizer (`encode`, `apply_chat_template`, `eos_token_id`,
`convert_tokens_to_ids`).  A chat prompt is rendered to text by the template and then encoded
without special tokens: the template writes its own (what `apply_chat_template(tokenize=True)`
does too), so these are the ids the model saw in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jaxturbo.errors import UserError

# end-of-turn markers of the chat templates in use (ChatML, Llama 3, GPT-style)
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_chat(
    tokenizer: Any, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of a conversation rendered by the tokenizer's chat template (with the
    assistant header after it when `add_generation_prompt`)."""
    if not has_chat_template(tokenizer):
        raise UserError("this model's tokenizer has no chat template; use plain prompts")
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_prompt(
    tokenizer: Any, text: str, *, chat: bool, system: str | None = None, special_tokens: bool = True
) -> list[int]:
    """Token ids of one prompt.  chat: `text` as a user turn (after an optional system turn)
    plus the assistant header.  Plain: the text itself, with the tokenizer's special tokens
    (e.g. BOS) when `special_tokens`."""
    if chat:
        turns = [{"role": "system", "content": system}] if system is not None else []
        return encode_chat(tokenizer, turns + [{"role": "user", "content": text}])
    return list(tokenizer.encode(text, add_special_tokens=special_tokens))


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    """`encode_prompt` of each prompt (plain prompts with special tokens)."""
    return [encode_prompt(tokenizer, text, chat=chat) for text in prompts]


def stop_ids_for(cfg: Any, tokenizer: Any) -> list[int]:
    """The ids that end a generated turn: the model config's eos ids, the tokenizer's eos and
    whichever END_OF_TURN_TOKENS the vocabulary has.  cfg: anything with `eos_token_id`
    (a list of ids)."""
    ids = set(cfg.eos_token_id)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for special in END_OF_TURN_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    return sorted(ids)
