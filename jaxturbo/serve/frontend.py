"""The event-loop side of the server: admission, routing of engine outputs, responses.

Runs on the asyncio loop only (no locks): HTTP handlers `submit` parsed jobs, the engine thread's
`deliver` is turned into ONE `call_soon_threadsafe(_dispatch)` per engine step, and `_dispatch`
routes each output to its request (latency metrics are taken there, with the step's timestamp).
A streaming request reads its outputs from an asyncio queue (`stream`: SSE chunks; the outputs
of several steps that arrive together are merged into one chunk per choice); a non-streaming one
waits for all its choices (`complete`).  Every request ends in `release`, which aborts what the
engine still runs for it (client gone, shutdown) and frees its admission slots.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from jaxturbo.inference.engine.engine import RequestOutput
from jaxturbo.serve import responses as R
from jaxturbo.serve.errors import APIError
from jaxturbo.serve.metrics import ServerMetrics
from jaxturbo.serve.protocol import Job, Limits
from jaxturbo.serve.worker import Delivery, EngineWorker

EXIT_AFTER_ABORT_S = 2.0  # after the grace period: time for aborted streams to send their error


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


@dataclasses.dataclass
class ChoiceState:
    """One choice (sample) of a request as its outputs arrive."""

    text: list[str] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    tops: list[tuple] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    num_tokens: int = 0
    last_at: float | None = None


class ActiveRequest:
    """An admitted HTTP generation request: its engine requests (one per prompt) and choices."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        self.job = job
        prefix = "chatcmpl" if job.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.arrival = time.perf_counter()
        self.engine_ids = [f"{self.id}-{i}" for i in range(len(job.prompts))]
        self.choices = [ChoiceState() for _ in range(job.num_choices)]
        self.unfinished = job.num_choices
        self.to_admit = len(job.prompts)
        self.admitted: asyncio.Future[None] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self.queue: asyncio.Queue | None = asyncio.Queue() if job.stream else None
        self.released = False

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.job.prompts))

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    def fail(self, error: APIError) -> None:
        """End the request with an error (shutdown past its grace period, engine failure)."""
        for fut in (self.admitted, self.finished):
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved: no "never retrieved" warning if nobody waits
        if self.queue is not None:
            self.queue.put_nowait(error)


