"""The engine on an MLA model (tiny DeepSeek-V3, latent pages, every token through the absorbed
ragged kernel): greedy outputs equal the static `generate`'s (latent cache, naive prefill,
absorbed decode), for staggered arrivals, chunked prefill and preemption."""

from __future__ import annotations

import jax
import pytest

from jaxturbo.errors import UserError
from jaxturbo.inference import generate
from jaxturbo.inference.engine.engine import Engine
from jaxturbo.inference.engine.params import RequestParams
from jaxturbo.parallel.mesh import make_mesh
from tests.helpers.deepseek_tiny import V, tiny_deepseek
from tests.inference.engine.models import engine_config, random_prompts

NEW = 10


@pytest.fixture(scope="module")
def tiny():
    _, cfg, params = tiny_deepseek(seed=5)
    return cfg, params


@pytest.mark.parametrize("decode_steps, num_pages", [(1, 7), (4, 32)])
def test_mla_greedy_matches_generate(tiny, decode_steps, num_pages):
    """7 pages (6 usable) for requests of up to 4 pages each: preemption; 32 pages with four
    decode steps per launch: multi-step decodes of the latent cache."""
    cfg, params = tiny
    prompts = random_prompts((7, 45, 20, 30), V, seed=8)
    ref = generate(params, cfg, prompts, max_new_tokens=NEW, bucket_multiple=16).sequences()
    engine = Engine(
        params,
        cfg,
        config=engine_config(num_pages=num_pages, max_model_len=96, decode_steps=decode_steps),
        sort_variants=False,
        compilation_cache_dir=None,
    )
    assert engine.runner.pages[0].shape == (2, num_pages, 16, cfg.cache_rank)  # latent rows
    assert engine.runner.pages[1].shape == (2, num_pages, 16, cfg.qk_rope_head_dim)
    launches, execute = [], engine.runner.execute
    engine.runner.execute = lambda out: (launches.append(out.num_steps), execute(out))[1]
    p = RequestParams(max_tokens=NEW, ignore_eos=True)
    rids = [engine.add_request(prompts[0], p), engine.add_request(prompts[1], p)]
    got: dict[str, list[int]] = {r: [] for r in rids}
    steps = 0
    while engine.has_unfinished():
        if steps == 2:  # later arrivals
            rids += [engine.add_request(q, p) for q in prompts[2:]]
            got.update({r: [] for r in rids[2:]})
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
        steps += 1
    assert [got[r] for r in rids] == ref
    s = engine.stats()
    assert s.kv_pages_used == 0 and max(launches) == decode_steps
    assert s.num_preemptions > 0 or num_pages > 7


def test_mla_refuses_a_tensor_mesh(tiny):
    cfg, params = tiny
    with pytest.raises(UserError, match="tensor-parallel MLA"):
        Engine(
            params,
            cfg,
            config=engine_config(max_model_len=96),
            mesh=make_mesh("tensor=2", jax.devices()[:2]),
            warmup=False,
            compilation_cache_dir=None,
        )
