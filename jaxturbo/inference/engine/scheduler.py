"""Continuous-batching scheduler: which requests compute which tokens in the next model step.

Each step has a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`).
Running requests are served first, in admission order: a decode costs one token, a prompt still
being prefilled gets its next chunk.  Then waiting requests are admitted in policy order (after a
prefix-cache lookup) until the budget, the sequence cap or the pages run out; the first one that
does not fit stops admission, so a large request is not overtaken forever.  When a running request
cannot get pages, the policy's victim is preempted by recompute: its pages are freed and it goes
back to the waiting queue with its generated tokens, to be recomputed as part of its prompt.

Protocol: `schedule()`, run the step, `update_from_output(sampled)`, repeat.  The step handed to
the runner must run as scheduled even if a request of it is aborted meanwhile: another request of
the same step may read pages it writes (prefix hits are registered at allocation).

Asynchronous scheduling splits `update_from_output` in two, so that step N+1 is scheduled while
the device still computes step N's tokens: `commit_step()` accounts for the step with a
PLACEHOLDER_TOKEN per sampled token (length limits apply at once), `schedule()` may then run,
and `resolve_tokens(sampled)` fills in the values (stop tokens apply then) before the next
`commit_step()`.  A request that a stop token ends may thus be computed in one more step, whose
token is dropped.

Multi-step decode (`EngineConfig.decode_steps` = K > 1): when every running request is decoding
and no waiting request could be admitted, a step runs K decode steps in one launch
(`SchedulerOutput.num_steps`): each request's pages are allocated for K tokens ahead, and it
receives K sampled tokens at once.  A stop token among them, or its max_tokens, ends the request
there and drops the tokens after it (computed, never reported).  K is used only when every
request has room for K more positions within max_model_len, the pool has the pages, and some
request has more than K / 2 tokens left (else most of the launch would be dropped); otherwise
single steps run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from jaxturbo.errors import UserError
from jaxturbo.inference.engine.config import EngineConfig
from jaxturbo.inference.engine.kv_cache_manager import KVCacheManager, KVCacheStats
from jaxturbo.inference.engine.policy import PriorityFCFS, SchedulingPolicy
from jaxturbo.inference.engine.request import (
    PLACEHOLDER_TOKEN,
    FinishReason,
    Request,
    RequestStatus,
)


@dataclasses.dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step.

    token_ids: the tokens to compute, at positions start_position .. start_position + n - 1 (a
        prompt chunk, or the last sampled token); start_position = tokens already cached.
    page_table: the request's pages after allocation, covering at least start_position + n
        tokens; 0 marks pages released by the sliding window.
    samples: whether the step ends with a sampled token (the last prompt chunk, or a decode).
    sampling: the request's opaque sampling settings.
    """

    request_id: str
    token_ids: tuple[int, ...]
    start_position: int
    page_table: tuple[int, ...]
    samples: bool
    sampling: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def seq_len(self) -> int:
        """KV length after the step: start_position + number of new tokens."""
        return self.start_position + len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    """What one model step computes, plus the requests whose device-side state can be dropped:
    preempted in this schedule, or finished/aborted since the previous one.  num_scheduled_tokens
    counts one step's tokens (a multi-step decode computes num_steps times as many)."""

    scheduled: tuple[ScheduledRequest, ...]
    num_scheduled_tokens: int
    preempted_ids: tuple[str, ...] = ()
    finished_ids: tuple[str, ...] = ()
    num_steps: int = 1  # > 1: a multi-step decode (every scheduled request decodes num_steps)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """The tokens a step sampled for one request (one, or up to num_steps of a multi-step
    decode) and whether they ended it."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: FinishReason | None

    @property
    def new_token_id(self) -> int:
        """The last new token (the only one of a single step)."""
        return self.new_token_ids[-1]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _token_tuple(value: int | Sequence[int]) -> tuple[int, ...]:
    """A request's sampled tokens of one step: one int, or a sequence (multi-step decode)."""
    try:
        return tuple(int(t) for t in value)  # type: ignore[union-attr]
    except TypeError:  # not iterable: one token
        return (int(value),)


@dataclasses.dataclass(frozen=True)
class SchedulerStats:
    """Queue sizes, cumulative counters, the last step's token count and the KV cache snapshot."""

    num_running: int
    num_waiting: int
    num_preemptions: int
    num_steps: int
    num_scheduled_tokens: int
    total_scheduled_tokens: int
    kv: KVCacheStats


