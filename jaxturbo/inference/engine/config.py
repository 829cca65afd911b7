"""Engine configuration: page geometry, step budgets and the static shape buckets of the model step.

Plain Python (no JAX): the scheduler and the KV cache manager read it; the model runner also
sizes the page pool from `kv_memory_fraction` when `num_pages` is None (the sizing function lives
in the runner, which knows the model and the device; this module only validates the values).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxturbo.errors import UserError

MIN_PAGE_SIZE = 16
MAX_PAGE_SIZE = 128


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


def pick_bucket(buckets: Sequence[int], n: int) -> int:
    """The smallest bucket >= n.  `buckets` is sorted ascending (as `EngineConfig` stores them).

    Raises ValueError when n exceeds the largest bucket: the scheduler never builds such a step,
    so this is a bug, not bad user input.
    """
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(
        f"{n} exceeds the largest bucket {buckets[-1] if buckets else None} of {list(buckets)}"
    )


def power_of_two_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 2*lo, 4*lo, ... below hi, then hi itself: every n in [1, hi] has a bucket < 2n (or lo)."""
    out, b = [], max(1, lo)
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return tuple(out)


def _check_buckets(
    name: str, buckets: Sequence[int], must_reach: int, reach_name: str
) -> tuple[int, ...]:
    b = tuple(buckets)
    if not b or any(not isinstance(x, int) or x < 1 for x in b):
        raise UserError(f"{name}={list(b)} must be a non-empty list of positive integers")
    if any(x >= y for x, y in zip(b, b[1:])):
        raise UserError(f"{name}={list(b)} must be strictly increasing")
    if b[-1] < must_reach:
        raise UserError(
            f"{name}={list(b)}: the largest bucket {b[-1]} must be >= {reach_name}={must_reach}"
        )
    return b


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static settings of one engine instance.  Every bad value raises `UserError` naming it.

    page_size: tokens per KV page, a power of two in [16, 128] (the kernels tile by it).
    num_pages: pages in the pool, including the reserved null page 0; None lets the model runner
        size the pool from `kv_memory_fraction` of the free device memory.  At least 2.
    kv_memory_fraction: fraction in (0, 1] of the free device memory the runner gives the pool
        when `num_pages` is None.
    max_num_seqs: most requests running at once (the sequence dimension of a step).
    max_num_batched_tokens: token budget of one step (prompt chunks + one token per decode);
        >= max_num_seqs, so every running request can decode in the same step.
    max_model_len: most tokens (prompt + generated) one request may hold; a longer prompt is
        rejected at add time, generation stops with reason "length" when it is reached.
    enable_prefix_caching: reuse the KV pages of identical full-page prompt prefixes.
    long_prefill_token_threshold: most prompt tokens one request computes in one step (None: only
        the step budget limits it); keeps decodes of other requests flowing beside long prompts.
    sliding_window: attention window in tokens when EVERY layer uses the same window (pages that
        leave the window are freed); None for full attention or for models mixing window and full
        layers (their pages are shared by all layers, so none can be freed).
    token_buckets: padded token counts T a step is compiled for, ascending; the largest must be
        >= max_num_batched_tokens.  None: 16, 32, 64, ... up to max_num_batched_tokens.
    seq_buckets: padded sequence counts S, ascending; the largest must be >= max_num_seqs.
        None: 1, 2, 4, ... up to max_num_seqs.
    decode_steps: decode steps one device launch runs when every running request is decoding
        and no waiting request could be admitted (each request then gets decode_steps tokens at
        once; a stop token inside them drops the ones after it).  1: one step per launch.  More
        spreads the host's per-step work (scheduling, launching, reading tokens) over several
        tokens: for small models the host, not the device, bounds the decode rate.
    """

    page_size: int = 16
    num_pages: int | None = None
    kv_memory_fraction: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    enable_prefix_caching: bool = True
    long_prefill_token_threshold: int | None = None
    sliding_window: int | None = None
    token_buckets: tuple[int, ...] | None = None
    seq_buckets: tuple[int, ...] | None = None
    decode_steps: int = 1

    def __post_init__(self) -> None:
        ps = self.page_size
        if not isinstance(ps, int) or not MIN_PAGE_SIZE <= ps <= MAX_PAGE_SIZE or ps & (ps - 1):
            raise UserError(
                f"page_size={ps} must be a power of two in [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}]"
            )
        if self.num_pages is not None and (
            not isinstance(self.num_pages, int) or self.num_pages < 2
        ):
            raise UserError(
                f"num_pages={self.num_pages} must be >= 2 (page 0 is the reserved null page) or None"
            )
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise UserError(f"kv_memory_fraction={self.kv_memory_fraction} must be in (0, 1]")
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise UserError(f"max_num_seqs={self.max_num_seqs} must be an integer >= 1")
        if (
            not isinstance(self.max_num_batched_tokens, int)
            or self.max_num_batched_tokens < self.max_num_seqs
        ):
            raise UserError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} must be an integer "
                f">= max_num_seqs={self.max_num_seqs} (one decode token per running request)"
            )
        if not isinstance(self.max_model_len, int) or self.max_model_len < 2:
            raise UserError(
                f"max_model_len={self.max_model_len} must be an integer >= 2 "
                "(at least one prompt token and one generated token)"
            )
        t = self.long_prefill_token_threshold
        if t is not None and (not isinstance(t, int) or t < 1):
            raise UserError(
                f"long_prefill_token_threshold={t} must be an integer >= 1 or None (off)"
            )
        w = self.sliding_window
        if w is not None and (not isinstance(w, int) or w < 1):
            raise UserError(f"sliding_window={w} must be an integer >= 1 or None (full attention)")
        k = self.decode_steps
        if not isinstance(k, int) or k < 1:
            raise UserError(f"decode_steps={k} must be an integer >= 1 (1: one step per launch)")
        tb = self.token_buckets
        if tb is None:
            tb = power_of_two_buckets(
                min(16, self.max_num_batched_tokens), self.max_num_batched_tokens
            )
        sb = self.seq_buckets
        if sb is None:
            sb = power_of_two_buckets(1, self.max_num_seqs)
        # frozen dataclass: normalise the bucket lists to validated tuples once, here
        object.__setattr__(
            self,
            "token_buckets",
            _check_buckets(
                "token_buckets", tb, self.max_num_batched_tokens, "max_num_batched_tokens"
            ),
        )
        object.__setattr__(
            self,
            "seq_buckets",
            _check_buckets("seq_buckets", sb, self.max_num_seqs, "max_num_seqs"),
        )

    @property
    def max_pages_per_seq(self) -> int:
        """Width of a page table that covers max_model_len tokens."""
        return cdiv(self.max_model_len, self.page_size)

    @property
    def max_chunk_tokens(self) -> int:
        """Most tokens one request computes in one step."""
        t = self.long_prefill_token_threshold
        return self.max_num_batched_tokens if t is None else min(t, self.max_num_batched_tokens)

    def token_bucket(self, n: int) -> int:
        """Padded token count T for a step of n tokens."""
        return pick_bucket(self.token_buckets, n)

    def seq_bucket(self, n: int) -> int:
        """Padded sequence count S for a step of n sequences."""
        return pick_bucket(self.seq_buckets, n)
