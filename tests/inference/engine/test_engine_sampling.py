"""Per-row sampling: the filters with per-row parameters equal the static ones row by row; a
seeded request draws the same tokens alone and in any batch; n samples share the prompt's pages;
logprobs and top alternatives; stop token ids, EOS and stop strings (cut from the text)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxturbo.errors import UserError
from jaxturbo.inference.engine.engine import Engine
from jaxturbo.inference.engine.params import RequestParams
from jaxturbo.inference.sampling import filter_logits, sample_rows
from jaxturbo.models.transformer import forward
from tests.inference.engine.models import AsciiTokenizer, engine_config, random_prompts, tiny_model


# ----------------------------------------------------------------------------- the sampler
def test_per_row_filters_equal_the_static_filters_row_by_row():
    x = jax.random.normal(jax.random.key(0), (5, 40)) * 3
    rows = [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.7, 0.0), (8, 0.9, 0.1), (0, 1.0, 0.3)]
    k, p, m = (jnp.asarray([r[i] for r in rows]) for i in range(3))
    got = np.asarray(filter_logits(x, k.astype(jnp.int32), p.astype(jnp.float32), m))
    for i, (ki, pi, mi) in enumerate(rows):
        want = np.asarray(filter_logits(x[i : i + 1], top_k=ki, top_p=pi, min_p=mi))[0]
        np.testing.assert_array_equal(got[i], want)
    kept = np.isfinite(got).sum(axis=1)
    assert kept[0] == 40 and kept[1] == 5 and kept[2] < 40 and kept[3] <= 8
    # min_p: kept iff p_i >= min_p * p_max
    probs = np.asarray(jax.nn.softmax(x[4]))
    np.testing.assert_array_equal(np.isfinite(got[4]), probs >= 0.3 * probs.max())


def test_sample_rows_streams_follow_seed_and_position_not_the_row():
    logits = jax.random.normal(jax.random.key(1), (4, 64))
    temp = jnp.asarray([1.0, 0.0, 1.0, 0.5])
    seeds = jnp.asarray([7, 7, 9, 7], jnp.uint32)
    pos = jnp.asarray([3, 3, 3, 4], jnp.int32)
    tok, logp, top_ids, top_logp = sample_rows(logits, temp, seeds, pos, num_top_logprobs=3)
    perm = jnp.asarray([2, 0, 3, 1])
    tok2, *_ = sample_rows(logits[perm], temp[perm], seeds[perm], pos[perm])
    np.testing.assert_array_equal(np.asarray(tok)[np.asarray(perm)], np.asarray(tok2))
    assert int(tok[1]) == int(jnp.argmax(logits[1]))  # temperature 0
    ref = jax.nn.log_softmax(logits / jnp.where(temp > 0, temp, 1.0)[:, None])
    np.testing.assert_allclose(np.asarray(logp), np.asarray(ref[jnp.arange(4), tok]), rtol=1e-6)
    assert top_ids.shape == (4, 3) and bool(jnp.all(top_logp[:, :-1] >= top_logp[:, 1:]))


# ----------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def engine():
    cfg, params = tiny_model(seed=11, eos_token_id=(66,))
    return Engine(
        params,
        cfg,
        AsciiTokenizer(),
        engine_config(),
        max_top_logprobs=3,
        compilation_cache_dir=None,
    )


def test_seeded_sample_is_the_same_alone_and_in_a_batch(engine):
    prompt, others = random_prompts((23, 9, 41), seed=3)[0], random_prompts((9, 41), seed=5)
    p = RequestParams(
        max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, min_p=0.02, seed=7, ignore_eos=True
    )
    alone = engine.generate([prompt], p)[0].token_ids
    mixed = engine.generate(
        [others[0], prompt, others[1]],
        [
            RequestParams(max_tokens=14, temperature=0.8, seed=1, ignore_eos=True),
            p,
            RequestParams(max_tokens=6, ignore_eos=True),
        ],
    )
    assert mixed[1].token_ids == alone and len(alone) == 10
    other_seed = engine.generate([prompt], RequestParams(**{**p.__dict__, "seed": 8}))[0]
    assert other_seed.token_ids != alone


def test_n_samples_share_the_prompt_pages(engine):
    prompt = random_prompts((40,), seed=9)[0]
    before = engine.stats().prefix_saved_tokens
    out = engine.generate(
        [prompt], RequestParams(max_tokens=8, temperature=2.0, n=3, seed=4, ignore_eos=True)
    )[0]
    assert [s.index for s in out.samples] == [0, 1, 2]
    assert all(len(s.token_ids) == 8 for s in out.samples)
    assert len({tuple(s.token_ids) for s in out.samples}) > 1  # distinct streams
    assert engine.stats().prefix_saved_tokens - before >= 2 * 32  # two full pages, twice
    assert engine.stats().kv_pages_used == 0


def test_logprobs_are_the_models(engine):
    prompt = random_prompts((12,), seed=10)[0]
    out = engine.generate(
        [prompt], RequestParams(max_tokens=6, logprobs=True, top_logprobs=3, ignore_eos=True)
    )[0].samples[0]
    seq = jnp.asarray([prompt + out.token_ids])
    logits, _ = forward(engine.runner.params, engine.cfg, seq)
    ref = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
    want = [ref[len(prompt) - 1 + i, t] for i, t in enumerate(out.token_ids)]
    np.testing.assert_allclose(out.logprobs, want, rtol=1e-4, atol=1e-5)
    for tok, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        assert len(top) == 3 and top[0][0] == tok and abs(top[0][1] - lp) < 1e-6
        assert top[0][1] >= top[1][1] >= top[2][1]


def test_stop_token_ids_eos_and_stop_strings(engine):
    prompt = random_prompts((15,), seed=12)[0]
    free = engine.generate([prompt], RequestParams(max_tokens=12, ignore_eos=True))[0]
    toks, text = free.token_ids, free.text
    assert text == AsciiTokenizer().decode(toks) and free.samples[0].finish_reason == "length"
    # a stop token id ends the sample on it (the token is kept)
    by_id = engine.generate(
        [prompt], RequestParams(max_tokens=12, stop_token_ids=[toks[3]], ignore_eos=True)
    )[0]
    first = toks.index(toks[3])
    assert by_id.token_ids == toks[: first + 1] and by_id.samples[0].finish_reason == "stop"
    # the model's EOS (id 66) ends it unless ignore_eos
    with_eos = engine.generate([prompt], RequestParams(max_tokens=12))[0]
    assert 66 in toks[:-1] and with_eos.token_ids == toks[: toks.index(66) + 1]
    assert with_eos.samples[0].finish_reason == "stop"
    # a stop string is cut from the text, streamed deltas never show part of it
    stop = text[5:7]
    rid = engine.add_request(prompt, RequestParams(max_tokens=12, stop=[stop], ignore_eos=True))
    deltas, reason = [], None
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id == rid
            deltas.append(o.new_text)
            reason = o.finish_reason or reason
    assert "".join(deltas) == text[: text.find(stop)] and reason == "stop"
    assert engine.stats().kv_pages_used == 0


def count_launches(engine: Engine) -> list[int]:
    """The num_steps of every step the engine launches from now on."""
    steps, execute = [], engine.runner.execute

    def counted(out):
        steps.append(out.num_steps)
        return execute(out)

    engine.runner.execute = counted
    return steps


def test_multi_step_decode_gives_the_single_step_samples(engine):
    """Four decode steps per launch: the same seeded tokens, logprobs, stops (a stop token or
    string inside a launch drops the tokens after it) and texts as one step per launch."""
    multi = Engine(
        engine.runner.params,
        engine.cfg,
        AsciiTokenizer(),
        engine_config(decode_steps=4),
        max_top_logprobs=3,
        compilation_cache_dir=None,
    )
    prompts = random_prompts((15, 23, 9, 30), seed=12)
    free = engine.generate(prompts[:1], RequestParams(max_tokens=13, ignore_eos=True))[0]
    params = [
        RequestParams(max_tokens=13, stop_token_ids=[free.token_ids[5]], ignore_eos=True),
        RequestParams(
            max_tokens=11, temperature=1.0, top_k=20, top_p=0.9, seed=3, logprobs=True, n=2
        ),
        RequestParams(max_tokens=13, stop=[free.text[6:8]], ignore_eos=True, top_logprobs=3),
        RequestParams(max_tokens=9, temperature=0.7, min_p=0.05, seed=5),
    ]
    prompts[2] = prompts[0]
    launches = count_launches(multi)
    want, got = engine.generate(prompts, params), multi.generate(prompts, params)
    assert 4 in launches
    for w, g in zip(want, got):
        for ws, gs in zip(w.samples, g.samples):
            assert (gs.token_ids, gs.text, gs.finish_reason) == (
                ws.token_ids,
                ws.text,
                ws.finish_reason,
            )
            if ws.logprobs is not None:
                np.testing.assert_allclose(gs.logprobs, ws.logprobs, rtol=1e-5, atol=1e-6)
            if ws.top_logprobs is not None:
                assert [[i for i, _ in t] for t in gs.top_logprobs] == [
                    [i for i, _ in t] for t in ws.top_logprobs
                ]
    assert got[0].samples[0].finish_reason == "stop" and len(got[0].token_ids) < 13
    assert got[2].samples[0].finish_reason == "stop"
    assert multi.stats().kv_pages_used == 0
    # switched while idle only; back to one step per launch, nothing more compiles
    rid = multi.add_request(prompts[0], params[0])
    with pytest.raises(UserError, match="set_decode_steps\\(\\) needs an idle engine"):
        multi.set_decode_steps(1)
    multi.abort(rid)
    compiled = multi.runner.num_compiles
    multi.set_decode_steps(1, progress=False)
    launches.clear()
    assert [c.token_ids for c in multi.generate(prompts, params)] == [c.token_ids for c in want]
    assert set(launches) == {1} and multi.runner.num_compiles == compiled


def test_bad_request_params_name_the_value(engine):
    with pytest.raises(UserError, match="top_logprobs=4 exceeds"):
        engine.add_request([1, 2], RequestParams(top_logprobs=4))
    with pytest.raises(UserError, match="top_p=0"):
        RequestParams(top_p=0.0)
    with pytest.raises(UserError, match="stop="):
        RequestParams(stop="x")
