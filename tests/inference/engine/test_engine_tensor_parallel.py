"""The engine tensor-parallel on 8 fake CPU devices: the step runs in shard_map over `tensor`
with the pages split on their KV-head axis (2 KV heads: split at TP 2, replicated to one a
device at TP 4 and 8); greedy outputs equal the single-device `generate`'s."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxturbo.errors import UserError
from jaxturbo.inference import generate
from jaxturbo.inference.engine.engine import Engine
from jaxturbo.inference.engine.params import RequestParams
from jaxturbo.models.transformer import PagedCache
from jaxturbo.parallel.mesh import make_mesh
from jaxturbo.parallel.tensor import cache_specs
from tests.inference.engine.models import engine_config, random_prompts, tiny_model

NEW = 8


@pytest.fixture(scope="module")
def model():
    cfg, params = tiny_model(seed=6)
    prompts = random_prompts((6, 37, 19), cfg.vocab_size, seed=2)
    ref = generate(params, cfg, prompts, max_new_tokens=NEW, bucket_multiple=16).sequences()
    return cfg, params, prompts, ref


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tensor_parallel_greedy_matches_single_device_generate(model, tp):
    cfg, params, prompts, ref = model
    mesh = make_mesh(f"tensor={tp}", jax.devices()[:tp])
    engine = Engine(
        params,
        cfg,
        config=engine_config(num_pages=10),
        mesh=mesh,
        sort_variants=False,
        compilation_cache_dir=None,
    )
    k_pages = engine.runner.pages[0]
    assert k_pages.shape[3] == max(cfg.num_key_value_heads, tp)  # global KV heads
    assert k_pages.sharding.spec == P(None, None, None, "tensor", None)
    assert k_pages.addressable_shards[0].data.shape[3] == max(cfg.num_key_value_heads, tp) // tp
    got = engine.generate(prompts, RequestParams(max_tokens=NEW, ignore_eos=True))
    assert [c.token_ids for c in got] == ref


def test_paged_cache_specs_and_mesh_checks(model):
    cfg, params, _, _ = model
    mesh = make_mesh("tensor=2", jax.devices()[:2])
    spec = cache_specs(mesh, PagedCache(*([None] * 6), sliding_window=4))
    assert spec.k_pages == spec.v_pages == P(None, None, None, "tensor", None)
    assert spec.page_tables == spec.slot_mapping == P() and spec.sliding_window == 4
    with pytest.raises(UserError, match="'tensor' only"):
        Engine(
            params,
            cfg,
            config=engine_config(),
            mesh=make_mesh("data=2", jax.devices()[:2]),
            warmup=False,
            compilation_cache_dir=None,
        )
