"""Rollout engines: the HF (PyTorch) engine fed through the bridge agrees with the JAX policy
after a weight update; the JAX engine's sampling logprobs equal its scoring logprobs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxturbo.inference.sampling import SamplingParams
from jaxturbo.models.init import init_params
from jaxturbo.models.transformer import forward
from jaxturbo.rl.logprobs import logprobs_from_logits
from jaxturbo.rl.rollout import HFEngine, JaxEngine
from tests.helpers.hf_tiny import tiny_hf_model

# prompt + completion is 8 tokens in every row, so the reference needs no padding
PROMPTS = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]
COMPLETIONS = [[10, 20, 30], [7, 0, 150, 4, 5, 6], [100]]


@pytest.fixture(scope="module")
def tiny():
    _, cfg, params = tiny_hf_model("llama")
    return cfg, params


def _jax_reference(params, cfg, temperature):
    """log_softmax(forward(...) / tau) at each completion token: one unpadded [3, 7] forward."""
    seq = jnp.asarray([p + c for p, c in zip(PROMPTS, COMPLETIONS)], jnp.int32)
    logits, _ = forward(params, cfg, seq[:, :-1])
    lp = np.asarray(logprobs_from_logits(logits, seq[:, 1:], temperature))
    return [lp[i, len(p) - 1 :] for i, p in enumerate(PROMPTS)]


def test_hf_engine_matches_jax_policy_after_update(tiny):
    cfg, params = tiny
    engine = HFEngine(cfg, params)
    before = engine.score(PROMPTS, COMPLETIONS)
    new = init_params(cfg, jax.random.key(1), jnp.float32, std=0.2)  # peaked logits
    engine.update_weights(new)
    after = engine.score(PROMPTS, COMPLETIONS, temperature=0.7)
    for a, want in zip(after, _jax_reference(new, cfg, 0.7)):
        np.testing.assert_allclose(a, want, atol=1e-4, rtol=0)
    for b, old in zip(before, _jax_reference(params, cfg, 1.0)):  # and before the update too
        np.testing.assert_allclose(b, old, atol=1e-4, rtol=0)
    assert np.ptp(np.concatenate(after)) > 1.0  # peaked enough for the match to mean something


def test_greedy_generation_hf_equals_jax(tiny):
    """Same tokens from both engines; the JAX sampler's logprobs equal its own scoring pass and
    the HF engine's (greedy scores at temperature 1)."""
    cfg, params = tiny
    jax_eng = JaxEngine(cfg, params)
    jo = jax_eng.generate(PROMPTS, SamplingParams(), max_new_tokens=4, stop_ids=(5,))
    ho = HFEngine(cfg, params).generate(PROMPTS, SamplingParams(), max_new_tokens=4, stop_ids=(5,))
    assert ho.completions == jo.completions and ho.truncated == jo.truncated
    for c, t in zip(jo.completions, jo.truncated):
        assert t == (len(c) == 4 and c[-1] != 5)
    scored = jax_eng.score(PROMPTS, jo.completions)
    for a, b, s in zip(ho.logprobs, jo.logprobs, scored):
        np.testing.assert_allclose(b, s, atol=1e-4)
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_paged_engine_matches_the_static_sampler(tiny):
    """The serving engine as a rollout engine: greedy tokens and logprobs equal the static
    sampler's; a sampled GRPO group (one request with n samples) reports the logprobs its
    scoring pass gives; after update_weights it follows the new weights."""
    from jaxturbo.rl.rollout import PagedEngine

    cfg, params = tiny
    paged = PagedEngine(cfg, params, max_num_seqs=8, max_model_len=32)
    static = JaxEngine(cfg, params)
    for eng_params in (params, init_params(cfg, jax.random.key(1), jnp.float32, std=0.2)):
        paged.update_weights(eng_params)
        static.update_weights(eng_params)
        po = paged.generate(PROMPTS, SamplingParams(), max_new_tokens=5, stop_ids=(5,))
        jo = static.generate(PROMPTS, SamplingParams(), max_new_tokens=5, stop_ids=(5,))
        assert po.completions == jo.completions and po.truncated == jo.truncated
        for a, b in zip(po.logprobs, jo.logprobs):
            np.testing.assert_allclose(a, b, atol=1e-4)
    group = [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4  # two groups of 4 samples
    so = paged.generate(group, SamplingParams(temperature=0.8), max_new_tokens=6, seed=3)
    assert len(so.completions) == 8 and all(1 <= len(c) <= 6 for c in so.completions)
    assert len({tuple(c) for c in so.completions[:4]}) > 1  # the samples of a group differ
    scored = paged.score(group, so.completions, temperature=0.8)
    for a, s in zip(so.logprobs, scored):
        np.testing.assert_allclose(a, s, atol=1e-4)
    assert paged.engine.stats().kv_pages_used == 0  # every page back in the pool
