"""experiments/rl/rollout_bench.py's CPU preset: the static sampler and the engine (one and
several decode steps per launch) sample the same number of tokens, and the result files say
how many launches each engine variant took."""

from __future__ import annotations

import json

import pytest


def test_cpu_preset_compares_the_rollout_engines(tmp_path):
    from experiments.rl import rollout_bench

    out = tmp_path / "rollouts"
    assert rollout_bench.main(["--preset", "cpu", "--decode-steps", "1,4", "--out", str(out)]) == 0
    rows = {r["system"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    static = rows["static sampler (jax)"]
    one, four = rows["engine, 1 decode step per launch"], rows["engine, 4 decode steps per launch"]
    p = rollout_bench.PRESETS["cpu"]
    tokens = p["prompts"] * p["group"] * p["new"]  # no stop token: every sample runs to `new`
    assert static["tokens"] == one["tokens"] == four["tokens"] == tokens
    # one prefill launch, then one decode launch per token (1) or per 4 tokens (4)
    assert one["launches"] == p["new"]
    assert four["launches"] < one["launches"]
    assert set(one["host_ms"]) >= {"schedule", "launch", "fetch", "resolve", "emit"}
    assert out.with_suffix(".md").read_text().startswith("### GRPO rollout engines")


def test_bad_decode_steps_are_refused_naming_the_flag(capsys):
    from experiments.rl import rollout_bench

    with pytest.raises(SystemExit) as e:
        rollout_bench.main(["--decode-steps", "1,0"])
    assert e.value.code == 2
    assert "--decode-steps 1,0: comma-separated integers >= 1" in capsys.readouterr().err
