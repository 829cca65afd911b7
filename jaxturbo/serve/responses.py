"""OpenAI response bodies: completions, chat completions, their stream chunks, logprobs, usage.

Pure functions over plain values (no server state), so each shape is tested on its own.
Without a tokenizer a token's text is "token_id:<id>" (logprobs) and generated text is empty.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

TopLogprobs = Sequence[tuple[int, float]]
DONE = "data: [DONE]\n\n"


def sse(obj: Any) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token's own text (part of a multi-byte character decodes to U+FFFD, as OpenAI's)."""
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(
    tokenizer: Any,
    ids: Sequence[int],
    logprobs: Sequence[float],
    tops: Sequence[TopLogprobs],
    offset: int = 0,
) -> dict[str, Any]:
    """The legacy completions' logprobs object; text_offset counts from `offset` (the
    characters of the choice's tokens before these)."""
    tokens = [token_text(tokenizer, t) for t in ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": list(logprobs),
        "top_logprobs": [{token_text(tokenizer, i): lp for i, lp in top} for top in tops],
        "text_offset": offsets,
    }


def _chat_token(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    text = token_text(tokenizer, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(
    tokenizer: Any, ids: Sequence[int], logprobs: Sequence[float], tops: Sequence[TopLogprobs]
) -> dict[str, Any]:
    """The chat completions' logprobs object: one entry per token with its top alternatives."""
    return {
        "content": [
            {
                **_chat_token(tokenizer, t, lp),
                "top_logprobs": [_chat_token(tokenizer, i, v) for i, v in top],
            }
            for t, lp, top in zip(ids, logprobs, tops)
        ],
        "refusal": None,
    }


def choice_logprobs(
    kind: str,
    tokenizer: Any,
    ids: Sequence[int],
    logprobs: Sequence[float],
    tops: Sequence[TopLogprobs],
    offset: int = 0,
) -> dict[str, Any]:
    if kind == "chat":
        return chat_logprobs(tokenizer, ids, logprobs, tops)
    return completion_logprobs(tokenizer, ids, logprobs, tops, offset)


def envelope(kind: str, rid: str, created: int, model: str, *, chunk: bool) -> dict[str, Any]:
    """The fields every response / chunk of a request starts with."""
    obj = (
        ("chat.completion.chunk" if chunk else "chat.completion")
        if kind == "chat"
        else "text_completion"
    )
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": None,
    }


def choice(
    kind: str,
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: dict | None,
    *,
    chunk: bool,
    first: bool = False,
    token_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """One choice of a response (chunk=False) or of a stream chunk (chunk=True; first: the
    choice's first chunk, which carries the assistant role in chat)."""
    if kind == "chat":
        if chunk:
            delta: dict[str, Any] = (
                {"role": "assistant", "content": text} if first else {"content": text}
            )
            out: dict[str, Any] = {"index": index, "delta": delta}
        else:
            out = {
                "index": index,
                "message": {"role": "assistant", "content": text, "refusal": None},
            }
    else:
        out = {"index": index, "text": text}
    out["logprobs"] = logprobs
    out["finish_reason"] = finish_reason
    if token_ids is not None:
        out["token_ids"] = list(token_ids)
    return out
