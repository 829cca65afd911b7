"""An OpenAI-compatible server over the inference engine: uvicorn + the engine's thread.

    server = Server.from_model(params, cfg, tokenizer, EngineConfig(max_num_seqs=64),
                               ServeConfig(model_name="smollm2-135m", port=8000))
    server.run()                       # blocking; SIGTERM / Ctrl-C drain and return 0
    # or, in a program or a test:
    url = server.start()               # a background thread; returns once warm-up is done
    ...                                # openai.OpenAI(base_url=url + "/v1", api_key="-")
    server.shutdown()                  # the same graceful drain

Start-up: the socket is bound first (port 0 picks a free port, no race: the bound socket is
handed to uvicorn), HTTP answers at once (/health 503 "starting"), the engine is built and
compiles every step shape in its own thread; when that is done, /health answers 200 and
`on_ready` runs (the CLI prints the address there).

Shutdown (SIGTERM, SIGINT, or `shutdown()`): new requests get 503 while the listener stays open;
the requests in flight run to completion for up to `shutdown_grace` seconds, then the rest are
ended with a 503 error; then uvicorn exits and the engine thread stops.  A second signal cuts
the grace period short.  `run()` returns 0 after a clean shutdown, 1 if the engine failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from jaxturbo.data.chat import has_chat_template, stop_ids_for
from jaxturbo.errors import UserError
from jaxturbo.inference.engine.config import EngineConfig
from jaxturbo.inference.engine.engine import Engine
from jaxturbo.serve.app import build_app
from jaxturbo.serve.frontend import Frontend
from jaxturbo.serve.protocol import Limits
from jaxturbo.serve.worker import EngineWorker

log = logging.getLogger(__name__)

# The engine thread and the event loop share the GIL; when the engine's step returns from the
# device, it waits for the loop to yield the GIL for up to this long (Python's default is 5 ms,
# a whole decode step of a small model).
SWITCH_INTERVAL_S = 0.0005


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Settings of the HTTP side.

    model_name: the name clients give as `model` (GET /v1/models lists it).  host / port: where
    to listen (port 0: a free port).  api_key: required as a bearer token on /v1 routes (None:
    open).  max_queue: samples that may wait for a running slot beyond the engine's
    max_num_seqs before requests are refused with 429.  shutdown_grace: seconds requests in
    flight may take to finish after a shutdown signal.  log_level: uvicorn's."""

    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 256
    shutdown_grace: float = 30.0
    log_level: str = "warning"

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise UserError(f"port={self.port} must be in [0, 65535] (0: a free port)")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise UserError(f"max_queue={self.max_queue} must be an integer >= 0")
        if not self.shutdown_grace >= 0:
            raise UserError(f"shutdown_grace={self.shutdown_grace} must be >= 0 seconds")
        if not self.model_name:
            raise UserError("model_name must be a non-empty string")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 binds a free port (read it back from
    `getsockname()`), so nothing can take it between choosing and listening."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"host={host!r} does not resolve: {e}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (0: a free one)"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn whose signals start the server's drain instead of closing the listener at once,
    and which exits once the drain is done (or the engine failed)."""

    def __init__(self, config: uvicorn.Config, owner: Server) -> None:
        super().__init__(config)
        self.owner = owner

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        original = {s: signal.signal(s, self.owner.on_signal) for s in sigs}
        try:
            yield
        finally:  # restored, and not re-raised: the shutdown was the signal's whole effect
            for s, handler in original.items():
                signal.signal(s, handler)

    async def on_tick(self, counter: int) -> bool:
        front = self.owner.front
        if front.failure is not None or (front.draining and front.drained()):
            self.should_exit = True
        return await super().on_tick(counter)


class Server:
    """An OpenAI-compatible HTTP server over an engine built by `build_engine` (called in the
    engine's thread).  Use `from_model` or `from_engine` (see the module docstring)."""

    def __init__(
        self,
        build_engine: Callable[[], Engine],
        tokenizer: Any,
        limits: Limits,
        config: ServeConfig,
        *,
        max_num_seqs: int,
        chat_stop_ids: tuple[int, ...] = (),
        on_ready: Callable[[Server], None] | None = None,
    ) -> None:
        self.config = config
        self.front = Frontend(
            limits,
            tokenizer,
            capacity=max_num_seqs + config.max_queue,
            api_key=config.api_key,
            chat_stop_ids=chat_stop_ids,
        )
        self.worker = EngineWorker(
            build_engine,
            self.front.deliver,
            on_ready=self.front.engine_ready,
            on_failure=self.front.engine_failed,
        )
        self.front.worker = self.worker
        self.front.on_ready = self._ready
        self.app = build_app(self.front)
        self._user_on_ready = on_ready
        self._ready_event = threading.Event()
        self._signals = 0
        self._thread: threading.Thread | None = None
        self._uvicorn: _Uvicorn | None = None
        self.host, self.port = config.host, config.port

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        params: Any,
        cfg: Any,
        tokenizer: Any,
        engine_config: EngineConfig,
        config: ServeConfig,
        *,
        mesh: Any = None,
        kv_dtype: Any = None,
        max_logprobs: int = 20,
        sort_variants: bool = True,
        compilation_cache_dir: Any = "default",
        seed: int = 0,
        on_ready: Callable[[Server], None] | None = None,
    ) -> Server:
        """A server whose engine (params placed, every step compiled) is built in the engine
        thread after the HTTP side is up; the arguments are `Engine`'s."""
        if engine_config.max_model_len > cfg.max_position_embeddings:
            raise UserError(
                f"max_model_len={engine_config.max_model_len} exceeds the model's "
                f"context of {cfg.max_position_embeddings} tokens"
            )

        def build() -> Engine:
            return Engine(
                params,
                cfg,
                tokenizer,
                engine_config,
                mesh,
                kv_dtype=kv_dtype,
                max_top_logprobs=max_logprobs,
                sort_variants=sort_variants,
                compilation_cache_dir=compilation_cache_dir,
                seed=seed,
            )

        limits = Limits(
            config.model_name,
            engine_config.max_model_len,
            cfg.vocab_size,
            max_logprobs,
            sort_variants,
            max_samples=engine_config.max_num_seqs + config.max_queue,
        )
        return cls(
            build,
            tokenizer,
            limits,
            config,
            max_num_seqs=engine_config.max_num_seqs,
            chat_stop_ids=chat_stop_ids(cfg, tokenizer),
            on_ready=on_ready,
        )

    @classmethod
    def from_engine(
        cls,
        engine: Engine,
        config: ServeConfig,
        *,
        on_ready: Callable[[Server], None] | None = None,
    ) -> Server:
        """A server over an engine built already (idle; from now on only the server's engine
        thread may use it)."""
        ec = engine.config
        limits = Limits(
            config.model_name,
            ec.max_model_len,
            engine.cfg.vocab_size,
            engine.runner.num_top,
            engine.runner.sort_variants,
            max_samples=ec.max_num_seqs + config.max_queue,
        )
        return cls(
            lambda: engine,
            engine.tokenizer,
            limits,
            config,
            max_num_seqs=ec.max_num_seqs,
            chat_stop_ids=chat_stop_ids(engine.cfg, engine.tokenizer),
            on_ready=on_ready,
        )

    # -- running ----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _ready(self) -> None:
        self._ready_event.set()
        if self._user_on_ready is not None:
            self._user_on_ready(self)

    def _prepare(self) -> socket.socket:
        sock = bind_socket(self.config.host, self.config.port)
        self.port = sock.getsockname()[1]
        uv_config = uvicorn.Config(
            self.app,
            log_level=self.config.log_level,
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_keep_alive=30,
        )
        self._uvicorn = _Uvicorn(uv_config, self)
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        return sock

    async def _serve(self, sock: socket.socket) -> None:
        self.front.loop = asyncio.get_running_loop()
        self.worker.start()
        await self._uvicorn.serve(sockets=[sock])

    def _run_loop(self, sock: socket.socket) -> None:
        try:
            loop_factory = self._uvicorn.config.get_loop_factory()
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                runner.run(self._serve(sock))
        finally:
            self.worker.stop()
            self._ready_event.set()  # a start() still waiting: the failure is in front.failure

    def run(self) -> int:
        """Serve until SIGTERM / SIGINT (blocking; call from the main thread for the signals).
        0 after a clean shutdown, 1 if the engine failed; a UserError from building the engine
        (bad settings) is raised."""
        self._run_loop(self._prepare())
        e = self.front.failure
        if isinstance(e, UserError):
            raise e
        return 0 if e is None else 1

    def start(self, timeout: float | None = None) -> str:
        """Serve from a background thread; returns the base URL once the engine is warm.  Raises
        the engine's error if it failed to build."""
        sock = self._prepare()
        self._thread = threading.Thread(
            target=self._run_loop, args=(sock,), name="jaxturbo-serve", daemon=True
        )
        self._thread.start()
        if not self._ready_event.wait(timeout):
            raise TimeoutError(f"the server did not become ready within {timeout} s")
        if self.front.failure is not None:
            self._thread.join(10)
            raise self.front.failure
        return self.url

    def shutdown(self, grace: float | None = None, timeout: float | None = 60.0) -> None:
        """The graceful shutdown of a `start()`ed server (any thread): drain for `grace`
        seconds (default: the config's), then stop; waits for the server thread."""
        loop = self.front.loop
        if loop is not None and not loop.is_closed():
            g = self.config.shutdown_grace if grace is None else grace
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self.front.begin_drain, g)
        if self._thread is not None:
            self._thread.join(timeout)

    def on_signal(self, sig: int, frame: Any) -> None:
        """SIGTERM / SIGINT: the first starts the drain, the next ends the grace period."""
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals == 1:
            print(
                f"jaxturbo serve: {name}: no new requests; finishing {self.front.num_requests} "
                f"in flight (up to {self.config.shutdown_grace:g} s)",
                file=sys.stderr,
                flush=True,
            )
            self.front.begin_drain(self.config.shutdown_grace)
        else:
            print(
                f"jaxturbo serve: {name} again: ending the requests in flight now",
                file=sys.stderr,
                flush=True,
            )
            self.front.drain_deadline = 0.0
            if self._signals > 2 and self._uvicorn is not None:
                self._uvicorn.force_exit = self._uvicorn.should_exit = True


def chat_stop_ids(cfg: Any, tokenizer: Any) -> tuple[int, ...]:
    """The tokens a chat turn ends at (eos + the template's end-of-turn markers); none without
    a chat template."""
    if tokenizer is None or not has_chat_template(tokenizer):
        return ()
    return tuple(stop_ids_for(cfg, tokenizer))
