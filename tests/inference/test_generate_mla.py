"""Generation with an MLAConfig (latent cache, absorbed decode): token for token equal to
transformers' greedy generate on a tiny DeepSeek-V3."""

import numpy as np
import pytest

from jaxturbo.inference import generate
from jaxturbo.models import model_functions
from jaxturbo.models.mla import init_mla_cache, mla_forward
from tests.helpers.deepseek_tiny import V, hf_greedy, tiny_deepseek
from tests.helpers.hf_tiny import random_tokens


@pytest.fixture(scope="module")
def tiny():
    return tiny_deepseek(seed=5)


def test_model_functions_pick_the_mla_forward_and_latent_cache(tiny):
    _, cfg, _ = tiny
    fns = model_functions(cfg)
    assert fns.forward is mla_forward and fns.init_cache is init_mla_cache
    assert not fns.tensor_parallel
    cache = fns.init_cache(cfg, 2, 8, np.float32)
    assert cache["latent"].shape == (2, 2, 8, cfg.cache_rank)
    assert cache["k_rope"].shape == (2, 2, 8, cfg.qk_rope_head_dim)


def test_greedy_batch_of_different_lengths_matches_transformers(tiny):
    """Rows of 11, 4 and 7 prompt tokens (right-padded to 16): the prefill writes the latent
    cache, each decode step the absorbed attention over its own row's slots."""
    model, cfg, params = tiny
    full = random_tokens((3, 11), V, seed=6)
    prompts = [list(full[0, :11]), list(full[1, :4]), list(full[2, :7])]
    res = generate(params, cfg, prompts, max_new_tokens=10, bucket_multiple=16)
    for p, got in zip(prompts, res.sequences()):
        assert got == hf_greedy(model, p, 10)
    assert np.all(res.logprobs <= 0) and np.isfinite(res.logprobs).all()
