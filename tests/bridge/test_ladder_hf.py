"""HF export of Ladder-Residual checkpoints: transformers loads the directory with
`trust_remote_code=True` (offline) and its logits equal jaxturbo's forward (float32)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxturbo.bridge.ladder_hf import save_ladder_hf
from jaxturbo.convert.ladderize import ladder_config
from jaxturbo.errors import UserError
from jaxturbo.models.transformer import forward
from tests.helpers.hf_tiny import random_tokens, tiny_hf_model


@pytest.fixture(scope="module")
def tiny_llama():
    """(ModelConfig, params) of a tiny random Llama (3 layers, llama3 RoPE, tied embeddings)."""
    _, cfg, params = tiny_hf_model("llama", seed=3)
    return cfg, params


@pytest.mark.parametrize("mode", ["ladder", "hybrid2"])
def test_transformers_logits_match_jaxturbo(tiny_llama, tmp_path, monkeypatch, mode):
    import torch
    from transformers import AutoModelForCausalLM

    # a local trust_remote_code dir needs no Hub access (huggingface_hub reads this at import,
    # so it binds only when this test runs first; the notebook checks it from a fresh kernel)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, params = tiny_llama
    cfg = cfg.replace(residual_mode="ladder") if mode == "ladder" else ladder_config(cfg, 2)
    out = save_ladder_hf(params, cfg, tmp_path / f"ladder_export_{mode}")
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == "ladder_llama"
    assert hf_cfg["ladder_layers"] == (3 if mode == "ladder" else 2)

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model).__name__ == "LadderLlamaForCausalLM"
    toks = random_tokens((2, 13), seed=4)
    ref = np.asarray(forward(params, cfg, jnp.asarray(toks))[0])
    std = np.asarray(forward(params, cfg.replace(residual_mode="standard"), jnp.asarray(toks))[0])
    assert np.abs(ref - std).max() > 1e-3  # the ladder order really changes the logits
    ids = torch.tensor(toks, dtype=torch.long)
    with torch.no_grad():
        full = model(ids).logits.numpy()
        # cached decode: prefill all but the last token, then one step through the KV cache
        pre = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=pre.past_key_values).logits.numpy()
    np.testing.assert_allclose(full, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(step[:, 0], ref[:, -1], atol=1e-4, rtol=0)


def test_standard_loader_refuses_ladder_dir(tiny_llama, tmp_path, monkeypatch):
    """Without trust_remote_code transformers must fail, not silently run a standard Llama."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, params = tiny_llama
    out = save_ladder_hf(params, ladder_config(cfg, 1), tmp_path / "ladder_refuse")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)


def test_export_errors(tiny_llama, tmp_path):
    cfg, params = tiny_llama
    with pytest.raises(UserError, match=r"choose N in \[0, 3\]"):
        ladder_config(cfg, 4)
    with pytest.raises(UserError, match="supports Llama"):
        save_ladder_hf(params, ladder_config(cfg, 1).replace(model_type="qwen2"), tmp_path / "q")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        save_ladder_hf(params, ladder_config(cfg, 1), tmp_path / "busy")
    assert not any(p.name.startswith("q.tmp-") for p in tmp_path.iterdir())


def test_ladder_export_reads_back_into_jaxturbo(tmp_path):
    """A ladderize/export directory (model_type ladder_llama) loads back with its residual mode."""
    import jax.numpy as jnp
    import numpy as np

    from jaxturbo.bridge.hf import load_hf
    from jaxturbo.bridge.ladder_hf import save_ladder_hf
    from jaxturbo.convert.ladderize import ladder_config
    from jaxturbo.models.transformer import forward
    from tests.helpers.hf_tiny import random_tokens, tiny_hf_model

    _, cfg, params = tiny_hf_model("llama")
    hyb = ladder_config(cfg, 2)
    out = save_ladder_hf(params, hyb, tmp_path / "hyb")
    cfg2, params2, _ = load_hf(out)
    assert (cfg2.model_type, cfg2.residual_mode, cfg2.ladder_layers) == ("llama", "hybrid", 2)
    toks = jnp.asarray(random_tokens((1, 9)))
    np.testing.assert_array_equal(
        np.asarray(forward(params2, cfg2, toks)[0]), np.asarray(forward(params, hyb, toks)[0])
    )
