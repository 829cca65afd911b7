"""experiments/serve/bench.py's CPU preset: the tiny shape's W1 offline and served over HTTP (all at
once, and Poisson at half the offline rate) in one run; the result files hold every request's
tokens, the ratio to offline and the latency percentiles, and the engine ends idle."""

from __future__ import annotations

import json
import os

import pytest


@pytest.fixture(scope="module")
def bench():
    """The bench module, imported without leaving its XLA flags in this process's env."""
    saved = os.environ.get("XLA_FLAGS")
    try:
        from experiments.serve import bench
    finally:
        if saved is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = saved
    return bench


def test_cpu_preset_serves_w1_and_reports_the_ratio_and_latencies(bench, tmp_path):
    out = tmp_path / "serve"
    assert bench.main(["--preset", "cpu", "--requests", "6", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["system"]: r for r in data["rows"]}
    new = bench.PRESETS["cpu"]["w1"]["new"]
    offline = rows["offline: Engine.generate"]
    assert offline["output_tokens"] == 6 * new and offline["output_tokens_per_s"] > 0
    served = [rows["served: all at once"], rows["served: Poisson at half the offline throughput"]]
    assert served[0]["rate_rps"] == "inf"
    # half the offline throughput, in requests/s
    assert served[1]["rate_rps"] == pytest.approx(0.5 * 6 / offline["wall_s"])
    for r in served:
        assert r["completed"] == "6/6" and not r["errors"]
        assert r["output_tokens"] == 6 * new  # EOS ignored: every token asked for
        assert r["of_offline"] == pytest.approx(
            r["output_tokens_per_s"] / offline["output_tokens_per_s"]
        )
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"]
        assert 0 < r["itl_p50_ms"] <= r["itl_p99_ms"]
        assert r["e2e_p50_s"] * 1e3 > r["ttft_p50_ms"]
        assert r["steps"] >= new  # the server's own engine steps, one token per sample each
    assert data["meta"]["engine_after"] == {"kv_pages_used": 0, "num_running": 0}
    assert all(r["latency"]["ttft_ms"]["p90"] <= r["ttft_p99_ms"] for r in served)
    assert out.with_suffix(".png").stat().st_size > 0  # the latency plot
    md = out.with_suffix(".md").read_text()
    assert md.startswith("### jaxturbo serve vs the engine offline")
    assert "| served: all at once | inf | 6/6 |" in md
