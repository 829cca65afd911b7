"""After warm-up the engine never compiles: a varied workload (prompt lengths, arrivals between
steps, aborts, preemption, greedy and top-k/top-p rows, both token buckets) runs on the
warm-up's programs.  Aborts free pages at once; a finished workload leaves every page free;
new weights swap in without a compilation and reset the prefix cache."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxturbo.inference import generate
from jaxturbo.inference.engine.engine import Engine
from jaxturbo.inference.engine.model_runner import StepShape
from jaxturbo.inference.engine.params import RequestParams
from tests.inference.engine.models import engine_config, random_prompts, tiny_model

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def engine():
    cfg, params = tiny_model(seed=21)
    # two token buckets x one sequence bucket x (plain, top-k/top-p) = 4 programs; 7 usable
    # pages for up to 4 requests of up to 5 pages each: preemption
    config = engine_config(num_pages=8, token_buckets=(16, 32))
    return Engine(params, cfg, config=config, compilation_cache_dir=None)


class CompileCounter:
    def __init__(self):
        self.count = 0

    def __call__(self, event: str, duration: float, **kw) -> None:
        if event == BACKEND_COMPILE:
            self.count += 1


def test_no_compilation_after_warmup(engine):
    assert engine.runner.num_compiles == 4
    assert set(engine.runner._compiled) == {
        StepShape(t, 4, s) for t in (16, 32) for s in (False, True)
    }
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    try:
        rng = np.random.RandomState(0)
        shapes_seen, steps, aborted = set(), 0, []
        execute = engine.runner.execute

        def spy(out):
            shapes_seen.add(engine.runner.shape_of(out))
            return execute(out)

        engine.runner.execute = spy
        # popped from the end: two long greedy prompts first (a full 32-token greedy step)
        pending = [int(n) for n in rng.randint(3, 60, size=10)] + [49, 47]
        while pending or engine.has_unfinished():
            if pending and steps % 2 == 0:
                n = pending.pop()
                sampled = n % 3 == 0
                p = RequestParams(
                    max_tokens=int(rng.randint(1, 15)),
                    ignore_eos=True,
                    temperature=0.9 if sampled else 0.0,
                    top_k=10 if sampled else 0,
                    top_p=0.8 if sampled else 1.0,
                    seed=n,
                )
                rid = engine.add_request(random_prompts((n,), seed=n)[0], p)
                if n % 5 == 0:
                    aborted.append(rid)
            if steps == 6 and aborted:
                used = engine.stats().kv_pages_used
                assert engine.abort(aborted[0])
                assert engine.stats().kv_pages_used < used or used == 0  # freed at once
            engine.step()
            steps += 1
        engine.runner.execute = execute
    finally:
        jax.monitoring.unregister_event_duration_listener(counter)
    assert counter.count == 0 and engine.runner.num_compiles == 4
    assert shapes_seen == set(engine.runner._compiled)  # every program ran
    s = engine.stats()
    assert s.num_preemptions > 0
    assert s.kv_pages_used == 0 and s.kv_pages_free == 7 and s.num_running == s.num_waiting == 0


def test_abort_frees_pages_at_once(engine):
    rid = engine.add_request(random_prompts((40,), seed=1)[0], RequestParams(max_tokens=20))
    engine.step()
    engine.step()
    assert engine.stats().kv_pages_used >= 3
    assert engine.abort(rid) and not engine.abort(rid)
    assert engine.stats().kv_pages_used == 0
    while engine.has_unfinished():  # the step in flight finishes; its output is dropped
        assert engine.step() == []


def test_update_weights_swaps_without_compiling_and_resets_the_prefix_cache(engine):
    cfg = engine.cfg
    prompt = random_prompts((40,), seed=2)[0]
    p = RequestParams(max_tokens=6, ignore_eos=True)
    engine.generate([prompt], p)  # the prompt's two full pages are now cached
    _, new = tiny_model(seed=22)
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    try:
        engine.update_weights(new)
        got = engine.generate([prompt], p)[0].token_ids
    finally:
        jax.monitoring.unregister_event_duration_listener(counter)
    assert counter.count == 0
    # stale K/V from the old weights would change the continuation
    assert got == generate(new, cfg, [prompt], max_new_tokens=6, bucket_multiple=16).sequences()[0]
