"""The engine's greedy outputs equal the static `generate`'s token for token: requests that
arrive at different steps, prompts longer than the step budget (chunked prefill), a page pool
too small for all of them (preemption and recompute), shared prefixes (prefix-cache hits), with
asynchronous and synchronous scheduling, steps launched from the dispatch thread or not; and a
sliding window against windowed dense attention."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from jaxturbo.inference import generate
from jaxturbo.inference.engine.engine import Engine
from jaxturbo.inference.engine.params import RequestParams
from jaxturbo.models.transformer import forward
from tests.inference.engine.models import engine_config, random_prompts, tiny_model

NEW = 12
LENGTHS = (5, 40, 17, 70, 33, 9)


@pytest.fixture(scope="module")
def model():
    cfg, params = tiny_model(seed=3)
    prompts = random_prompts(LENGTHS, cfg.vocab_size, seed=4)
    prompts.append(prompts[1][:32] + prompts[2][:6])  # two full pages shared with prompt 1
    ref = generate(params, cfg, prompts, max_new_tokens=NEW, bucket_multiple=16).sequences()
    return cfg, params, prompts, ref


def run_arrivals(engine: Engine, prompts: list[list[int]]) -> dict[int, list[int]]:
    """Add prompts in three waves between steps; collect each request's streamed tokens."""
    p = RequestParams(max_tokens=NEW, ignore_eos=True)
    ids, got = {}, {}
    waves = [[0, 1], [2, 3, 6], [4, 5]]
    for w, wave in enumerate(waves):
        for i in wave:
            ids[engine.add_request(prompts[i], p)] = i
            got[i] = []
        for _ in range(3 if w < len(waves) - 1 else 10**6):
            if not engine.has_unfinished():
                break
            for o in engine.step():
                assert o.index == 0 and 1 <= len(o.new_token_ids) <= engine.config.decode_steps
                got[ids[o.request_id]] += o.new_token_ids
                if o.finished:
                    assert o.finish_reason == "length"
                    assert len(got[ids[o.request_id]]) == NEW
    return got


@pytest.mark.parametrize(
    "async_scheduling, dispatch_thread, decode_steps",
    [(True, True, 1), (True, False, 1), (False, True, 1), (True, True, 3), (False, False, 3)],
)
def test_arrivals_chunks_preemption_and_prefix_hits_match_generate(
    model, async_scheduling, dispatch_thread, decode_steps
):
    cfg, params, prompts, ref = model
    # 11 usable pages of 16 tokens for requests of up to 82 tokens: preemption; a 32-token
    # budget with 24-token chunks: the 33..70-token prompts prefill in several steps
    config = engine_config(num_pages=12, long_prefill_token_threshold=24, decode_steps=decode_steps)
    engine = Engine(
        params,
        cfg,
        config=config,
        sort_variants=False,
        compilation_cache_dir=None,
        async_scheduling=async_scheduling,
        dispatch_thread=dispatch_thread,
    )
    launches, execute = [], engine.runner.execute
    engine.runner.execute = lambda out: (launches.append(out.num_steps), execute(out))[1]
    got = run_arrivals(engine, prompts)
    for i in range(len(prompts)):
        assert got[i] == ref[i], f"prompt {i} ({len(prompts[i])} tokens)"
    s = engine.stats()
    assert s.num_preemptions > 0
    assert max(launches) == decode_steps  # multi-step decodes ran (when asked for)
    assert s.prefix_saved_tokens >= 32  # prompt 6 took prompt 1's two pages
    assert s.prefill_tokens_computed >= s.prompt_tokens - s.prefix_saved_tokens
    assert s.kv_pages_used == 0 and s.num_running == s.num_waiting == 0
    assert s.kv_pages_free == s.kv_pages_total == 11 and s.capacity_tokens == 11 * 16
    # a second pass over the same engine: cached pages now serve whole prompts, same tokens
    again = engine.generate(prompts, RequestParams(max_tokens=NEW, ignore_eos=True))
    assert [c.token_ids for c in again] == ref
    assert engine.stats().prefix_saved_tokens > s.prefix_saved_tokens
    assert engine.runner.num_compiles == len(engine.runner.step_shapes())  # warm-up only


def windowed_greedy(params, cfg, prompts, n, window):
    """Greedy continuation through the cache-free forward with a windowed causal mask."""
    attn = functools.partial(
        pallas_kernels.attention, causal=True, sliding_window=window - 1, implementation="xla"
    )
    width = max(map(len, prompts)) + n
    step = jax.jit(
        lambda toks: forward(params, cfg, toks, attn_fn=lambda q, k, v, segment_ids: attn(q, k, v))[
            0
        ]
    )
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        rows = jnp.asarray([s + [0] * (width - len(s)) for s in seqs])
        logits = np.asarray(step(rows))
        for s, row in zip(seqs, logits):
            s.append(int(row[len(s) - 1].argmax()))
    return [s[len(p) :] for s, p in zip(seqs, prompts)]


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_sliding_window_releases_pages_and_matches_windowed_attention(model, decode_steps):
    cfg, params, prompts, ref = model
    window = 20
    config = engine_config(
        sliding_window=window, long_prefill_token_threshold=16, decode_steps=decode_steps
    )
    engine = Engine(params, cfg, config=config, sort_variants=False, compilation_cache_dir=None)
    released = []
    execute = engine.runner.execute

    launches = []

    def spy(out):  # page tables with entries the window released (null page 0)
        released.extend(sr.request_id for sr in out.scheduled if 0 in sr.page_table)
        launches.append(out.num_steps)
        return execute(out)

    engine.runner.execute = spy
    long = [prompts[i] for i in (1, 3, 4)]
    got = engine.generate(long, RequestParams(max_tokens=NEW, ignore_eos=True))
    assert released, "no page left the window"
    assert max(launches) == decode_steps
    expected = windowed_greedy(params, cfg, long, NEW, window)
    assert [c.token_ids for c in got] == expected
    assert expected != [ref[i] for i in (1, 3, 4)]  # the window changes these continuations
    assert engine.stats().kv_pages_used == 0
