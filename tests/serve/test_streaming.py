"""Streaming through a byte-level tokenizer (one token per UTF-8 byte, as byte-level BPE splits
rare characters): a multi-byte character reaches the client whole, never as U+FFFD halves, so
the concatenated deltas equal the text of the same request answered at once; the sampling
fields (top_k, top_p, min_p, seed) give the same tokens streamed or not, and n samples stream
under their own indices."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serve.helpers import ChatTokenizer

NEW = 160


def stream(url: str, body: dict) -> tuple[dict[int, list[str]], dict[int, list[int]], dict]:
    """Per choice index: its text deltas and token ids; and the final usage."""
    deltas: dict[int, list[str]] = {}
    ids: dict[int, list[int]] = {}
    usage = None
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            usage = ev.get("usage") or usage
            for c in ev["choices"]:
                deltas.setdefault(c["index"], []).append(c["text"])
                ids.setdefault(c["index"], []).extend(c.get("token_ids") or [])
    return deltas, ids, usage


@pytest.mark.parametrize(
    "sampling", [dict(top_k=40, min_p=0.02), dict(top_p=0.95)], ids=["top_k+min_p", "top_p"]
)
def test_multibyte_characters_stream_whole_and_equal_the_full_answer(tiny_url, sampling):
    url = tiny_url
    body = {
        "model": "tiny",
        "prompt": "Grüße, 世界: ",
        "max_tokens": NEW,
        "ignore_eos": True,
        "temperature": 1.0,
        "seed": 3,
        "n": 2,
        "return_token_ids": True,
        **sampling,
    }
    full = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
    deltas, ids, usage = stream(url, body)
    assert usage["completion_tokens"] == 2 * NEW
    assert sorted(deltas) == [0, 1]
    multibyte = 0
    for c in full["choices"]:
        i = c["index"]
        assert ids[i] == c["token_ids"] and len(c["token_ids"]) == NEW  # same seed, same tokens
        text = ChatTokenizer().decode(c["token_ids"])
        assert c["text"] == text
        assert "".join(deltas[i]) == text, "a delta split a character"
        assert len(deltas[i]) > 10  # streamed in many pieces
        multibyte += sum(len(ch.encode()) > 1 and ch != "\ufffd" for ch in text)
    # the random model's bytes did form multi-byte characters (else the test proves nothing)
    assert multibyte >= 2
    assert full["choices"][0]["token_ids"] != full["choices"][1]["token_ids"]
