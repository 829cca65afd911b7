"""`jaxturbo ladderize`: hybrid conversion written as an HF directory, same weights; bad N is a
one-line error naming the valid range."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxturbo.bridge.hf import global_shapes, layer_shapes, read_hf_tensors, save_hf
from jaxturbo.cli import main
from jaxturbo.models.config import ModelConfig

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=64, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def src_dir(tmp_path_factory):
    """A tiny random standard Llama as an HF directory."""
    rng = np.random.RandomState(0)
    params = {n: rng.randn(*s).astype(np.float32) for n, s in global_shapes(CFG).items()}
    params["layers"] = {n: rng.randn(CFG.num_hidden_layers, *s).astype(np.float32)
                        for n, s in layer_shapes(CFG).items()}
    return save_hf(params, CFG, tmp_path_factory.mktemp("src") / "tiny-llama")


def test_ladderize_writes_hybrid_dir_with_same_weights(src_dir, tmp_path, capsys):
    out = tmp_path / "tiny-ladder"
    assert main(["ladderize", "--model", str(src_dir), "--layers", "3", "--out", str(out)]) == 0
    assert "last 3 of 4 layers" in capsys.readouterr().out
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "ladder_llama" and hf["ladder_layers"] == 3
    assert hf["jaxturbo"] == {"residual_mode": "hybrid", "ladder_layers": 3}
    assert set(hf["auto_map"]) >= {"AutoConfig", "AutoModelForCausalLM"}
    for name in hf["auto_map"].values():
        assert (out / f"{name.split('.')[0]}.py").is_file()
    a, b = read_hf_tensors(src_dir), read_hf_tensors(out)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("n", [5, -1])
def test_ladderize_bad_layers(src_dir, tmp_path, capsys, n):
    out = tmp_path / "never"
    assert main(["ladderize", "--model", str(src_dir), "--layers", str(n), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"--layers {n}" in err and "[0, 4]" in err
    assert not out.exists()
