"""Incremental detokenization and stop strings (plain Python; any tokenizer with `decode`).

A token can end in the middle of a multi-byte character (byte-level BPE): decoding it alone
gives U+FFFD.  `IncrementalDetokenizer` decodes a short window of tokens before the new ones and
emits text only once it no longer ends in U+FFFD, so a character is never split across deltas.
Stop strings are searched in the decoded text; the text streamed so far always stops short of
a possible stop-string start (the last len(longest stop) - 1 characters are held back).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
PREFIX_WINDOW = 5  # tokens decoded before the new ones, so leading spaces decode in context


class IncrementalDetokenizer:
    """Text of a growing token sequence, one delta at a time.

    prompt_ids: the prompt (its last tokens give the first output token its context);
    stop: strings that end the output (the output is cut before the first one found).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = list(prompt_ids)
        self.read_offset = len(self.tokens)
        self.prefix_offset = max(0, self.read_offset - PREFIX_WINDOW)
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # the output's text decoded so far (complete characters)
        self.emitted = 0  # characters of `text` already returned
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: Sequence[int], final: bool = False) -> str:
        """Add generated tokens; return the text that became final (no split character, no
        possible stop-string start).  final: the sequence ended, flush everything held back.
        After a stop string is found, `stopped` is set and later calls return ""."""
        if self.stopped:
            return ""
        self.tokens.extend(token_ids)
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) > len(prefix) and (final or not full.endswith(REPLACEMENT_CHAR)):
            # the window's text can change before its end when a token merges with it; only
            # what follows the previous read position is new
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        # the text emitted so far holds no stop-string start (see `hold`), so search after it;
        # cutting at each hit keeps the earliest one
        for s in self.stop:
            at = self.text.find(s, self.emitted)
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True
        end = len(self.text) if final or self.stopped else len(self.text) - self.hold
        if end <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted : end], end
        return delta
