"""experiments/mla/decode_bench.py's model mode on CPU: a tiny GQA original against a tiny
DeepSeek-V3 directory (random MLA weights, latent 20 + rope 4) and a conversion the bench makes
itself with convert-mla; rows, ratios, dispatch paths, KV bytes and files are checked."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import pytest


@pytest.fixture(scope="module")
def bench():
    """The bench module, imported without leaving its XLA flags in this process's env."""
    saved = os.environ.get("XLA_FLAGS")
    try:
        from experiments.mla import decode_bench
    finally:
        if saved is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = saved
    return decode_bench


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, bench):
    """(GQA original dir with a character tokenizer, DeepSeek-V3 dir, its MLAConfig)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from jaxturbo.bridge.deepseek import save_deepseek
    from jaxturbo.bridge.hf import save_hf
    from jaxturbo.models.config import ModelConfig
    from jaxturbo.models.init import init_params
    from jaxturbo.models.mla import MLAConfig

    root = tmp_path_factory.mktemp("mla-bench")
    cfg = ModelConfig(
        model_type="llama",
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    vocab = {"<unk>": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        unk_token="<unk>",
    )
    original = save_hf(init_params(cfg, jax.random.key(0)), cfg, root / "original", tok)
    mcfg = MLAConfig(
        base=cfg,
        kv_lora_rank=20,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        latent_norm=False,
    )
    mparams = bench.init_mla_params(mcfg, jax.random.key(1), jnp.float32)
    mla = save_deepseek(mparams, mcfg, root / "mla")
    return original, mla, mcfg


def test_bench_models_mode_cpu(bench, tiny_dirs, tmp_path):
    original, mla, mcfg = tiny_dirs
    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "out" / "decode_converted"
    code = bench.main(
        [
            "--preset",
            "models-cpu",
            "--original",
            str(original),
            "--converted",
            str(mla),
            "--convert",
            "care-uniform",
            "--kv-budget",
            "0.5",
            "--convert-dir",
            str(tmp_path / "converted"),
            "--convert-args",
            f"--calib-data {data} --calib-samples 4 --calib-len 32",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    converted = tmp_path / "converted" / "original-care-uniform-kv0.5"
    assert (converted / "config.json").is_file()
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()
    assert {(r["model"], r["context"]) for r in rows} == {
        (m, c) for m in ("original", "mla", converted.name) for c in (40, 100)
    }
    by = {(r["model"], r["context"]): r for r in rows}
    for ctx in (40, 100):
        assert by[("original", ctx)]["speedup_vs_original"] == 1.0
        for m in ("mla", converted.name):
            r = by[(m, ctx)]
            assert r["speedup_vs_original"] == pytest.approx(
                r["tokens_per_s"] / by[("original", ctx)]["tokens_per_s"]
            )
            assert r["decode_path"] == "xla"  # from the dispatch record: "auto" on a CPU
    assert all(r["ms_per_step"] > 0 and r["peak_MiB"] > 0 for r in rows)
    assert by[("original", 40)]["decode_path"] == "xla"
    # bytes per token over all layers, float32: GQA 2*K*hd, MLA R + dr (per layer)
    assert by[("original", 40)]["kv_bytes_per_token"] == 2 * 2 * 2 * 8 * 4
    assert by[("mla", 40)]["kv_bytes_per_token"] == 2 * (32 + 4) * 4  # latent 20 stored 32 wide
    conv = by[(converted.name, 40)]
    assert conv["kv_bytes_per_token_ranks"] <= 0.5 * by[("original", 40)]["kv_bytes_per_token"]
    assert conv["conversion"]["method"] == "care" and conv["conversion"]["kv_budget"] == 0.5


def test_bench_models_mode_rejects_bad_input(bench, tiny_dirs, capsys):
    original, mla, _ = tiny_dirs
    assert bench.main(["--original", str(original), "--converted", str(mla), "--reps", "2"]) == 2
    assert "--reps 2" in capsys.readouterr().err
    assert bench.main(["--original", str(original), "--convert", "care-sideways"]) == 2
    assert "care-sideways" in capsys.readouterr().err
