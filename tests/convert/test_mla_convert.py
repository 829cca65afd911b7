"""CARE conversion: exactness at full rank, whitening vs plain SVD, rank allocation, export."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxturbo.convert.mla import factorize as fz
from jaxturbo.convert.mla.calibrate import attention_input_covariance, calibration_batches
from jaxturbo.convert.mla.convert import convert_to_mla
from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.init import init_params
from jaxturbo.models.mla import init_mla_cache, mla_forward
from jaxturbo.models.transformer import forward

V = 101
CFG = ModelConfig(
    vocab_size=V,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def gqa():
    """Random llama params with attention weights large enough to make attention matter."""
    p = init_params(CFG, jax.random.key(0))
    layers = dict(p["layers"])
    for k in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
        layers[k] = layers[k] * 15.0
    layers["input_layernorm.weight"] = 1 + 0.3 * jax.random.normal(jax.random.key(1), (2, 48))
    toks = np.random.RandomState(0).randint(0, V, 4 * 32)
    p = {**p, "layers": layers}
    cov = attention_input_covariance(p, CFG, calibration_batches(toks, 4, 32, batch_size=4))
    return p, cov


def _tokens(shape, seed=5):
    return jnp.asarray(np.random.RandomState(seed).randint(0, V, shape), jnp.int32)


@pytest.mark.parametrize("method", ["care", "svd-joint"])
def test_full_rank_conversion_reproduces_gqa_logits(gqa, method):
    params, cov = gqa
    # every rotary component kept in the rope key, latent wide enough for V: exact
    res = convert_to_mla(
        params, CFG, cov, method=method, kv_budget=1.0, rope_dim=2 * 16, rope_layout="free"
    )
    assert res.kv_values_after == res.kv_values_before
    toks = _tokens((2, 12))
    want, _ = forward(params, CFG, toks, attn_impl="xla")
    got, _ = mla_forward(jax.tree.map(jnp.asarray, res.params), res.cfg, toks, attn_impl="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)


def test_covariance_is_second_moment_of_normed_input(gqa):
    params, cov = gqa
    assert cov.shape == (2, 48, 48) and cov.dtype == np.float64
    np.testing.assert_allclose(cov, np.swapaxes(cov, 1, 2))
    # layer 0's input is the embedding: check against a direct computation
    toks = np.random.RandomState(0).randint(0, V, 4 * 32)
    from jaxturbo.models.layers import rms_norm

    x = rms_norm(
        params["model.embed_tokens.weight"][toks],
        params["layers"]["input_layernorm.weight"][0],
        CFG.rms_norm_eps,
    )
    x = np.asarray(x, np.float64)
    np.testing.assert_allclose(cov[0], x.T @ x / len(toks), rtol=1e-5, atol=1e-6)


def test_whitening_reduces_activation_error():
    rng = np.random.RandomState(0)
    d, out, n, r = 40, 24, 4000, 6
    mix = rng.randn(d, d) * np.logspace(0, -2, d)[None]  # strongly correlated inputs
    x = rng.randn(n, d) @ mix.T
    c = x.T @ x / n
    w = rng.randn(out, d)
    err = {}
    for method in ("svd", "care"):
        a, b = fz.spectrum(w, method, fz.sqrt_and_inverse(c)).factors(r)
        err[method] = np.mean(np.sum((x @ (w - b @ a).T) ** 2, axis=1))
    assert err["care"] < 0.5 * err["svd"], err


def test_water_fill_respects_budget_and_bounds():
    spectra = [np.array([9.0, 4, 1, 0.5]), np.array([1.0, 1, 1, 1]), np.array([5.0, 0.1])]
    r = fz.water_fill(spectra, total=6, lo=[1, 1, 1], hi=[4, 4, 2])
    assert sum(r) == 6 and all(1 <= x <= h for x, h in zip(r, [4, 4, 2]))
    assert r[0] >= 2  # the steep spectrum's second share (4/14.5) beats the flat one's (1/4)
    with pytest.raises(UserError, match="minimum ranks"):
        fz.water_fill(spectra, total=2, lo=[1, 1, 1], hi=[4, 4, 2])


def test_adjusted_ranks_meet_budget_and_absorbed_decode(gqa):
    params, cov = gqa
    res = convert_to_mla(
        params, CFG, cov, method="care", ranks="adjusted", kv_budget=0.5, rope_dim=8
    )
    assert res.kv_values_after <= 0.5 * res.kv_values_before
    assert res.cfg.kv_lora_rank == max(k + v for k, v in zip(res.rank_k, res.rank_v))
    p = jax.tree.map(jnp.asarray, res.params)
    toks = _tokens((1, 7))
    cache = init_mla_cache(res.cfg, 1, 8)
    _, cache = mla_forward(
        p, res.cfg, toks[:, :6], cache=cache, lengths=jnp.array([6]), attn_impl="xla"
    )
    a, _ = mla_forward(p, res.cfg, toks[:, 6:], cache=cache, absorb=True, attn_impl="xla")
    n, _ = mla_forward(p, res.cfg, toks[:, 6:], cache=cache, absorb=False, attn_impl="xla")
    full, _ = mla_forward(p, res.cfg, toks, attn_impl="xla")
    np.testing.assert_allclose(np.asarray(a), np.asarray(n), atol=1e-5)
    np.testing.assert_allclose(np.asarray(a[0, 0]), np.asarray(full[0, 6]), atol=1e-4)


def test_budget_too_small_is_a_user_error(gqa):
    params, cov = gqa
    with pytest.raises(UserError, match="kv_budget"):
        convert_to_mla(params, CFG, cov, kv_budget=0.1, rope_dim=8)


@pytest.mark.parametrize("ranks", ["uniform", "adjusted"])
def test_care_export_loads_in_transformers(gqa, tmp_path, ranks):
    """The DeepSeek-V3 export (latent-norm trick; adjusted: layers zero-padded to the widest
    rank) gives transformers the logits of the converted model within 1e-4."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxturbo.bridge.deepseek import save_deepseek

    params, cov = gqa
    res = convert_to_mla(params, CFG, cov, method="care", ranks=ranks, kv_budget=0.5, rope_dim=8)
    assert not res.cfg.latent_norm
    assert (res.cfg.layer_ranks is not None) == (ranks == "adjusted")
    out = save_deepseek(res.params, res.cfg, tmp_path / "mla")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    toks = _tokens((1, 10))
    ours, _ = mla_forward(jax.tree.map(jnp.asarray, res.params), res.cfg, toks, attn_impl="xla")
    with torch.no_grad():
        theirs = hf(torch.tensor(np.asarray(toks), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)


def test_rope_selection_layouts():
    from jaxturbo.convert.mla import rope_select

    rng = np.random.RandomState(0)
    energy = rng.rand(3, 2, 8)
    energy[:, 1, [1, 3, 5, 7]] += 10.0  # kv head 1 dominates at odd frequencies
    j, g = rope_select.select(energy, 4, "geometric")
    assert list(j) == [1, 3, 5, 7] and (g == 1).all()
    j, g = rope_select.select(energy, 3, "free")
    assert len(set(zip(j, g[0]))) == 3 and (g == 1).all()
    w = rope_select.rotation_weight(np.array([1.0, 1e-6]), 512)
    assert w[0] > 0.99 and w[1] < 1e-6
