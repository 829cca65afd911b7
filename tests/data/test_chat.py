"""Prompt encoding: a chat prompt is the ids transformers' own `apply_chat_template(tokenize=True)`
gives; plain prompts with or without special tokens; the stop ids of a turn."""

from __future__ import annotations

import pytest

from jaxturbo.data.chat import encode_chat, encode_prompt, encode_prompts, stop_ids_for
from jaxturbo.errors import UserError

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(chat_template: str | None = TEMPLATE):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [
        "<unk>",
        "<s>",
        "</s>",
        "<|im_start|>",
        "<|im_end|>",
        "user",
        "system",
        "assistant",
        "hi",
        "be",
        "brief",
        "\n",
        " ",
    ]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(" ", "isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok._tokenizer.post_processor = None
    if chat_template:
        tok.chat_template = chat_template
    return tok


def test_chat_prompt_is_what_transformers_tokenizes():
    tok = _tokenizer()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    want = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    got = encode_prompt(tok, "hi", chat=True, system="be brief")
    assert got == want == encode_chat(tok, msgs)
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert got.count(im_start) == 3 and got.count(im_end) == 2  # two turns + the header
    assert encode_prompts(tok, ["hi"], chat=True) == [encode_chat(tok, msgs[1:])]


def test_plain_prompts_and_refusal_without_template():
    tok = _tokenizer(chat_template=None)
    ids = tok.encode("hi", add_special_tokens=False)
    assert encode_prompt(tok, "hi", chat=False, special_tokens=False) == ids
    assert encode_prompts(tok, ["hi"], chat=False) == [tok.encode("hi", add_special_tokens=True)]
    with pytest.raises(UserError, match="no chat template"):
        encode_prompt(tok, "hi", chat=True)


def test_stop_ids():
    tok = _tokenizer()

    class Cfg:
        eos_token_id = [1]

    im_end, eos = tok.convert_tokens_to_ids(["<|im_end|>", "</s>"])
    assert stop_ids_for(Cfg, tok) == sorted({1, eos, im_end})
