"""Test doubles for the engine's host side: a fake device that plays the model step on page slots,
a deterministic fake sampler, and the structural invariants of scheduler + KV cache manager."""

from __future__ import annotations

import dataclasses
import zlib
from collections import Counter, defaultdict

from jaxturbo.inference.engine.config import EngineConfig
from jaxturbo.inference.engine.kv_cache_manager import KVCacheManager
from jaxturbo.inference.engine.page_pool import NULL_PAGE
from jaxturbo.inference.engine.request import FinishReason, RequestStatus
from jaxturbo.inference.engine.scheduler import RequestOutput, Scheduler, SchedulerOutput


def fake_token(request_id: str, position: int, vocab: int) -> int:
    """The token a request samples at a position: keyed like the real sampler, never by batch slot."""
    return zlib.crc32(f"{request_id}:{position}".encode()) % vocab


def make_scheduler(num_pages: int, **config) -> Scheduler:
    cfg = EngineConfig(num_pages=num_pages, **config)
    return Scheduler(cfg, KVCacheManager.from_config(cfg))


class FakeDevice:
    """Plays the model step on page slots.

    A slot holds what the K/V at a position depend on: a hash of the whole token prefix up to and
    including that position, and the weights version.  Per step all writes happen first, then every
    scheduled request checks that each position its new tokens attend holds its own prefix, as the
    real step writes K/V before attention in each layer.
    """

    def __init__(self, scheduler: Scheduler, vocab: int = 8) -> None:
        self.sched = scheduler
        self.vocab = vocab
        self.version = 0
        self.slots: dict[tuple[int, int], tuple[int, int]] = {}
        self._prefix: dict[str, list[int]] = {}  # request id -> rolling prefix hashes
        self.computed: dict[str, list[tuple[int, int]]] = defaultdict(
            list
        )  # (position, token) in order

    def _prefix_hashes(self, rid: str, tokens, n: int) -> list[int]:
        h = self._prefix.setdefault(rid, [])
        for p in range(len(h), n):
            h.append(hash((h[-1] if h else 0, tokens[p])))
        return h

    def run(
        self, out: SchedulerOutput, tokens_of: dict[str, list[int]]
    ) -> dict[str, int] | dict[str, tuple[int, ...]]:
        """Execute a step; tokens_of maps request id -> all its known tokens (prompt + output).
        A multi-step decode runs its steps one after another, each feeding the tokens the
        previous one sampled, and returns num_steps tokens per request."""
        if out.num_steps == 1:
            return self._run_one(out.scheduled, tokens_of)
        ps = self.sched.config.page_size
        known = {sr.request_id: list(tokens_of[sr.request_id]) for sr in out.scheduled}
        sampled: dict[str, list[int]] = defaultdict(list)
        for k in range(out.num_steps):
            step = []
            for sr in out.scheduled:
                assert sr.num_tokens == 1 and sr.samples
                assert len(sr.page_table) * ps >= sr.seq_len + out.num_steps - 1, (
                    f"{sr.request_id}: pages not allocated for the step's {out.num_steps} tokens"
                )
                toks = known[sr.request_id]
                p = sr.start_position + k
                step.append(dataclasses.replace(sr, token_ids=(toks[p],), start_position=p))
            for rid, t in self._run_one(tuple(step), known).items():
                known[rid].append(t)
                sampled[rid].append(t)
        return {rid: tuple(t) for rid, t in sampled.items()}

    def _run_one(self, scheduled, tokens_of: dict[str, list[int]]) -> dict[str, int]:
        ps = self.sched.config.page_size
        window = self.sched.config.sliding_window
        for sr in scheduled:
            toks = tokens_of[sr.request_id]
            assert list(sr.token_ids) == toks[sr.start_position : sr.seq_len]
            h = self._prefix_hashes(sr.request_id, toks, sr.seq_len)
            for j, t in enumerate(sr.token_ids):
                p = sr.start_position + j
                page = sr.page_table[p // ps]
                assert page != NULL_PAGE, f"{sr.request_id} writes position {p} into the null page"
                self.slots[(page, p % ps)] = (self.version, h[p])
                self.computed[sr.request_id].append((p, t))
        sampled = {}
        for sr in scheduled:
            h = self._prefix_hashes(sr.request_id, tokens_of[sr.request_id], sr.seq_len)
            lo = 0 if window is None else max(0, sr.start_position - window + 1)
            for p in range(lo, sr.seq_len):
                page = sr.page_table[p // ps]
                assert page != NULL_PAGE, f"{sr.request_id} reads position {p} from the null page"
                assert self.slots.get((page, p % ps)) == (self.version, h[p]), (
                    f"{sr.request_id} position {p}: page {page} holds other K/V"
                )
            if sr.samples:
                sampled[sr.request_id] = fake_token(sr.request_id, sr.seq_len, self.vocab)
        return sampled


def take_outputs(
    sched: Scheduler, o: RequestOutput, outputs: list[int], stop_string_after: int | None
) -> FinishReason | None:
    """Append a scheduler output's tokens to a request's outputs, as the engine does with a
    stop string that its `stop_string_after`-th output token completes: the tokens after it
    are dropped and the request finishes "stop" (the caller finishes it unless the scheduler
    did).  Returns the request's finish reason, None while it runs."""
    new = list(o.new_token_ids)
    n, after = len(outputs), stop_string_after
    hit = after is not None and n < after <= n + len(new)
    if hit:
        new = new[: after - n]
    outputs.extend(new)
    if o.finished:
        return FinishReason.STOP if len(new) < len(o.new_token_ids) else o.finish_reason
    if hit:
        assert sched.finish_request(o.request_id, FinishReason.STOP)
        return FinishReason.STOP
    return None


def check_invariants(sched: Scheduler, out: SchedulerOutput | None = None) -> None:
    """Structural invariants of the scheduler and its pages (after schedule() when out is given)."""
    pool, cfg = sched.kv.pool, sched.config
    ps = cfg.page_size
    refs: Counter[int] = Counter()
    owners: dict[int, list[tuple]] = defaultdict(list)
    assert len(sched.running) <= cfg.max_num_seqs
    for r in sched.running:
        assert r.status is RequestStatus.RUNNING and sched.get_request(r.request_id) is r
        pages = [p for p in r.page_table if p != NULL_PAGE]
        assert len(pages) == len(set(pages)), f"{r.request_id} holds a page twice: {r.page_table}"
        assert len(r.page_table) * ps >= r.num_computed_tokens
        assert len(r.page_table) <= cfg.max_pages_per_seq
        for idx, p in enumerate(r.page_table):
            if p == NULL_PAGE:
                # only the sliding window releases pages, and only those left behind the window
                assert cfg.sliding_window is not None
                assert (idx + 1) * ps <= r.num_computed_tokens - cfg.sliding_window + 1
            else:
                refs[p] += 1
                owners[p].append((r, idx))
    waiting = list(sched.policy)
    assert len(waiting) == sched.num_waiting
    for r in waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert not r.page_table and r.num_computed_tokens == 0
    assert len(waiting) + len(sched.running) == len(sched._requests)

    free = set(pool.free_pages())
    assert len(free) == pool.num_free and NULL_PAGE not in free
    assert pool.ref_count(NULL_PAGE) == 0
    assert pool.num_free + pool.num_used == pool.num_usable == cfg.num_pages - 1
    for p in range(1, pool.num_pages):
        assert pool.ref_count(p) == refs[p], (
            f"page {p}: ref {pool.ref_count(p)} but {refs[p]} tables"
        )
        assert (p in free) == (refs[p] == 0)
        h = pool.page_hash(p)
        if h is not None:
            assert pool.lookup(h) == p
    for p, own in owners.items():
        if len(own) > 1:
            # a shared page is a cached prefix page at the same index of requests with equal prefixes
            assert pool.page_hash(p) is not None, f"page {p} shared but not a cached prefix page"
            idx = own[0][1]
            assert all(i == idx for _, i in own)
            first = list(own[0][0].all_token_ids[: (idx + 1) * ps])
            assert all(list(r.all_token_ids[: (idx + 1) * ps]) == first for r, _ in own)

    if out is not None:
        assert out.num_scheduled_tokens == sum(sr.num_tokens for sr in out.scheduled)
        assert out.num_scheduled_tokens <= cfg.max_num_batched_tokens
        assert len(out.scheduled) <= cfg.max_num_seqs
        assert len({sr.request_id for sr in out.scheduled}) == len(out.scheduled)
        if out.num_scheduled_tokens < cfg.max_num_batched_tokens:
            # budget left over: no running request was passed over
            assert {r.request_id for r in sched.running} == {sr.request_id for sr in out.scheduled}
        for sr in out.scheduled:
            r = sched.get_request(sr.request_id)
            assert r is not None and r.status is RequestStatus.RUNNING
            assert sr.start_position == r.num_computed_tokens and sr.num_tokens >= 1
            assert sr.page_table == tuple(r.page_table)
            assert len(sr.page_table) * ps >= sr.seq_len, "table does not cover the step's tokens"
            assert sr.samples == (sr.seq_len == r.num_tokens)
            t = cfg.long_prefill_token_threshold
            assert t is None or sr.num_tokens <= t
