"""Start-up and shutdown: /health answers 503 until the engine's steps are compiled and 200 after;
SIGTERM lets the request in flight finish while new ones get 503, then `jaxturbo serve` exits 0;
a request still running when the grace period ends gets a 503 error event, and the server
stops."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jax
import pytest

from experiments.bench_util import ids_to_text, word_tokenizer
from jaxturbo.bridge import export_hf
from jaxturbo.inference.engine.engine import Engine
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.init import init_params
from jaxturbo.serve.protocol import Limits
from jaxturbo.serve.server import ServeConfig, Server
from tests.inference.engine.models import tiny_model
from tests.serve.helpers import ChatTokenizer, SlowEngine, tiny_engine_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engine():
    """One tiny engine, lent to the in-process servers of this module one after the other."""
    cfg, params = tiny_model(seed=2, max_position_embeddings=4096)
    config = tiny_engine_config(token_buckets=(16,), max_num_batched_tokens=16)  # one shape
    return Engine(
        params, cfg, ChatTokenizer(), config, sort_variants=False, compilation_cache_dir=None
    )


def server_over(build, engine: Engine, **serve) -> Server:
    config = ServeConfig(**{"model_name": "tiny", "port": 0, **serve})
    ec = engine.config
    limits = Limits(
        "tiny",
        ec.max_model_len,
        engine.cfg.vocab_size,
        0,
        False,
        max_samples=ec.max_num_seqs + config.max_queue,
    )
    return Server(build, engine.tokenizer, limits, config, max_num_seqs=ec.max_num_seqs)


BODY = {"model": "tiny", "prompt": "abc", "max_tokens": 4}


def test_health_is_503_until_warm_then_200(engine):
    gate = threading.Event()

    def build():  # stands for the warm-up compilation
        assert gate.wait(60)
        return engine

    server = server_over(build, engine)
    started = threading.Thread(target=server.start, kwargs={"timeout": 120})
    started.start()
    deadline = time.monotonic() + 30
    while server.port == 0 and time.monotonic() < deadline:  # bound before start() returns
        time.sleep(0.01)
    url = server.url
    try:
        r = httpx.get(f"{url}/health", timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        r = httpx.post(f"{url}/v1/completions", json=BODY, timeout=10)
        assert r.status_code == 503 and "GET /health" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
        gate.set()
        started.join(60)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        r = httpx.post(f"{url}/v1/completions", json=BODY, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        gate.set()
        server.shutdown(grace=0)
    assert not server.worker.alive


def test_grace_period_end_fails_the_requests_still_running(engine):
    server = server_over(lambda: SlowEngine(engine, 0.005), engine)  # 1500 tokens: ~8 s
    url = server.start(timeout=120)
    with httpx.Client(base_url=url, timeout=30) as c:
        with c.stream(
            "POST",
            "/v1/completions",
            json={**BODY, "max_tokens": 1500, "ignore_eos": True, "stream": True},
        ) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            stopper = threading.Thread(target=server.shutdown, kwargs={"grace": 0.3})
            t0 = time.monotonic()
            stopper.start()
            events = [ln for ln in lines if ln.startswith("data: ")]
    stopper.join(60)
    assert time.monotonic() - t0 < 20
    assert events[-1] == "data: [DONE]"
    err = json.loads(events[-2][6:])["error"]
    assert err["code"] == "shutting_down" and "grace period" in err["message"]
    assert not server.worker.alive
    with pytest.raises(httpx.ConnectError):  # the listener is closed
        httpx.get(f"{url}/health", timeout=5)
    assert not engine.has_unfinished()  # aborted, its pages freed
    assert engine.stats().kv_pages_used == 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small random Llama with a word-level tokenizer, as an HF directory (what --model
    takes): big enough that a few hundred tokens take seconds on a CPU."""
    cfg = ModelConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
    )
    params = init_params(cfg, jax.random.key(0))
    return export_hf(
        params,
        cfg,
        tmp_path_factory.mktemp("serve") / "model",
        tokenizer=word_tokenizer(cfg.vocab_size),
    )


def _lines(stream, q: queue.Queue) -> None:
    for line in stream:
        q.put(line)
    q.put(None)


NEW = 200  # tokens of the request in flight: seconds of decoding on a CPU


def test_sigterm_finishes_the_request_in_flight_refuses_new_ones_and_exits_0(model_dir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "jaxturbo.cli",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        "0",
        "--served-model-name",
        "tiny",
        "--max-num-seqs",
        "2",
        "--max-num-batched-tokens",
        "16",
        "--token-buckets",
        "16",
        "--seq-buckets",
        "2",
        "--num-pages",
        "300",
        "--max-model-len",
        "2048",
        "--no-top-k-top-p",
        "--max-logprobs",
        "0",
        "--shutdown-grace",
        "60",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    out: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True).start()
    try:
        url = None
        deadline = time.monotonic() + 300
        while url is None and time.monotonic() < deadline:
            try:
                line = out.get(timeout=1)
            except queue.Empty:
                continue
            assert line is not None, f"the server exited: {proc.wait()} {proc.stderr.read()}"
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            url = m and m.group(1)
        assert url, "the server did not print its address"
        assert httpx.get(f"{url}/health").status_code == 200
        body = {
            "model": "tiny",
            "prompt": ids_to_text([1, 2, 3]),
            "max_tokens": NEW,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.Client(base_url=url, timeout=120) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: {")
                proc.send_signal(signal.SIGTERM)
                for _ in range(200):  # the drain has begun once /health says so
                    h = httpx.get(f"{url}/health", timeout=10)
                    if h.status_code == 503:
                        break
                    time.sleep(0.02)
                assert h.json()["error"]["code"] == "shutting_down"
                refused = httpx.post(
                    f"{url}/v1/completions",
                    timeout=10,
                    json={"model": "tiny", "prompt": "w1", "max_tokens": 2},
                )
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "shutting_down"
                # ... while the first request is still being generated
                m = httpx.get(f"{url}/metrics", timeout=10).text
                assert "jaxturbo_requests_in_flight 1.0" in m
                events = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {")]
        finishes = [c["finish_reason"] for e in events for c in e["choices"]]
        assert finishes[-1] == "length"  # the request in flight ran to its end
        assert events[-1]["usage"]["completion_tokens"] == NEW
        assert proc.wait(timeout=120) == 0
        err = proc.stderr.read()
        assert "SIGTERM" in err and "stopped" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_flags_and_a_taken_port_are_one_line_errors(capsys):
    from jaxturbo.cli import main
    from jaxturbo.errors import UserError
    from tests.serve.helpers import tiny_server

    # checked before the model loads: the model name is never looked up
    assert main(["serve", "--model", "no-such-model", "--max-logprobs", "50"]) == 2
    assert "--max-logprobs 50 must be in [0, 20]" in capsys.readouterr().err
    assert main(["serve", "--model", "no-such-model", "--decode-steps", "0"]) == 2
    assert "--decode-steps 0 must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--model", "no-such-model", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}"):
            tiny_server(port=port).start(timeout=10)
