"""MLA attention: DeepSeek-V3 parity with transformers, absorbed decode == naive, HF round trip."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxturbo.bridge.deepseek import (load_deepseek, mla_config_from_hf, mla_params_from_hf,
                                      save_deepseek)
from jaxturbo.models.mla import init_mla_cache, mla_forward
from tests.hf_tiny import random_tokens

V = 97


def tiny_deepseek(seed: int = 0):
    """(torch DeepSeek-V3 model, MLAConfig, params) with dense MLPs and random norms."""
    import torch
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    torch.manual_seed(seed)
    hc = DeepseekV3Config(vocab_size=V, hidden_size=48, intermediate_size=64,
                          moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=3,
                          num_key_value_heads=3, q_lora_rank=None, kv_lora_rank=24,
                          qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                          first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2,
                          n_group=1, topk_group=1, max_position_embeddings=128,
                          tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(hc).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    cfg = mla_config_from_hf(hc.to_dict())
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    return model, cfg, jax_tree(mla_params_from_hf(sd, cfg))


def jax_tree(p):
    import jax
    return jax.tree.map(jnp.asarray, p)


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def tiny():
    return tiny_deepseek()


def test_logits_match_transformers(tiny):
    model, cfg, params = tiny
    toks = random_tokens((2, 11), V, seed=1)
    ours, _ = mla_forward(params, cfg, jnp.asarray(toks), attn_impl="xla")
    np.testing.assert_allclose(np.asarray(ours), torch_logits(model, toks), atol=1e-4, rtol=0)


def test_absorbed_decode_equals_naive(tiny):
    _, cfg, params = tiny
    toks = jnp.asarray(random_tokens((2, 9), V, seed=2))
    full, _ = mla_forward(params, cfg, toks, attn_impl="xla")
    lengths = jnp.array([8, 5], jnp.int32)   # ragged rows: row 1 decodes its 6th token
    cache = init_mla_cache(cfg, 2, 16)
    _, cache = mla_forward(params, cfg, toks[:, :8], cache=cache, lengths=lengths, attn_impl="xla")
    nxt = jnp.stack([toks[0, 8], toks[1, 5]])[:, None]
    got = {}
    for absorb in (True, False):
        got[absorb], _ = mla_forward(params, cfg, nxt, cache=cache, absorb=absorb, attn_impl="xla")
    np.testing.assert_allclose(np.asarray(got[True]), np.asarray(got[False]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[True][0, 0]), np.asarray(full[0, 8]), atol=1e-4)
    ref, _ = mla_forward(params, cfg, toks[1:, :6], attn_impl="xla")
    np.testing.assert_allclose(np.asarray(got[True][1, 0]), np.asarray(ref[0, 5]), atol=1e-4)


def test_export_round_trip_loads_in_transformers(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    _, cfg, params = tiny
    out = save_deepseek(params, cfg, tmp_path / "ds")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    toks = random_tokens((1, 10), V, seed=3)
    ours, _ = mla_forward(params, cfg, jnp.asarray(toks), attn_impl="xla")
    np.testing.assert_allclose(torch_logits(hf, toks), np.asarray(ours), atol=1e-4, rtol=0)
    cfg2, params2 = load_deepseek(out)
    assert cfg2 == cfg
    np.testing.assert_array_equal(np.asarray(params2["layers"]["self_attn.q_proj.weight"]),
                                  np.asarray(params["layers"]["self_attn.q_proj.weight"]))
