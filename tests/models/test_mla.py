"""MLA attention: DeepSeek-V3 parity with transformers, absorbed decode == naive, HF round trip,
perplexity of an MLAConfig."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxturbo.bridge.deepseek import load_deepseek, save_deepseek
from jaxturbo.models.mla import init_mla_cache, mla_forward
from tests.helpers.deepseek_tiny import V, tiny_deepseek, torch_logits
from tests.helpers.hf_tiny import random_tokens


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
    lengths = jnp.array([8, 5], jnp.int32)  # ragged rows: row 1 decodes its 6th token
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
    np.testing.assert_array_equal(
        np.asarray(params2["layers"]["self_attn.q_proj.weight"]),
        np.asarray(params["layers"]["self_attn.q_proj.weight"]),
    )


def test_perplexity_takes_an_mla_config(tiny):
    """`jaxturbo.inference.scoring` runs an MLAConfig model (the forward picked by
    `models.model_functions`): its NLL equals transformers' over the same two windows."""
    import torch

    from jaxturbo.inference import perplexity

    model, cfg, params = tiny
    ids = random_tokens((40,), V, seed=4)
    res = perplexity(params, cfg, ids, window=20, batch_size=2, attn_impl="xla")
    nll = []
    for w in (ids[:20], ids[20:]):  # disjoint windows: each scores its last 19 tokens
        logp = torch.log_softmax(torch.tensor(torch_logits(model, w[None])[0, :-1]), -1)
        nll += (-logp[torch.arange(19), torch.tensor(w[1:], dtype=torch.long)]).tolist()
    assert res.tokens_scored == 38
    np.testing.assert_allclose(res.nll, np.mean(nll), rtol=1e-5)