class Scheduler:
    """Requests in, `SchedulerOutput` per step out; plain Python over integers."""

    def __init__(
        self,
        config: EngineConfig,
        kv_manager: KVCacheManager,
        policy: SchedulingPolicy | None = None,
    ) -> None:
        if (
            kv_manager.page_size != config.page_size
            or kv_manager.sliding_window != config.sliding_window
        ):
            raise ValueError(
                f"kv_manager (page_size={kv_manager.page_size}, sliding_window="
                f"{kv_manager.sliding_window}) disagrees with the config (page_size="
                f"{config.page_size}, sliding_window={config.sliding_window})"
            )
        self.config = config
        self.kv = kv_manager
        self.policy: SchedulingPolicy = PriorityFCFS() if policy is None else policy
        self.running: list[Request] = []
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._arrivals = 0
        self._pending: list[tuple[Request, ScheduledRequest]] | None = None
        self._pending_steps = 1  # num_steps of the pending step
        self._awaiting_steps = 1  # num_steps of the committed, unresolved step
        # asynchronous scheduling: (request, first output index, finish reason at commit) per
        # request whose sampled tokens were committed as placeholders and not resolved yet
        self._awaiting: list[tuple[Request, int, FinishReason | None]] | None = None
        self._finished_ids: list[str] = []
        self._num_preemptions = 0
        self._num_steps = 0
        self._last_tokens = 0
        self._total_tokens = 0

    # -- requests in and out ------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a new request.  UserError if its id is taken, its prompt leaves no room to
        generate within max_model_len, or it could never fit in the page pool."""
        cfg, rid = self.config, request.request_id
        if rid in self._requests:
            raise UserError(f"request id {rid!r} is already in use by an unfinished request")
        if (
            request.status is not RequestStatus.WAITING
            or request.output_token_ids
            or request.page_table
        ):
            raise ValueError(f"request {rid!r} is not fresh ({request!r}); build a new Request")
        if request.num_prompt_tokens >= cfg.max_model_len:
            raise UserError(
                f"the prompt of request {rid!r} has {request.num_prompt_tokens} tokens; "
                f"max_model_len={cfg.max_model_len} allows at most {cfg.max_model_len - 1} "
                "so that at least one token can be generated"
            )
        # the last sampled token is never computed, so at most total - 1 tokens need K/V
        most_computed = min(request.num_prompt_tokens + request.max_tokens, cfg.max_model_len) - 1
        need = self.kv.max_pages_needed(most_computed, cfg.max_chunk_tokens)
        if need > self.kv.num_usable_pages:
            raise UserError(
                f"request {rid!r} may need {need} KV pages ({most_computed} tokens, page_size "
                f"{cfg.page_size}) but the pool has {self.kv.num_usable_pages}; lower its prompt length or "
                f"max_tokens={request.max_tokens}, or give the KV cache more pages"
            )
        request.arrival = self._arrivals
        self._arrivals += 1
        self._requests[rid] = request
        self.policy.add(request)

    def finish_request(self, request_id: str, reason: FinishReason) -> bool:
        """End a request now (a stop string found by the caller, or an abort) and free its pages;
        False if no unfinished request has this id."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        self._finish(request, reason)
        return True

    def abort_request(self, request_id: str) -> bool:
        """Abort a waiting or running request; its pages are freed at once."""
        return self.finish_request(request_id, FinishReason.ABORT)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.policy.remove(request)
        request.status = RequestStatus.finished(reason)
        self.kv.free(request)
        del self._requests[request.request_id]
        self._finished_ids.append(request.request_id)

    def _preempt(self, request: Request) -> None:
        """Recompute preemption: drop the request's pages; its generated tokens stay and are
        recomputed with the prompt when it is admitted again."""
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self._num_preemptions += 1
        self.policy.add(request)

    # -- steps --------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's requests and tokens, allocating their pages (see the module doc)."""
        if self._pending is not None:
            raise RuntimeError("schedule() called twice: call update_from_output() after each step")
        cfg = self.config
        steps = self._decode_steps()
        if steps > 1:
            for request in self.running:
                if not self.kv.allocate_slots(request, 1, lookahead=steps - 1):
                    raise RuntimeError(f"{request.request_id!r}: pages counted but not allocated")
            return self._output({r.request_id: 1 for r in self.running}, [], steps)
        budget = cfg.max_num_batched_tokens
        chunk_cap = cfg.max_chunk_tokens
        num_new: dict[str, int] = {}  # request id -> tokens this step, in scheduling order
        preempted: list[str] = []

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens_to_compute, chunk_cap, budget)
            while not self.kv.allocate_slots(request, n):
                victim = self.policy.select_victim(self.running)
                if self.running.index(victim) < i:
                    i -= 1
                budget += num_new.pop(
                    victim.request_id, 0
                )  # its allocation this step is undone too
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                num_new[request.request_id] = n
                budget -= n
                i += 1

        # admitting new requests right after preempting would only thrash the pool
        while not preempted and budget > 0 and len(self.running) < cfg.max_num_seqs:
            request = self.policy.peek()
            if request is None:
                break
            hits, num_hit_tokens = self.kv.get_computed_pages(request)
            n = min(request.num_tokens - num_hit_tokens, chunk_cap, budget)
            if not self.kv.allocate_slots(request, n, hits):
                break
            self.policy.pop()
            request.num_computed_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            num_new[request.request_id] = n
            budget -= n

        return self._output(num_new, preempted, 1)

    def _decode_steps(self) -> int:
        """config.decode_steps when the next step may be a multi-step decode (module doc), else 1."""
        cfg, k = self.config, self.config.decode_steps
        if k == 1 or not self.running:
            return 1
        if len(self.policy) and len(self.running) < cfg.max_num_seqs:
            return 1  # a waiting request could join this step
        grow, most_left = 0, 0
        for r in self.running:
            if r.num_tokens_to_compute != 1 or r.num_tokens + k > cfg.max_model_len:
                return 1
            most_left = max(most_left, r.max_tokens - r.num_output_tokens)
            grow += self.kv.pages_to_grow(r, r.num_computed_tokens + k)
        return k if 2 * most_left > k and grow <= self.kv.num_free_pages else 1

    def _output(self, num_new: dict[str, int], preempted: list[str], steps: int) -> SchedulerOutput:
        """The step's `SchedulerOutput` of the tokens per request chosen, made pending."""
        pending, scheduled = [], []
        for rid, n in num_new.items():
            request = self._requests[rid]
            start = request.num_computed_tokens
            sr = ScheduledRequest(
                request_id=rid,
                token_ids=tuple(request.all_token_ids[start : start + n]),
                start_position=start,
                page_table=tuple(request.page_table),
                samples=start + n == request.num_tokens,
                sampling=request.sampling,
            )
            pending.append((request, sr))
            scheduled.append(sr)
        total = sum(num_new.values())
        out = SchedulerOutput(
            scheduled=tuple(scheduled),
            num_scheduled_tokens=total,
            preempted_ids=tuple(preempted),
            finished_ids=tuple(self._finished_ids),
            num_steps=steps,
        )
        self._finished_ids.clear()
        self._last_tokens = total * steps
        if scheduled:
            self._pending, self._pending_steps = pending, steps
            self._num_steps += steps
            self._total_tokens += total * steps
        return out

    def update_from_output(self, sampled: Mapping[str, int | Sequence[int]]) -> list[RequestOutput]:
        """Account for the step `schedule()` returned: advance every scheduled request's computed
        tokens, append the sampled token(s) of each request whose step samples (one int, or
        num_steps of a multi-step decode), apply the stop rules (stop ids / EOS -> "stop",
        max_tokens / max_model_len -> "length") and free finished requests' pages.  Requests
        finished or aborted since `schedule()` are skipped."""
        if self._awaiting is not None:
            raise RuntimeError(
                "update_from_output() with committed tokens unresolved: call resolve_tokens() first"
            )
        pending, self._pending = self._pending, None
        if pending is None:
            if sampled:
                raise RuntimeError(f"tokens for {sorted(sampled)} but no step is pending")
            return []
        steps = self._pending_steps
        try:
            tokens = self._sampled_tokens(pending, sampled, steps)
        except ValueError:
            self._pending = pending  # nothing was applied; let the caller retry with the right keys
            raise
        outputs = []
        for request, sr in pending:
            if request.is_finished:
                continue
            request.num_computed_tokens += sr.num_tokens + steps - 1
            if not sr.samples:
                continue
            new, reason = [], None
            for token in tokens[sr.request_id]:
                request.append_output_token(token)
                new.append(token)
                reason = request.stop_reason(self.config.max_model_len)
                if reason is not None:
                    self._finish(request, reason)
                    break
            outputs.append(RequestOutput(sr.request_id, tuple(new), reason))
        return outputs

    @staticmethod
    def _sampled_tokens(
        pending: list[tuple[Request, ScheduledRequest]],
        sampled: Mapping[str, int | Sequence[int]],
        steps: int,
    ) -> dict[str, tuple[int, ...]]:
        """The step's tokens per request, checked: every unfinished sampling request has
        `steps` tokens (finished ones may be given or left out); ValueError otherwise."""
        expected = {sr.request_id for _, sr in pending if sr.samples}
        needed = {sr.request_id for r, sr in pending if sr.samples and not r.is_finished}
        if not needed <= set(sampled) <= expected:
            raise ValueError(
                f"sampled tokens for {sorted(sampled)}, but the step samples for {sorted(needed)} "
                f"(and optionally the since-finished {sorted(expected - needed)})"
            )
        tokens = {rid: _token_tuple(v) for rid, v in sampled.items()}
        bad = sorted(rid for rid in needed if len(tokens[rid]) != steps)
        if bad:
            raise ValueError(
                f"the step decodes {steps} token(s) per request; got "
                f"{[len(tokens[r]) for r in bad]} for {bad}"
            )
        return tokens

    # -- asynchronous scheduling ----------------------------------------------------------------
    def commit_step(self) -> None:
        """Account for the scheduled step before its tokens are known: advance every scheduled
        request's computed tokens and append a PLACEHOLDER_TOKEN for each token it samples
        (num_steps of a multi-step decode); a request that thereby reaches max_tokens /
        max_model_len finishes now (pages freed: the device runs steps in order, so the step
        in flight is done with them before a later step reuses them).  `schedule()` may follow;
        `resolve_tokens()` must come before the next commit."""
        if self._awaiting is not None:
            raise RuntimeError(
                "commit_step() with the previous step's tokens unresolved: call "
                "resolve_tokens() first"
            )
        pending, self._pending = self._pending, None
        steps = self._awaiting_steps = self._pending_steps
        awaiting: list[tuple[Request, int, FinishReason | None]] = []
        for request, sr in pending or ():
            if request.is_finished:
                continue
            request.num_computed_tokens += sr.num_tokens + steps - 1
            if not sr.samples:
                continue
            first = request.num_output_tokens
            # a multi-step decode's tokens past max_tokens are dropped
            for _ in range(min(steps, request.max_tokens - first)):
                request.append_output_token(PLACEHOLDER_TOKEN)
            reason = request.stop_reason(self.config.max_model_len)  # a length limit only
            if reason is not None:
                self._finish(request, reason)
            awaiting.append((request, first, reason))
        self._awaiting = awaiting

    def resolve_tokens(self, sampled: Mapping[str, int | Sequence[int]]) -> list[RequestOutput]:
        """Fill in the tokens of the last committed step and apply the stop tokens (a stop
        token on a request the length limit ended relabels it "stop"; tokens after a stop token
        are dropped).  Requests finished or aborted since the commit are skipped (sampled may
        leave them out)."""
        awaiting, self._awaiting = self._awaiting, None
        if awaiting is None:
            if sampled:
                raise RuntimeError(f"tokens for {sorted(sampled)} but no step is committed")
            return []
        outputs = []
        for request, index, reason in awaiting:
            if request.is_finished and reason is None:
                continue  # finished after the commit (abort, stop string)
            tokens = _token_tuple(sampled[request.request_id])
            if len(tokens) != self._awaiting_steps:
                raise ValueError(
                    f"{request.request_id!r}: {len(tokens)} tokens for a step of "
                    f"{self._awaiting_steps}"
                )
            tokens = tokens[: request.num_output_tokens - index]  # those committed
            for j, token in enumerate(tokens):
                request.set_output_token(index + j, token)
                if request.is_stop_token(token):
                    request.truncate_output(index + j + 1)
                    tokens = tokens[: j + 1]
                    if reason is None:
                        self._finish(request, FinishReason.STOP)
                    else:  # its pages are gone already; only the reported reason changes
                        request.status = RequestStatus.FINISHED_STOPPED
                    reason = FinishReason.STOP
                    break
            outputs.append(RequestOutput(request.request_id, tokens, reason))
        return outputs

    @property
    def has_unresolved(self) -> bool:
        """Whether a committed step's tokens await `resolve_tokens`."""
        return self._awaiting is not None

    # -- introspection ------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id."""
        return self._requests.get(request_id)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.policy)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.policy),
            num_preemptions=self._num_preemptions,
            num_steps=self._num_steps,
            num_scheduled_tokens=self._last_tokens,
            total_scheduled_tokens=self._total_tokens,
            kv=self.kv.stats(),
        )
