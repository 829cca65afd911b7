"""experiments/ladder/bench.py end to end on the cpu-8 mesh: TP 8 decodes the same greedy tokens
as TP 1 in each residual mode with the fused weight layout the benchmark times (the random
model is the same at every TP size), the bench's own cross-TP check says so, and the table,
JSON and plot are written; desync (no all-reduces) runs and is not checked across TP sizes.
Also the check's and the timing's failure rules, and the presets' named shapes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments.ladder import bench as ladder_bench
from jaxturbo.models.shapes import shape

ROOT = Path(__file__).resolve().parents[2]


def test_ladder_bench_tp8_matches_tp1(tmp_path):
    out = tmp_path / "bench"
    # --new-tokens 32: the decode steps well above the timing noise of a shared CPU (the bench
    # fails on a decode time that is not positive)
    cmd = [
        sys.executable,
        "-m",
        "experiments.ladder.bench",
        "--preset",
        "tiny",
        "--tp",
        "1,8",
        "--residual",
        "standard,ladder,desync",
        "--dtype",
        "float32",
        "--reps",
        "3",
        "--prompt",
        "16",
        "--new-tokens",
        "32",
        "--out",
        str(out),
        "--projections",
        "fused",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((out / "results.json").read_text())
    by = {(r["residual"], r["tp"]): r for r in rows}
    assert set(by) == {(m, tp) for m in ("standard", "ladder", "desync") for tp in (1, 8)}
    assert all(r["xla_preset"] == "default+fusedproj" for r in rows)
    for mode in ("standard", "ladder"):
        assert len(by[(mode, 1)]["first_tokens"]) == 16
        assert by[(mode, 8)]["first_tokens"] == by[(mode, 1)]["first_tokens"], mode
        assert by[(mode, 8)]["tokens_per_s"] > 0 and by[(mode, 8)]["decode_s"] > 0
        check = by[(mode, 8)]["tp_check"]
        assert check["ok"] and check["ref_tp"] == 1 and check["tokens_agree"] == 16, check
        assert check["logits_rel_err"] <= ladder_bench.EXACT_TOL
        assert by[(mode, 1)]["tp_check"] == dict(ok=True, why="reference")
    # ladder is a different model from standard: the check above would pass vacuously otherwise
    assert by[("ladder", 1)]["mean_logp"] != by[("standard", 1)]["mean_logp"]
    assert by[("ladder", 1)]["first_tokens"] != by[("standard", 1)]["first_tokens"]
    # desync at TP 1 has no all-reduce to skip: the standard model; at TP 8 another function
    assert by[("desync", 1)]["first_tokens"] == by[("standard", 1)]["first_tokens"]
    assert (
        by[("desync", 8)]["tp_check"]["ok"]
        and "not checked" in by[("desync", 8)]["tp_check"]["why"]
    )
    assert by[("desync", 8)]["mean_logp"] != by[("standard", 8)]["mean_logp"]
    md = (out / "results.md").read_text()
    assert "| ladder | 8 | 1 |" in md and "| 1: ok, 16/16 tokens" in md
    assert (out / "tokens_per_s.png").stat().st_size > 0


def _run(tp, tokens, logits, logp=None):
    return dict(tp=tp, tokens=tokens, logits=np.asarray(logits, np.float64), logp=logp)


def test_same_model_check_rules():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=512) * 2
    toks = list(range(8))
    ref = _run(1, toks, logits, logp=[-5.0] * 8)
    check = ladder_bench.same_model_check
    # the same run: agrees exactly
    same = check(ref, _run(8, toks, logits + 1e-6, logp=[-5.0] * 8), exact=True)
    assert same["ok"] and same["tokens_agree"] == 8 and same["why"] == "same tokens"
    # another model: logits off by O(1), whatever the tokens
    other = check(ref, _run(8, toks, rng.normal(size=512) * 2), exact=False)
    assert not other["ok"] and "not the same model" in other["why"]
    # float32 on CPU: tokens that part anywhere fail
    late = _run(8, toks[:5] + [99, 98, 97], logits + 1e-6, logp=[-5.0] * 8)
    assert "part at token 5 of 8" in check(ref, late, exact=True)["why"]
    # ... log-probs too
    off = check(ref, _run(8, toks, logits, logp=[-5.0] * 7 + [-4.0]), exact=True)
    assert not off["ok"] and "log-probs" in off["why"]
    # bf16: parting later at a near tie is rounding
    rounded = check(ref, _run(8, toks[:5] + [99, 98, 97], logits * 1.01), exact=False)
    assert rounded["ok"] and rounded["tokens_agree"] == 5 and "near tie" in rounded["why"]
    # ... but not at the first token when the logits' top-2 margin forbids a flip
    clear = logits.copy()
    clear[np.argmax(clear)] += 5.0
    flip = check(_run(1, toks, clear), _run(8, [99] + toks[1:], clear * 1.001), exact=False)
    assert not flip["ok"] and "top-2 margin" in flip["why"]
    tie = logits.copy()
    a, b = np.argsort(tie)[-2:]
    tie[a] = tie[b] - 1e-3
    assert check(_run(1, toks, tie), _run(8, [99] + toks[1:], tie * 1.001), exact=False)["ok"]
    rows = [
        dict(residual="ladder", tp=8, batch=1, xla_preset="default", p2p=True, tp_check=flip),
        dict(residual="ladder", tp=1, batch=1, tp_check=same),
    ]
    assert ladder_bench.check_failures(rows) == [
        f"ladder TP 8 batch 1 (default, P2P on) against TP 1: {flip['why']}"
    ]


def test_decode_time_must_be_positive():
    """A generate timed no longer than its prefill alone raises instead of printing an
    arbitrary tokens/s (it used to be clamped to 1e-9 s)."""
    with pytest.raises(RuntimeError, match=r"decode time .* <= 0.*raise --new-tokens"):
        ladder_bench.decode_seconds(lambda: time.sleep(0.02), lambda: None, reps=1)
    pre, gen, dec = ladder_bench.decode_seconds(lambda: None, lambda: time.sleep(0.01), reps=3)
    assert gen >= 0.01 and 0 < dec <= gen and pre < gen


def test_presets_are_the_named_shapes():
    """8b and 70b are the shapes table's Llama-3 entries; tiny is its tiny shape, shrunk to
    run on the cpu-8 mesh at every TP up to 8."""
    assert ladder_bench.preset_config("8b") == shape("llama3-8b")
    assert ladder_bench.preset_config("70b") == shape("llama3-70b")
    tiny = ladder_bench.preset_config("tiny")
    assert tiny.num_key_value_heads == 8 and tiny.hidden_size == 128
    assert tiny.num_hidden_layers == shape("tiny").num_hidden_layers
    assert ladder_bench.MODES == ("standard", "ladder", "parallel", "desync")
    assert ladder_bench.PROJECTIONS == ("separate", "fused")
