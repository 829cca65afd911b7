"""Incremental detokenization: multi-byte characters are never split across deltas, stop strings
are cut (the earliest wins) and no delta ever shows the start of one."""

from __future__ import annotations

from jaxturbo.inference.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from tests.inference.engine.models import ByteTokenizer

TEXT = "héllo €uro 😀 naïve"


def stream(text: str, stop=(), prompt: str = "Q: ") -> tuple[list[str], IncrementalDetokenizer]:
    tok = ByteTokenizer()
    d = IncrementalDetokenizer(tok, tok.encode(prompt), stop)
    ids = tok.encode(text)
    deltas = [d.push([t], final=i == len(ids) - 1) for i, t in enumerate(ids)]
    return deltas, d


def test_multibyte_characters_are_never_split():
    deltas, d = stream(TEXT)
    assert "".join(deltas) == TEXT and d.text == TEXT
    assert all(REPLACEMENT_CHAR not in x for x in deltas)
    # the 4-byte emoji arrives in one delta, after its last byte
    assert "😀" in deltas
    assert len(TEXT.encode()) > len(TEXT)  # the text does hold multi-byte characters


def test_stop_string_is_cut_and_never_partly_streamed():
    deltas, d = stream("abc STOP def", stop=["STOP"])
    assert "".join(deltas) == "abc " and d.stopped
    assert not any("S" in x for x in deltas)
    assert d.push([ord("x")]) == ""  # nothing after the stop


def test_earliest_stop_string_wins_and_holdback_flushes_at_the_end():
    deltas, d = stream("ab cdef", stop=["def", "b c"])
    assert "".join(deltas) == "a" and d.stopped
    deltas, d = stream("abcdef", stop=["xyz"])
    assert "".join(deltas) == "abcdef" and not d.stopped
    assert deltas[-1] == "def"  # the last 2 characters were held back until the end
