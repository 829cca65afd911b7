"""Live servers for the serving tests: tiny random models (and a test tokenizer with a chat
template) served from a background thread on a free loopback port."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx

from jaxturbo.inference.engine.config import EngineConfig
from jaxturbo.inference.engine.engine import Engine
from jaxturbo.serve.protocol import Limits
from jaxturbo.serve.server import ServeConfig, Server, chat_stop_ids
from tests.inference.engine.models import tiny_model

START_TIMEOUT_S = 600  # warm-up compilation on a busy 2-core machine


class ChatTokenizer:
    """Token id = one UTF-8 byte (a multi-byte character spans several tokens, and a prefix of
    them decodes to U+FFFD, as with byte-level BPE), and a chat template that writes
    "[role]content" turns and the "[assistant]" header.  ASCII text encodes below 128, so it
    suits a vocabulary of 128 as well as one of 256."""

    chat_template = "[role]content"
    eos_token_id = None
    unk_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        text = "".join(f"[{m['role']}]{m['content']}" for m in messages)
        return text + ("[assistant]" if add_generation_prompt else "")

    def convert_tokens_to_ids(self, token: str) -> None:
        return None


def tiny_engine_config(**kw: Any) -> EngineConfig:
    """Two compiled step shapes (T=16 decode steps, T=64 prefill chunks; S=8)."""
    base = dict(
        page_size=16,
        num_pages=512,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=2048,
        token_buckets=(16, 64),
        seq_buckets=(8,),
    )
    return EngineConfig(**{**base, **kw})


class SlowEngine:
    """An engine that pauses before each step, so that a tiny model's requests stay in flight
    long enough for a test to act on them (everything else is the engine's)."""

    def __init__(self, engine: Engine, delay_s: float) -> None:
        self.engine, self.delay_s = engine, delay_s

    def step(self):
        time.sleep(self.delay_s)
        return self.engine.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def tiny_server(
    *,
    tokenizer: Any = None,
    engine: dict | None = None,
    max_logprobs: int = 5,
    sort_variants: bool = False,
    step_delay_s: float = 0.0,
    vocab_size: int = 128,
    **serve: Any,
) -> Server:
    """A Server over a tiny random model (vocab 128, context 4096) on a free port, not started;
    step_delay_s: a pause before each engine step (`SlowEngine`)."""
    cfg, params = tiny_model(seed=1, max_position_embeddings=4096, vocab_size=vocab_size)
    config = ServeConfig(**{"model_name": "tiny", "port": 0, **serve})
    tokenizer = tokenizer or ChatTokenizer()
    ec = tiny_engine_config(**(engine or {}))

    def build() -> Engine:
        e = Engine(
            params,
            cfg,
            tokenizer,
            ec,
            max_top_logprobs=max_logprobs,
            sort_variants=sort_variants,
            compilation_cache_dir=None,
        )
        return SlowEngine(e, step_delay_s) if step_delay_s else e

    limits = Limits(
        "tiny",
        ec.max_model_len,
        cfg.vocab_size,
        max_logprobs,
        sort_variants,
        max_samples=ec.max_num_seqs + config.max_queue,
    )
    return Server(
        build,
        tokenizer,
        limits,
        config,
        max_num_seqs=ec.max_num_seqs,
        chat_stop_ids=chat_stop_ids(cfg, tokenizer),
    )


@contextlib.contextmanager
def running(server: Server) -> Iterator[str]:
    """Start the server (background thread) and shut it down afterwards; yields its URL."""
    url = server.start(timeout=START_TIMEOUT_S)
    try:
        yield url
    finally:
        server.shutdown(grace=0.0, timeout=60)


def metric(text: str, name: str) -> float:
    """The value of an unlabelled metric in Prometheus text."""
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def wait_idle(url: str, timeout: float = 30.0, headers: dict | None = None) -> str:
    """Poll /metrics until no request runs, waits or holds a KV page; returns the metrics text."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{url}/metrics", headers=headers).text
        busy = (
            metric(text, "jaxturbo_num_requests_running"),
            metric(text, "jaxturbo_num_requests_waiting"),
            metric(text, "jaxturbo_kv_pages_used"),
            metric(text, "jaxturbo_requests_in_flight"),
        )
        if not any(busy) or time.monotonic() > deadline:
            return text
        time.sleep(0.1)