class Frontend:
    """Admission, routing and response building (see the module docstring).

    limits: what requests are checked against; capacity: samples admitted at once (running +
    queued) before 429; api_key: required as `Authorization: Bearer KEY` on /v1 when set;
    chat_stop_ids: tokens that end a chat turn."""

    def __init__(
        self,
        limits: Limits,
        tokenizer: Any,
        *,
        capacity: int,
        api_key: str | None = None,
        chat_stop_ids: Sequence[int] = (),
    ) -> None:
        self.limits, self.tokenizer = limits, tokenizer
        self.capacity, self.api_key = capacity, api_key
        self.chat_stop_ids = tuple(chat_stop_ids)
        self.worker: EngineWorker | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = False
        self.failure: BaseException | None = None
        self.draining = False
        self.drain_deadline = float("inf")
        self._aborted_at: float | None = None
        self.samples_in_flight = 0
        self._requests: set[ActiveRequest] = set()
        self._by_engine_id: dict[str, tuple[ActiveRequest, int]] = {}
        self.metrics = ServerMetrics(
            lambda: self.worker.stats if self.worker else None, lambda: len(self._requests)
        )
        self.on_ready: Callable[[], None] | None = None

    # -- state ----------------------------------------------------------------------------------
    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def authorize(self, authorization: str | None) -> None:
        if self.api_key is None:
            return
        want = f"Bearer {self.api_key}"
        if authorization is None or not hmac.compare_digest(authorization.encode(), want.encode()):
            raise APIError(
                401,
                "missing or wrong API key: send the header 'Authorization: "
                "Bearer <key>' with the key the server was started with "
                "(--api-key)",
                code="invalid_api_key",
            )

    def check_accepting(self) -> None:
        if self.failure is not None:
            raise APIError(
                503,
                f"the engine failed ({type(self.failure).__name__}: "
                f"{self.failure}); restart the server",
                code="engine_failed",
            )
        if self.draining:
            raise APIError(
                503, "the server is shutting down and accepts no new requests", code="shutting_down"
            )
        if not self.ready:
            raise APIError(
                503,
                "the server is starting (compiling the engine's steps); retry "
                "when GET /health answers 200",
                code="not_ready",
            )

    # -- engine thread -> loop ------------------------------------------------------------------
    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has closed (shutdown): nobody is left to tell
            pass

    def deliver(self, d: Delivery) -> None:
        """Called in the engine thread: hand one step's results to the loop."""
        self._post(self._dispatch, d)

    def engine_ready(self) -> None:
        """Called in the engine thread once warm-up is done."""
        self._post(self._mark_ready)

    def engine_failed(self, e: BaseException) -> None:
        self._post(self._mark_failed, e)

    def _mark_ready(self) -> None:
        self.ready = True
        if self.on_ready is not None:
            self.on_ready()

    def _mark_failed(self, e: BaseException) -> None:
        self.failure = e
        err = APIError(500, f"the engine failed: {type(e).__name__}: {e}", code="engine_failed")
        for ar in list(self._requests):
            ar.fail(err)

    def _dispatch(self, d: Delivery) -> None:
        for eid in d.accepted:
            entry = self._by_engine_id.get(eid)
            if entry is not None:
                ar = entry[0]
                ar.to_admit -= 1
                if not ar.to_admit and not ar.admitted.done():
                    ar.admitted.set_result(None)
        for eid, e in d.rejected:
            entry = self._by_engine_id.get(eid)
            if entry is not None and not entry[0].admitted.done():
                entry[0].admitted.set_exception(APIError(400, str(e)))
        m = self.metrics
        batches: dict[ActiveRequest, list[tuple[int, RequestOutput]]] = {}
        tokens = 0
        for o in d.outputs:
            entry = self._by_engine_id.get(o.request_id)
            if entry is None:  # released (client gone) while the step ran
                continue
            ar, p = entry
            ci = p * ar.job.params.n + o.index
            ch = ar.choices[ci]
            k = len(o.new_token_ids)
            tokens += k
            if ch.last_at is None:
                m.ttft.observe(d.time - ar.arrival)
            else:
                m.itl.observe(d.time - ch.last_at)
            ch.last_at = d.time
            ch.num_tokens += k
            if ar.queue is None:  # non-streaming: collect
                ch.text.append(o.new_text)
                ch.token_ids.extend(o.new_token_ids)
                if o.logprobs is not None:
                    ch.logprobs.extend(o.logprobs)
                    ch.tops.extend(o.top_logprobs or [()] * k)
            else:
                batches.setdefault(ar, []).append((ci, o))
            if o.finish_reason is not None:
                ch.finish_reason = o.finish_reason
                m.e2e.observe(d.time - ar.arrival)
                m.finished.labels(o.finish_reason).inc()
                ar.unfinished -= 1
                if not ar.unfinished:
                    for eid in ar.engine_ids:
                        self._by_engine_id.pop(eid, None)
                    if not ar.finished.done():
                        ar.finished.set_result(None)
        if tokens:
            m.generation_tokens.inc(tokens)
        for ar, items in batches.items():
            ar.queue.put_nowait(items)

    # -- requests -------------------------------------------------------------------------------
    async def submit(self, job: Job) -> ActiveRequest:
        """Admit a job (503 while starting / shutting down, 429 when full) and wait until the
        engine has accepted it (or refused it: 400)."""
        self.check_accepting()
        if self.samples_in_flight + job.num_choices > self.capacity:
            raise APIError(
                429,
                f"the server is full: {self.samples_in_flight} samples running or "
                f"queued, at most {self.capacity} (--max-num-seqs + --max-queue); "
                "retry later",
                code="queue_full",
            )
        ar = ActiveRequest(job, self.loop)
        self._requests.add(ar)
        self.samples_in_flight += job.num_choices
        for i, eid in enumerate(ar.engine_ids):
            self._by_engine_id[eid] = (ar, i)
        self.metrics.prompt_tokens.inc(ar.prompt_tokens)
        for eid, ids in zip(ar.engine_ids, job.prompts):
            self.worker.add(eid, ids, job.params)
        try:
            await ar.admitted
        except BaseException:
            self.release(ar)
            raise
        return ar

    def release(self, ar: ActiveRequest) -> None:
        """The request's answer is done (or abandoned): abort what still runs, free its slots."""
        if ar.released:
            return
        ar.released = True
        if ar.unfinished:
            for eid in ar.engine_ids:
                if self._by_engine_id.pop(eid, None) is not None:
                    self.worker.abort(eid)
            adm = ar.admitted
            if adm.done() and not adm.cancelled() and adm.exception() is None:  # not refused
                self.metrics.finished.labels("abort").inc(ar.unfinished)
        self._requests.discard(ar)
        self.samples_in_flight -= ar.job.num_choices

    async def complete(
        self, ar: ActiveRequest, disconnected: Callable[[], Any] | None = None
    ) -> dict[str, Any]:
        """The non-streaming answer; `disconnected`: an awaitable factory that returns when the
        client goes away (its request is then aborted: ClientGone)."""
        try:
            if disconnected is None:
                await ar.finished
            else:
                watch = asyncio.ensure_future(disconnected())
                try:
                    await asyncio.wait({ar.finished, watch}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    watch.cancel()
                if not ar.finished.done():
                    raise ClientGone()
            ar.finished.result()  # raises the request's error, if any
            return self._response(ar)
        finally:
            self.release(ar)

    def _response(self, ar: ActiveRequest) -> dict[str, Any]:
        job, kind = ar.job, ar.job.kind
        choices = []
        for ci, ch in enumerate(ar.choices):
            lp = None
            if job.logprobs is not None:
                lp = R.choice_logprobs(kind, self.tokenizer, ch.token_ids, ch.logprobs, ch.tops)
            choices.append(
                R.choice(
                    kind,
                    ci,
                    "".join(ch.text),
                    ch.finish_reason,
                    lp,
                    chunk=False,
                    token_ids=ch.token_ids if job.return_token_ids else None,
                )
            )
        body = {
            **R.envelope(kind, ar.id, ar.created, self.limits.model_name, chunk=False),
            "choices": choices,
            "usage": R.usage(ar.prompt_tokens, ar.completion_tokens),
        }
        if job.return_token_ids:
            body["prompt_token_ids"] = job.prompts[0] if kind == "chat" else job.prompts
        return body

    async def stream(self, ar: ActiveRequest) -> AsyncIterator[str]:
        """SSE events of a streaming request, ending with `data: [DONE]`.  Closing the generator
        (the client went away) aborts the request."""
        job, kind = ar.job, ar.job.kind
        env = R.envelope(kind, ar.id, ar.created, self.limits.model_name, chunk=True)
        if job.include_usage:
            env["usage"] = None
        first = [True] * job.num_choices
        offsets = [0] * job.num_choices
        remaining = job.num_choices
        # every token gets a chunk where the client asked for per-token data or no text exists
        every_token = job.logprobs is not None or job.return_token_ids or self.tokenizer is None
        try:
            while remaining:
                items = [await ar.queue.get()]
                while not ar.queue.empty():
                    items.append(ar.queue.get_nowait())
                merged: dict[int, list[RequestOutput]] = {}
                for it in items:
                    if isinstance(it, APIError):
                        self.metrics.errors.labels(str(it.status), str(it.code)).inc()
                        yield R.sse(it.body())
                        yield R.DONE
                        return
                    for ci, o in it:
                        merged.setdefault(ci, []).append(o)
                for ci in sorted(merged):
                    outs = merged[ci]
                    text = "".join(o.new_text for o in outs)
                    reason = outs[-1].finish_reason
                    if reason is not None:
                        remaining -= 1
                    if not (text or reason or every_token):
                        continue
                    ids = [t for o in outs for t in o.new_token_ids]
                    lp = None
                    if job.logprobs is not None:
                        lps = [v for o in outs for v in (o.logprobs or ())]
                        tops = [
                            t for o in outs for t in (o.top_logprobs or [()] * len(o.new_token_ids))
                        ]
                        lp = R.choice_logprobs(kind, self.tokenizer, ids, lps, tops, offsets[ci])
                        if kind != "chat":
                            offsets[ci] += sum(map(len, lp["tokens"]))
                    c = R.choice(
                        kind,
                        ci,
                        text,
                        reason,
                        lp,
                        chunk=True,
                        first=first[ci],
                        token_ids=ids if job.return_token_ids else None,
                    )
                    first[ci] = False
                    yield R.sse({**env, "choices": [c]})
            if job.include_usage:
                yield R.sse(
                    {**env, "choices": [], "usage": R.usage(ar.prompt_tokens, ar.completion_tokens)}
                )
            yield R.DONE
        finally:
            self.release(ar)

    # -- shutdown ------------------------------------------------------------------------------
    def begin_drain(self, grace: float) -> None:
        """Stop admitting (503); requests in flight may finish within `grace` seconds."""
        if not self.draining:
            self.draining = True
            self.drain_deadline = time.monotonic() + grace

    def drained(self) -> bool:
        """While draining: True once no request is in flight, or after the grace period (the
        requests still running are then failed with a 503 and given a moment to say so)."""
        if not self._requests:
            return True
        now = time.monotonic()
        if now < self.drain_deadline:
            return False
        if self._aborted_at is None:
            self._aborted_at = now
            err = APIError(
                503,
                "the server shut down before this request finished (its "
                "shutdown grace period ran out)",
                code="shutting_down",
            )
            for ar in list(self._requests):
                ar.fail(err)
                if ar.queue is None:
                    self.release(ar)
            return False
        return now - self._aborted_at > EXIT_AFTER_ABORT_S
