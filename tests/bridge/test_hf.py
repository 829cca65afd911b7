"""HF safetensors import/export: bitwise round trips, transformers reloads, bad input."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxturbo.bridge import export_hf, load_hf, save_hf
from jaxturbo.bridge.hf import INDEX_FILE, params_from_hf, read_hf_tensors
from jaxturbo.bridge.safetensors_io import read_safetensors, write_safetensors
from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def test_sharded_import_layout(tiny_hf_dir):
    assert (tiny_hf_dir / INDEX_FILE).is_file()
    cfg, params, path = load_hf(tiny_hf_dir)
    assert path == tiny_hf_dir and cfg.model_type == "qwen2" and cfg.attention_bias
    q = params["layers"]["self_attn.q_proj.weight"]
    assert isinstance(q, jnp.ndarray) and q.dtype == jnp.bfloat16 and q.shape == (3, 64, 64)
    assert params["layers"]["self_attn.k_proj.bias"].shape == (3, 32)
    hf = read_hf_tensors(tiny_hf_dir)
    np.testing.assert_array_equal(
        _bits(np.asarray(q[2])), _bits(hf["model.layers.2.self_attn.q_proj.weight"])
    )
    _, p32, _ = load_hf(tiny_hf_dir, dtype=jnp.float32)
    assert p32["model.embed_tokens.weight"].dtype == jnp.float32


def test_round_trip_is_bitwise_and_transformers_loads_it(tiny_hf_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    cfg, params, _ = load_hf(tiny_hf_dir)
    out = save_hf(params, cfg, tmp_path / "out", tokenizer_src=tiny_hf_dir, max_shard_bytes=50_000)
    assert (out / INDEX_FILE).is_file() and (out / "generation_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    a, b = read_hf_tensors(tiny_hf_dir), read_hf_tensors(out)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(_bits(a[name]), _bits(b[name]), err_msg=name)
    ref = AutoModelForCausalLM.from_pretrained(tiny_hf_dir)
    got = AutoModelForCausalLM.from_pretrained(out)
    assert got.dtype == torch.bfloat16
    x = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    assert torch.equal(ref(x).logits, got(x).logits)


def test_export_tied_float32_single_file(tmp_path):
    """A tied llama in float32: one file, no lm_head, config and dtypes transformers agrees with."""
    from transformers import AutoConfig

    cfg = ModelConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=(2, 3),
    )
    rng = np.random.default_rng(0)
    from jaxturbo.bridge.hf import global_shapes, layer_shapes

    hf = {n: rng.standard_normal(s).astype(np.float32) for n, s in global_shapes(cfg).items()}
    for i in range(2):
        hf.update(
            {
                f"model.layers.{i}.{s}": rng.standard_normal(sh).astype(np.float32)
                for s, sh in layer_shapes(cfg).items()
            }
        )
    params = params_from_hf(hf, cfg)
    out = export_hf(params, cfg, tmp_path / "out")
    back = read_safetensors(out / "model.safetensors")
    assert set(back) == set(hf) and "lm_head.weight" not in back
    for n in hf:
        np.testing.assert_array_equal(back[n], hf[n])
    hc = AutoConfig.from_pretrained(out)
    assert hc.tie_word_embeddings and hc.eos_token_id == [2, 3]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 3]
    assert ModelConfig.from_json(out / "config.json") == cfg


# ---------------------------------------------------------------------------------- bad input
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="model directory .*nope does not exist"):
        load_hf(tmp_path / "nope")


def test_missing_config(tiny_hf_dir, tmp_path):
    d = _copy(tiny_hf_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json"):
        load_hf(d)


def test_missing_weights(tiny_hf_dir, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(
        UserError, match=r"no weights in .*model.safetensors.*found pytorch_model.bin"
    ):
        load_hf(d)


def test_missing_shard(tiny_hf_dir, tmp_path):
    d = _copy(tiny_hf_dir, tmp_path / "m")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(UserError, match=f"names shard {shard.name}, which is missing"):
        load_hf(d)


def test_truncated_weights(tiny_hf_dir, tmp_path):
    d = _copy(tiny_hf_dir, tmp_path / "m")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])  # header intact, data short
    with pytest.raises(UserError, match=rf"{shard.name} is truncated: its header needs \d+ bytes"):
        load_hf(d)
    shard.write_bytes(data[:20])  # header cut
    with pytest.raises(UserError, match=rf"{shard.name} is truncated: header claims"):
        load_hf(d)


def test_shape_mismatch_names_tensor(tiny_hf_dir, tmp_path):
    d = _copy(tiny_hf_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        UserError,
        match=r"tensor model.layers.0.mlp.\w+_proj.weight has shape "
        r"\[\d+, \d+\] but config.json implies \[\d+, \d+\]",
    ):
        load_hf(d)


def test_missing_and_unexpected_tensors(tmp_path):
    cfg = ModelConfig(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
    )
    write_safetensors(
        tmp_path / "model.safetensors", {"model.norm.weight": np.zeros(8, np.float32)}
    )
    with pytest.raises(UserError, match="weights lack tensor.*model.embed_tokens.weight"):
        params_from_hf(read_safetensors(tmp_path / "model.safetensors"), cfg)
    with pytest.raises(UserError, match="unexpected tensor model.layers.5.mlp.up_proj.weight"):
        params_from_hf({"model.layers.5.mlp.up_proj.weight": np.zeros((8, 8))}, cfg)


def test_unsupported_architecture(tiny_hf_dir, tmp_path):
    d = _copy(tiny_hf_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mixtral", ["MixtralForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        UserError, match="unsupported architecture model_type='mixtral'.*supported: llama"
    ):
        load_hf(d)


def test_export_refuses_existing_and_leaves_nothing_on_error(tiny_hf_dir, tmp_path):
    cfg, params, _ = load_hf(tiny_hf_dir)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    with pytest.raises(UserError, match="already exists and is not empty"):
        save_hf(params, cfg, tmp_path / "taken")
    assert (tmp_path / "taken" / "x").read_text() == "keep me"

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_hf(params, cfg, tmp_path / "new" / "deeper" / "out", tokenizer_src=BrokenTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nor the parents it made

    bad = dict(params, layers=dict(params["layers"]))
    del bad["layers"]["mlp.up_proj.weight"]
    with pytest.raises(UserError, match=r"params lack layers\['mlp.up_proj.weight'\]"):
        save_hf(bad, cfg, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]

    save_hf(params, cfg, tmp_path / "taken", overwrite=True)
    assert (
        not (tmp_path / "taken" / "x").exists() and (tmp_path / "taken" / "config.json").is_file()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
