"""Sampling filters against hand-computed distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxturbo.errors import UserError
from jaxturbo.inference.sampling import SamplingParams, filtered_logits, sample


def test_greedy_is_argmax_with_logprob():
    logits = jnp.array([[0.0, 2.0, 1.0], [3.0, -1.0, 0.5]])
    tok, lp = sample(logits, jax.random.key(0), SamplingParams())
    assert tok.tolist() == [1, 0]
    np.testing.assert_allclose(lp, jax.nn.log_softmax(logits)[jnp.arange(2), tok], rtol=1e-6)


def test_top_k_keeps_k_largest():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))
    out = filtered_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert np.isfinite(np.asarray(out)).tolist() == [[False, True, False, True]]


def test_top_p_keeps_smallest_set_reaching_p():
    # sorted: 0.4, 0.3, 0.2, 0.1 -> mass before each: 0, .4, .7, .9 ; p=0.65 keeps {0.4, 0.3}
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))
    out = filtered_logits(logits, SamplingParams(temperature=1.0, top_p=0.65))
    assert np.isfinite(np.asarray(out)).tolist() == [[False, True, False, True]]
    out = filtered_logits(logits, SamplingParams(temperature=1.0, top_p=0.05))
    assert np.isfinite(np.asarray(out)).tolist() == [[False, True, False, False]]


def test_temperature_sampling_matches_distribution():
    probs = np.array([0.5, 0.3, 0.2])
    logits = jnp.log(jnp.asarray(np.tile(probs, (4000, 1)), jnp.float32))
    tok, _ = sample(logits, jax.random.key(1), SamplingParams(temperature=1.0))
    freq = np.bincount(np.asarray(tok), minlength=3) / 4000
    np.testing.assert_allclose(freq, probs, atol=0.03)
    tok, _ = sample(logits, jax.random.key(1), SamplingParams(temperature=1.0, top_k=1))
    assert (np.asarray(tok) == 0).all()


@pytest.mark.parametrize(
    "kw", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)]
)
def test_bad_sampling_params(kw):
    with pytest.raises(UserError):
        SamplingParams(**kw)
