"""Records -> token ids and a per-token training mask.

The tokenizer is a transformers tokenizer (or anything with `encode(text,
add_special_tokens=False)`, `eos_token_id` and, for chats, `apply_chat_template(messages,
tokenize=False, add_generation_prompt=...)`).

Chats are rendered with the model's own template, turn by turn: each turn's text is the
difference between the rendering of the conversation up to it and up to the turn before, so the
tokens are the ones the model sees at inference; an assistant turn is split into its header
(what `add_generation_prompt=True` adds, not trained) and its content plus end-of-turn marker
(trained: the model learns to answer and to stop).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxturbo.data.records import Record
from jaxturbo.errors import UserError


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _chat_pieces(tokenizer: Any, messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, trained) pieces whose concatenation is the rendered conversation."""

    def render(msgs: list[dict], gen: bool = False) -> str:
        return (
            tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            if msgs
            else ""
        )

    pieces: list[tuple[str, bool]] = []
    before = ""
    for i, m in enumerate(messages):
        upto = render(messages[: i + 1])
        if not upto.startswith(before):
            raise UserError(
                "the tokenizer's chat template re-renders earlier turns differently "
                "when a turn is added; cannot tell which tokens are the assistant's"
            )
        if m["role"] == "assistant":
            header = render(messages[:i], gen=True) if i else ""
            if not (header.startswith(before) and upto.startswith(header)):
                raise UserError(
                    "the chat template's generation prompt is not a prefix of the "
                    "assistant turn; cannot mask the prompt"
                )
            pieces += [(header[len(before) :], False), (upto[len(header) :], True)]
        else:
            pieces.append((upto[len(before) :], False))
        before = upto
    return pieces


def tokenize_record(
    record: Record, tokenizer: Any, add_eos: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids [N] int32, trained [N] bool): trained[i] says whether token i is a training target."""
    if "messages" in record:
        if not hasattr(tokenizer, "apply_chat_template") or not getattr(
            tokenizer, "chat_template", True
        ):
            raise UserError("conversation records need a tokenizer with a chat template")
        pieces = _chat_pieces(tokenizer, record["messages"])
        add_eos = False  # the template ends each turn itself
    elif "prompt" in record:
        pieces = [(record["prompt"], False), (record["completion"], True)]
    else:
        pieces = [(record["text"], True)]
    ids: list[int] = []
    trained: list[bool] = []
    for text, tr in pieces:
        toks = _encode(tokenizer, text)
        ids += toks
        trained += [tr] * len(toks)
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None:
        ids.append(int(eos))
        trained.append(True)
    return np.asarray(ids, np.int32), np.asarray(trained, bool)
