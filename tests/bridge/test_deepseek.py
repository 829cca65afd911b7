"""DeepSeek-V3 directories through the bridge: load_model parity with transformers, bitwise
HF -> jaxturbo -> HF round trips (library and CLI), and clear refusals of what is unsupported."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from jaxturbo.bridge import export_hf, load_model, load_params
from jaxturbo.bridge.deepseek import mla_config_from_hf, mla_params_from_hf
from jaxturbo.bridge.hf import read_hf_tensors
from jaxturbo.cli import main
from jaxturbo.errors import UserError
from jaxturbo.models.mla import MLAConfig, mla_forward
from tests.helpers.deepseek_tiny import (
    TINY_DEEPSEEK,
    save_with_tokenizer,
    tiny_deepseek_torch,
    torch_logits,
)

LINEAR_ROPE = {"rope_type": "linear", "factor": 2.5, "rope_theta": 500.0}


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory):
    """A tiny dense DeepSeek-V3 saved by transformers (float32) with a character tokenizer."""
    model = tiny_deepseek_torch(seed=0)
    return model, save_with_tokenizer(model, tmp_path_factory.mktemp("ds") / "tiny")


@pytest.mark.parametrize(
    "overrides",
    [{}, {"rope_parameters": LINEAR_ROPE, "tie_word_embeddings": True}],
    ids=["default-rope", "linear-rope-tied"],
)
def test_load_model_matches_transformers(overrides, ds_dir, tmp_path):
    if overrides:
        model = tiny_deepseek_torch(seed=1, **overrides)
        d = save_with_tokenizer(model, tmp_path / "ds")
    else:
        model, d = ds_dir
    cfg, params, tok = load_model(d)
    assert isinstance(cfg, MLAConfig) and cfg.latent_norm
    assert (cfg.rope_inv_freq is not None) == bool(overrides)
    assert ("lm_head.weight" in params) != bool(overrides)
    toks = np.asarray([tok.encode("Hello, MLA world!")], np.int32)
    ours, _ = mla_forward(params, cfg, jnp.asarray(toks), attn_impl="xla")
    np.testing.assert_allclose(np.asarray(ours), torch_logits(model, toks), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bitwise(dtype, tmp_path):
    """HF -> jaxturbo -> HF: every tensor bit for bit (the latent norm is kept as stored, the
    rope rows permuted there and back), the same config read back, the tokenizer copied."""
    import torch

    src = save_with_tokenizer(
        tiny_deepseek_torch(seed=2), tmp_path / "src", dtype=getattr(torch, dtype)
    )
    cfg, params = load_params(src)
    assert params["layers"]["self_attn.q_proj.weight"].dtype == jnp.dtype(dtype)
    out = export_hf(params, cfg, tmp_path / "out", tokenizer=src)
    a, b = read_hf_tensors(src), read_hf_tensors(out)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name
    assert load_params(out)[0] == cfg
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype


def test_export_hf_cli_round_trip(ds_dir, tmp_path, capsys):
    _, src = ds_dir
    out = tmp_path / "out"
    assert main(["export-hf", "--model", str(src), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    a, b = read_hf_tensors(src), read_hf_tensors(out)
    assert set(a) == set(b) and all(a[n].tobytes() == b[n].tobytes() for n in a)
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "DeepseekV3ForCausalLM"
    ]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"q_lora_rank": 16}, r"q_lora_rank=16: q-LoRA .* supported: q_lora_rank null"),
        (
            {"first_k_dense_replace": 1},
            r"first_k_dense_replace=1 .* layers 1\.\.1 are mixture-of-experts"
            r".*supported: a dense MLP in every layer",
        ),
    ],
    ids=["q-lora", "moe"],
)
def test_transformers_q_lora_and_moe_dirs_are_refused(overrides, match, tmp_path, capsys):
    d = save_with_tokenizer(tiny_deepseek_torch(seed=3, **overrides), tmp_path / "ds")
    with pytest.raises(UserError, match=match):
        load_model(d)
    assert main(["ppl", "--model", str(d), "--data", str(d / "config.json")]) == 2
    assert "not supported" in capsys.readouterr().err


def _hf_dict(**changes) -> dict:
    from transformers import DeepseekV3Config

    d = DeepseekV3Config(**TINY_DEEPSEEK).to_dict()
    d.update(changes)
    return d


@pytest.mark.parametrize(
    "changes, match",
    [
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 40.0, "rope_theta": 1e4}},
            r"unsupported DeepSeek rope type 'yarn'; supported: default, linear",
        ),
        ({"rope_parameters": {**LINEAR_ROPE, "mscale_all_dim": 1.0}}, r"mscale_all_dim=1\.0"),
        ({"rope_interleave": False}, r"rope_interleave=false .* supported: rope_interleave true"),
        ({"attention_bias": True}, r"attention_bias=true: .* supported: attention_bias false"),
        ({"hidden_act": "gelu"}, r"unsupported hidden_act='gelu'; supported: silu"),
        ({"kv_lora_rank": None}, r"lacks required DeepSeek-V3 field\(s\) kv_lora_rank"),
    ],
)
def test_unsupported_config_fields_are_refused(changes, match):
    with pytest.raises(UserError, match=match):
        mla_config_from_hf(_hf_dict(**changes))


def test_absent_q_lora_rank_means_transformers_default():
    d = _hf_dict()
    del d["q_lora_rank"]  # transformers then builds q-LoRA with rank 1536
    with pytest.raises(UserError, match=r"q_lora_rank=1536 \(the default when absent\)"):
        mla_config_from_hf(d)


def test_tensors_must_match_the_config(ds_dir):
    model, _ = ds_dir
    cfg = mla_config_from_hf(model.config.to_dict())
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    extra = {**sd, "model.layers.0.self_attn.q_a_proj.weight": np.zeros((4, 48), np.float32)}
    with pytest.raises(UserError, match="unexpected tensor model.layers.0.self_attn.q_a_proj"):
        mla_params_from_hf(extra, cfg)
    bad = {**sd, "model.layers.1.self_attn.kv_b_proj.weight": np.zeros((60, 20), np.float32)}
    with pytest.raises(
        UserError,
        match=r"kv_b_proj.weight has shape \[60, 20\] but config.json "
        r"implies \[60, 24\]",
    ):
        mla_params_from_hf(bad, cfg)
    short = {k: v for k, v in sd.items() if "layers.1.self_attn.kv_a_layernorm" not in k}
    with pytest.raises(UserError, match="checkpoint lacks model.layers.1.self_attn.kv_a_layernorm"):
        mla_params_from_hf(short, cfg)


def test_unsupported_architecture_lists_deepseek(ds_dir, tmp_path):
    _, src = ds_dir
    d = tmp_path / "m"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "deepseek_v2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        UserError,
        match=r"model_type='deepseek_v2'.*supported: llama, qwen2, qwen2_moe, "
        r"qwen3, qwen3_moe, deepseek_v3",
    ):
        load_model(d)


def test_linear_rope_config_reads_back_exactly():
    """A linear-rope config exported and read back gives the same config."""
    from jaxturbo.bridge.deepseek import mla_config_to_hf

    cfg = mla_config_from_hf(_hf_dict(rope_parameters=LINEAR_ROPE))
    assert mla_config_to_hf(cfg)["rope_parameters"] == LINEAR_ROPE
    assert mla_config_from_hf(mla_config_to_hf(cfg)) == cfg


@pytest.mark.parametrize("command", ["ppl", "generate"])
def test_mesh_is_refused_for_mla(command, ds_dir, capsys):
    _, d = ds_dir
    rest = ["--data", str(d / "config.json")] if command == "ppl" else ["--prompt", "Hi"]
    assert main([command, "--model", str(d), "--mesh", "tensor=2", *rest]) == 2
    captured = capsys.readouterr()
    assert "mesh tensor=2: tensor-parallel MLA models are not implemented" in captured.err
    assert "Hi" not in captured.out  # refused before any output
