"""One generation request as the scheduler sees it: token ids, progress, stop rules, status.

Sampling settings live in `Request.sampling`, an opaque object only the model runner reads, so
the scheduler stays independent of how tokens are drawn.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any

from jaxturbo.errors import UserError

MAX_TOKEN_ID = 2**31 - 1  # token ids travel to the device as int32
# An output token sampled on device whose value the host has not read yet (asynchronous
# scheduling): the model runner feeds the device-side value in its place.
PLACEHOLDER_TOKEN = -1


class FinishReason(enum.Enum):
    """Why a request ended (the values are the OpenAI-style strings)."""

    STOP = "stop"  # a stop token id, EOS, or a stop string found by the engine layer
    LENGTH = "length"  # max_tokens generated, or max_model_len reached
    ABORT = "abort"  # aborted by the caller


class RequestStatus(enum.Enum):
    """Life cycle: WAITING -> RUNNING (-> PREEMPTED -> RUNNING)* -> FINISHED_*."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISHED.get(self)

    @staticmethod
    def finished(reason: FinishReason) -> RequestStatus:
        """The terminal status of a finish reason."""
        return _STATUS_OF[reason]


_FINISHED = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}
_STATUS_OF = {reason: status for status, reason in _FINISHED.items()}


def _check_token_ids(name: str, ids: Sequence[int]) -> None:
    if ids and (min(ids) < 0 or max(ids) > MAX_TOKEN_ID):
        bad = next(t for t in ids if not 0 <= t <= MAX_TOKEN_ID)
        raise UserError(f"{name} contains token id {bad}; token ids must be in [0, {MAX_TOKEN_ID}]")


class Request:
    """Mutable state of one request.

    Owned fields:
      - by the caller (set at construction): request_id, prompt_token_ids, max_tokens,
        stop_token_ids, eos_token_ids, ignore_eos, priority (lower runs earlier), sampling,
        cache_salt (isolates this request's prefix-cache entries, e.g. per tenant or adapter);
      - by the scheduler: arrival (order of `add_request`), status, output_token_ids,
        num_computed_tokens (tokens whose K/V are in the cache), num_preemptions;
      - by the KV cache manager: page_table (page ids covering positions [0, len*page_size);
        0 = released by the sliding window), page_hashes, hash_generation, num_cached_pages.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        *,
        stop_token_ids: Iterable[int] = (),
        eos_token_ids: Iterable[int] = (),
        ignore_eos: bool = False,
        priority: int = 0,
        sampling: Any = None,
        cache_salt: str | None = None,
    ) -> None:
        prompt = tuple(int(t) for t in prompt_token_ids)
        if not prompt:
            raise UserError(
                f"request {request_id!r} has an empty prompt; give at least one token id"
            )
        _check_token_ids(f"the prompt of request {request_id!r}", prompt)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise UserError(
                f"max_tokens={max_tokens} of request {request_id!r} must be an integer >= 1"
            )
        self.request_id = request_id
        self.prompt_token_ids: tuple[int, ...] = prompt
        self.max_tokens = max_tokens
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.ignore_eos = ignore_eos
        self.priority = priority
        self.sampling = sampling
        self.cache_salt = cache_salt

        self.arrival = -1
        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self._all_token_ids: list[int] = list(prompt)

        self.page_table: list[int] = []
        self.page_hashes: list[bytes] = []
        self.hash_generation = -1
        self.num_cached_pages = 0

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
            f"output={self.num_output_tokens}, computed={self.num_computed_tokens}, "
            f"pages={len(self.page_table)})"
        )

    @property
    def all_token_ids(self) -> Sequence[int]:
        """Prompt followed by the generated tokens (a live list: do not mutate)."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens_to_compute(self) -> int:
        """Known tokens whose K/V are not cached yet: a prompt remainder, or 1 for a decode."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.status.finish_reason

    @property
    def sort_key(self) -> tuple[int, int]:
        """(priority, arrival): what FCFS-with-priorities orders by."""
        return (self.priority, self.arrival)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def set_output_token(self, index: int, token_id: int) -> None:
        """Replace output token `index` (a PLACEHOLDER_TOKEN) by the value the device sampled."""
        self.output_token_ids[index] = token_id
        self._all_token_ids[self.num_prompt_tokens + index] = token_id

    def truncate_output(self, num_output_tokens: int) -> None:
        """Keep the first num_output_tokens generated tokens (a stop token inside a
        multi-step decode drops the ones sampled after it)."""
        del self.output_token_ids[num_output_tokens:]
        del self._all_token_ids[self.num_prompt_tokens + num_output_tokens :]

    @property
    def num_known_tokens(self) -> int:
        """Leading tokens whose values the host knows: all but trailing placeholders."""
        n = self.num_tokens
        while n > self.num_prompt_tokens and self._all_token_ids[n - 1] == PLACEHOLDER_TOKEN:
            n -= 1
        return n

    def is_stop_token(self, token_id: int) -> bool:
        """A stop token id, or EOS unless ignore_eos."""
        return token_id in self.stop_token_ids or (
            not self.ignore_eos and token_id in self.eos_token_ids
        )

    def stop_reason(self, max_model_len: int) -> FinishReason | None:
        """Whether the last generated token ends the request.

        A stop token (or EOS unless ignore_eos) wins over the length limit on the same token, so a
        caller can tell a natural end from a truncation.
        """
        if not self.output_token_ids:
            return None
        if self.is_stop_token(self.output_token_ids[-1]):
            return FinishReason.STOP
        if self.num_output_tokens >= self.max_tokens or self.num_tokens >= max_model_len:
            return FinishReason.LENGTH
        return None
