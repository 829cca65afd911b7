"""The load generator (`jaxturbo bench serve`) against a live tiny server: W1 token-id prompts and
a prompts file, the report's counts and percentiles; its workload and arrival process alone."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from jaxturbo.cli import bench as bench_cmd
from jaxturbo.cli import main
from jaxturbo.errors import UserError
from jaxturbo.serve import loadgen


def test_w1_run_writes_the_report(tiny_url, tmp_path, capsys):
    out = tmp_path / "w1"
    code = main(
        [
            "bench",
            "serve",
            "--url",
            tiny_url,
            "--w1",
            "--requests",
            "3",
            "--max-tokens",
            "6",
            "--vocab-size",
            "128",
            "--rate",
            "20",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    r = json.loads((out / "result.json").read_text())
    assert (r["requests"], r["completed"], r["failed"]) == (3, 3, 0)
    assert r["output_tokens"] == 3 * 6  # W1 ignores EOS: every token asked for
    assert r["rate"] == 20 and r["model"] == "tiny"
    for key in ("ttft_ms", "itl_ms"):
        p = r[key]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"]
    assert r["e2e_s"]["p50"] * 1e3 > r["ttft_ms"]["p50"]
    assert r["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / r["duration_s"])
    table = (out / "result.md").read_text()
    assert "| time to first token (ms) |" in table and "3/3 requests completed" in table
    assert "3/3 requests completed" in capsys.readouterr().out


def test_prompts_file_concurrency_and_chat(tiny_url, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "hello there"}\n{"prompt": [1, 2, 3]}\nplain text line\n\n')
    reqs = loadgen.file_requests(f, 5, 4)
    assert [q.prompt for q in reqs] == [
        "hello there",
        [1, 2, 3],
        "plain text line",
        "hello there",
        [1, 2, 3],
    ]
    rep = asyncio.run(loadgen.run_load(tiny_url, reqs, concurrency=2, ignore_eos=True))
    assert (rep.completed, rep.failed, rep.output_tokens) == (5, 0, 20)
    text_only = [q for q in reqs if isinstance(q.prompt, str)]
    rep = asyncio.run(
        loadgen.run_load(tiny_url, text_only, endpoint="chat", rate=100.0, ignore_eos=True)
    )
    assert rep.completed == 3 and rep.output_tokens == 12
    with pytest.raises(UserError, match="text prompts"):
        asyncio.run(loadgen.run_load(tiny_url, reqs, endpoint="chat"))
    # a server that refuses every request: all failed, the errors reported
    bad = [loadgen.LoadRequest([500], 2)]  # token id beyond the tiny vocabulary
    rep = asyncio.run(loadgen.run_load(tiny_url, bad))
    assert rep.failed == 1 and "HTTP 400" in rep.errors[0]


def test_w1_workload_and_poisson_arrivals():
    reqs = loadgen.w1_requests(64, vocab_size=1000)
    lengths = [len(q.prompt) for q in reqs]
    assert min(lengths) >= 256 and max(lengths) <= 1024
    assert all(q.max_tokens == 256 for q in reqs)
    # the same lengths as the engine benchmark's W1 (numpy RandomState(0), lengths first)
    rng = np.random.RandomState(0)
    assert lengths == list(rng.randint(256, 1025, size=64))
    assert reqs == loadgen.w1_requests(64, vocab_size=1000)  # deterministic
    t = loadgen.arrival_offsets(4000, rate=50.0, seed=1)
    assert t[0] == 0 and np.all(np.diff(t) >= 0)
    assert np.mean(np.diff(t)) == pytest.approx(1 / 50, rel=0.05)
    assert not loadgen.arrival_offsets(3, math.inf).any()


def test_bench_serve_runs_outside_a_clone(capsys, monkeypatch, tmp_path):
    """The load generator ships in the library: no experiments/ folder needed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench_cmd, "PACKAGE_ROOT", tmp_path / "site-packages")
    assert bench_cmd.experiments_root() is None
    with pytest.raises(SystemExit) as e:
        main(["bench", "serve", "--help"])
    assert e.value.code == 0
    assert "Poisson" in capsys.readouterr().out
    assert main(["bench", "serve", "--url", "http://127.0.0.1:9", "--w1", "--requests", "0"]) == 2
    assert "--requests 0 must be >= 1" in capsys.readouterr().err
