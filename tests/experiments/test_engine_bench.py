"""experiments/engine/bench.py's CPU preset: every workload and system runs on the tiny shape
and the result files say what the engine did (prefix caching computes fewer prompt tokens)."""

from __future__ import annotations

import json
import os

import pytest


@pytest.fixture(scope="module")
def bench():
    """The bench module, imported without leaving its XLA flags in this process's env."""
    saved = os.environ.get("XLA_FLAGS")
    try:
        from experiments.engine import bench
    finally:
        if saved is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = saved
    return bench


def test_cpu_preset_runs_every_workload(bench, tmp_path):
    out = tmp_path / "engine"
    assert bench.main(["--preset", "cpu", "--decode-steps", "1,4", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["workload"], r["system"]): r for r in data["rows"]}
    for key in [
        ("w1", "engine"),
        ("w1", "engine, synchronous scheduling"),
        ("w1", "engine, dispatch thread, 4 decode steps per launch"),
        ("w1", "static generate b=4"),
        ("latency", "engine"),
        ("latency", "static generate b=1"),
        ("latency", "floor"),
    ]:
        assert key in rows, key
    assert ("w1", "transformers") in rows or "hf" in data["meta"]  # torch-less: said so
    w1 = rows[("w1", "engine")]
    assert w1["output_tokens_per_s"] > 0 and 0 < w1["floor_s"] < w1["wall_s"] * 10
    on = rows[("w2", "engine, prefix cache on")]
    off = rows[("w2", "engine, prefix cache off")]
    assert on["prompt_tokens_requested"] == off["prompt_tokens_requested"] == 2 * 4 * 40
    assert off["prompt_tokens_computed"] == off["prompt_tokens_requested"]
    assert on["prompt_tokens_computed"] < off["prompt_tokens_computed"]
    assert out.with_suffix(".md").read_text().startswith("### Inference engine")
