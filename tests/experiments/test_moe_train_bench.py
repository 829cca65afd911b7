"""experiments/moe/train_bench.py's CPU preset: a full and a LoRA row run, and the active-FLOP
count matches the parameter shapes."""

from __future__ import annotations

import json
import math

import jax
import pytest

from experiments.moe import train_bench
from jaxturbo.models.init import init_params


def test_active_params_count_the_routed_experts_only():
    cfg = train_bench.PRESETS["cpu"]["cfg"]
    layers = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))["layers"]
    m = cfg.moe
    per_token = sum(
        math.prod(s.shape)
        for n, s in layers.items()
        if n.startswith("self_attn.") and n.endswith("proj.weight")
    )
    per_token += math.prod(layers["mlp.gate.weight"].shape)
    per_token += (
        sum(math.prod(layers[f"mlp.experts.{p}_proj.weight"].shape) for p in ("gate", "up", "down"))
        * m.num_experts_per_tok
        // m.num_experts
    )
    per_token += cfg.vocab_size * cfg.hidden_size
    assert train_bench.active_matmul_params(cfg) == per_token < cfg.num_params()
    full, lora = (train_bench.flops_per_token(cfg, 128, r) for r in (0, 8))
    assert 0.6 * full < lora < 0.75 * full  # no weight gradients: about 4/6 of the FLOPs


def test_cpu_preset_times_full_and_lora_rows(tmp_path):
    assert train_bench.main(["--preset", "cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "train_cpu.json").read_text())
    rows = {r["mode"]: r for r in data["rows"]}
    assert set(rows) == {"full", "lora"} and not any("error" in r for r in rows.values())
    meta = data["meta"]
    assert meta["dense_tflops"] > 0 and meta["peak_bf16_tflops"] is None  # CPU: no peak
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["mfu_peak"] is None
        # MFU against the matmul rate measured in the run: the same FLOPs over both rates
        assert r["mfu_dense"] == pytest.approx(r["tflops_per_s"] / meta["dense_tflops"])
        assert abs(r["first_loss"] - math.log(4096)) < 1.0  # random weights: about ln V
    assert rows["lora"]["trained_params"] < rows["full"]["trained_params"] / 10
    assert meta["lora_over_full"] == {
        "batch 2": pytest.approx(
            rows["lora"]["tokens_per_s"] / rows["full"]["tokens_per_s"], abs=1e-3
        )
    }
    assert (tmp_path / "train_cpu.md").read_text().startswith("### MoE train step")


def test_run_specs_parse_options_in_any_order():
    assert train_bench.parse_run("full,4") == ("full", 4, "custom", "scan")
    assert train_bench.parse_run("lora,1,unrolled,autodiff") == ("lora", 1, "autodiff", "unrolled")
    for bad in ("full", "dense,1", "full,x", "full,1,fast"):
        with pytest.raises(SystemExit, match="run"):
            train_bench.parse_run(bad)


def test_hlo_copies_counts_copy_instructions_outside_fusion_bodies():
    """What train_bench --trace reports of a compiled step: returning an input unchanged (x) or
    in another dtype's buffer (y) compiles to copy instructions; the transposed output is a
    fusion whose body copies, which is one kernel, not a memcpy."""
    import jax.numpy as jnp

    from experiments.bench_util import hlo_copies

    f = jax.jit(lambda x, y: (x.T + 1, y, x))
    text = f.lower(jnp.ones((64, 32)), jnp.ones(3, jnp.bfloat16)).compile().as_text()
    got = hlo_copies(text)
    assert got["copies"] == 2 and got["bytes"] == 64 * 32 * 4 + 3 * 2
    assert {(r["dtype"], r["shape"]) for r in got["top"]} == {("f32", "64,32"), ("bf16", "3")}
