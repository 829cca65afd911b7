"""Logit parity with transformers (PyTorch, float32) on tiny random Llama/Qwen2/Qwen3 models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxturbo.models.transformer import forward, init_cache
from tests.helpers.hf_tiny import random_tokens, tiny_hf_model


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_logits_match_transformers(family):
    model, cfg, params = tiny_hf_model(family)
    toks = random_tokens((2, 37))
    with torch.no_grad():
        ref = model(torch.tensor(toks, dtype=torch.long)).logits.numpy()
    out, _ = jax.jit(lambda p, t: forward(p, cfg, t))(params, jnp.asarray(toks))
    assert np.abs(ref).max() > 1e-2  # the comparison is not between two near-zero tensors
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)
    assert (np.asarray(out).argmax(-1) == ref.argmax(-1)).all()


def test_unrolled_equals_scan():
    _, cfg, params = tiny_hf_model("qwen3")
    toks = jnp.asarray(random_tokens((2, 19)))
    a, _ = forward(params, cfg, toks)
    b, _ = forward(params, cfg, toks, unroll=True)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_bfloat16_close_to_float32():
    _, cfg, params = tiny_hf_model("llama")
    toks = jnp.asarray(random_tokens((2, 16)))
    ref, _ = forward(params, cfg, toks)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    out, _ = forward(p16, cfg, toks)
    err = np.linalg.norm(np.asarray(out) - np.asarray(ref)) / np.linalg.norm(np.asarray(ref))
    assert err < 3e-2


@pytest.mark.parametrize("mode", ["standard", "ladder", "hybrid", "parallel"])
def test_cached_prefill_and_decode_equal_full_forward(mode):
    """Prefill on right-padded rows of different lengths, then decode one token at a time:
    every step's logits equal the uncached forward over the whole prefix."""
    _, cfg, params = tiny_hf_model("qwen2")
    cfg = cfg.replace(residual_mode=mode, ladder_layers=2 if mode == "hybrid" else 0)
    full = random_tokens((2, 14), seed=3)
    lens = np.array([9, 6], np.int32)
    width = 10
    prompt = np.zeros((2, width), np.int32)
    for i, n in enumerate(lens):
        prompt[i, :n] = full[i, :n]
    seg = (np.arange(width)[None] < lens[:, None]).astype(np.int32)
    cache = init_cache(cfg, 2, 16)
    logits, cache = forward(
        params,
        cfg,
        jnp.asarray(prompt),
        segment_ids=jnp.asarray(seg),
        cache=cache,
        lengths=jnp.asarray(lens),
    )
    for i, n in enumerate(lens):
        ref, _ = forward(params, cfg, jnp.asarray(full[i : i + 1, :n]))
        np.testing.assert_allclose(np.asarray(logits[i, :n]), np.asarray(ref[0]), atol=1e-5)
    step = jax.jit(lambda p, t, c: forward(p, cfg, t, cache=c))
    for s in range(3):
        nxt = np.array([full[i, lens[i] + s] for i in range(2)], np.int32)
        logits, cache = step(params, jnp.asarray(nxt[:, None]), cache)
        for i in range(2):
            ref, _ = forward(params, cfg, jnp.asarray(full[i : i + 1, : lens[i] + s + 1]))
            np.testing.assert_allclose(np.asarray(logits[i, 0]), np.asarray(ref[0, -1]), atol=1e-5)


def test_residual_modes_differ_and_hybrid_zero_is_standard():
    _, cfg, params = tiny_hf_model("llama")
    toks = jnp.asarray(random_tokens((1, 12)))
    outs = {
        m: np.asarray(forward(params, cfg.replace(residual_mode=m), toks)[0])
        for m in ("standard", "ladder", "parallel")
    }
    desync = np.asarray(forward(params, cfg, toks, skip_allreduce=True)[0])
    hyb0 = np.asarray(
        forward(params, cfg.replace(residual_mode="hybrid", ladder_layers=0), toks)[0]
    )
    np.testing.assert_array_equal(hyb0, outs["standard"])
    np.testing.assert_array_equal(desync, outs["standard"])  # one device: nothing to skip
    assert np.abs(outs["ladder"] - outs["standard"]).max() > 1e-4
    assert np.abs(outs["parallel"] - outs["standard"]).max() > 1e-4


def test_ladder_recurrence_by_hand():
    """Ladder on 3 layers, written out module by module (Zhang et al. 2025, Eq. for x_{i+1})."""
    from jaxturbo.models.layers import rms_norm
    from jaxturbo.models.rope import rope_cos_sin
    from jaxturbo.models.transformer import attention_block, embed, lm_head, mlp_block

    _, cfg, params = tiny_hf_model("llama")
    cfg = cfg.replace(residual_mode="ladder")
    toks = jnp.asarray(random_tokens((1, 10)))
    out, _ = forward(params, cfg, toks)
    pos = jnp.arange(10)[None]
    cos, sin = rope_cos_sin(cfg, pos)
    x = embed(params, toks)
    e = cfg.rms_norm_eps
    outs = []  # module outputs in order a0, m0, a1, m1, ...
    for i in range(cfg.num_hidden_layers):
        lp = jax.tree.map(lambda a: a[i], params["layers"])
        if len(outs) >= 2:
            x = x + outs[-2]  # attention i sees everything except m_{i-1}
        a, _ = attention_block(
            lp,
            cfg,
            rms_norm(x, lp["input_layernorm.weight"], e),
            cos,
            sin,
            i,
            segment_ids=None,
            cache=None,
            attn_impl="xla",
            attn_fn=None,
        )
        if len(outs) >= 1:
            x = x + outs[-1]  # MLP i sees everything except a_i
        outs.append(a)
        outs.append(mlp_block(lp, rms_norm(x, lp["post_attention_layernorm.weight"], e)))
    x = x + outs[-2] + outs[-1]
    ref = lm_head(params, cfg, rms_norm(x, params["model.norm.weight"], e))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
