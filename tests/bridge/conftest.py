"""Shared fixtures of the bridge tests: tiny GGUF files, tiny HF directories, an isolated cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.gguf_tiny import write_tiny_gguf


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """arch -> (path of a tiny Q8_0 GGUF, the float32 HF weights it was made from)."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch, tied in (("llama", False), ("qwen2", True), ("qwen3", False)):
        p = root / f"tiny-{arch}.gguf"
        out[arch] = (p, write_tiny_gguf(p, arch, tied=tied))
    return out


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 (QKV bias) saved by transformers as sharded bf16 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    hc = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=211,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(hc).to(torch.bfloat16)
    d = tmp_path_factory.mktemp("hf") / "qwen2-tiny"
    model.save_pretrained(d, max_shard_size="40KB")
    return d


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty jaxturbo cache for one test."""
    monkeypatch.setenv("JAXTURBO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
