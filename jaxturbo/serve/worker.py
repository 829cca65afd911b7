"""The engine's thread: the only thread that touches the `Engine`.

    worker = EngineWorker(build_engine, deliver)   # build_engine() runs in the thread (warm-up)
    worker.start(); worker.ready.wait()
    worker.add("cmpl-1-0", prompt_ids, RequestParams(...))   # any thread
    worker.abort("cmpl-1-0")

The thread loops: take the queued commands (adds, aborts; it sleeps on the queue while the
engine has no work), run one `Engine.step()`, and hand everything that step produced to
`deliver(Delivery)` in ONE call (the server turns it into one event-loop callback per step, not
one per token).  An engine statistics snapshot is refreshed at most every `STATS_EVERY_S` and
whenever the engine goes idle, for /metrics to read without touching the engine.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from jaxturbo.inference.engine.engine import Engine, EngineStats, RequestOutput
from jaxturbo.inference.engine.params import RequestParams

log = logging.getLogger(__name__)

STATS_EVERY_S = 0.05  # engine statistics snapshot period while it runs
IDLE_WAKE_S = 0.5  # the idle thread wakes this often (stats, a stop without a command)


@dataclasses.dataclass
class Delivery:
    """What one loop iteration produced: at `time` (perf_counter, after the step), the step's
    outputs, the request ids the engine accepted and those it refused (with the error)."""

    time: float
    outputs: list[RequestOutput]
    accepted: list[str]
    rejected: list[tuple[str, BaseException]]


class EngineWorker:
    """Runs an engine in a background thread (see the module docstring).

    build: called in the thread to create the engine (so warm-up compilation does not block the
    caller); deliver: called in the thread with each `Delivery`; on_ready / on_failure: called
    in the thread once the engine is built, or when building or a step raised (the worker then
    stops; requests in flight get no further outputs, the server fails them)."""

    def __init__(
        self,
        build: Callable[[], Engine],
        deliver: Callable[[Delivery], None],
        *,
        on_ready: Callable[[], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
        name: str = "jaxturbo-engine",
    ) -> None:
        self._build, self._deliver = build, deliver
        self._on_ready, self._on_failure = on_ready, on_failure
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.engine: Engine | None = None
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self.stats: EngineStats | None = None
        self._stats_at = 0.0
        self._active: dict[str, int] = {}  # request id -> its samples not finished yet

    # -- any thread ---------------------------------------------------------------------------
    def start(self) -> EngineWorker:
        self._thread.start()
        return self

    def add(self, request_id: str, prompt_ids: list[int], params: RequestParams) -> None:
        self._commands.put(("add", (request_id, prompt_ids, params)))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stop(self, timeout: float | None = 30.0) -> None:
        """Abort whatever runs and end the thread (waits up to `timeout` seconds)."""
        self._commands.put(("stop", None))
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the engine thread --------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.engine = self._build()
            self._refresh_stats(force=True)
        except BaseException as e:  # noqa: BLE001 - reported to the server, which exits
            self._fail(e, "building the engine failed")
            return
        self.ready.set()
        if self._on_ready is not None:
            self._on_ready()
        try:
            self._loop(self.engine)
        except BaseException as e:  # noqa: BLE001 - a bug in a step: fail loudly, not silently
            self._fail(e, "the engine step failed")

    def _fail(self, e: BaseException, what: str) -> None:
        log.error("%s: %s", what, e, exc_info=e)
        self.failed = e
        if self._on_failure is not None:
            self._on_failure(e)

    def _take(self, block: bool) -> list[tuple[str, Any]]:
        cmds = []
        if block:
            try:
                cmds.append(self._commands.get(timeout=IDLE_WAKE_S))
            except queue.Empty:
                return cmds
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                return cmds

    def _loop(self, engine: Engine) -> None:
        while True:
            busy = engine.has_unfinished()
            accepted, rejected = [], []
            for kind, arg in self._take(block=not busy):
                if kind == "add":
                    rid, ids, params = arg
                    try:
                        engine.add_request(ids, params, request_id=rid)
                        accepted.append(rid)
                        self._active[rid] = params.n
                    except Exception as e:  # noqa: BLE001 - the request's error, not the server's
                        rejected.append((rid, e))
                elif kind == "abort":
                    if self._active.pop(arg, None) is not None:
                        engine.abort(arg)
                else:  # stop
                    for rid in list(self._active):
                        engine.abort(rid)
                    self._active.clear()
                    self._refresh_stats(force=True)
                    return
            outputs = engine.step() if engine.has_unfinished() else []
            for o in outputs:
                if o.finished and o.request_id in self._active:
                    self._active[o.request_id] -= 1
                    if not self._active[o.request_id]:
                        del self._active[o.request_id]
            if outputs or accepted or rejected:
                self._deliver(Delivery(time.perf_counter(), outputs, accepted, rejected))
            self._refresh_stats(force=not engine.has_unfinished())

    def _refresh_stats(self, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self._stats_at >= STATS_EVERY_S:
            self.stats = self.engine.stats()
            self._stats_at = now
