"""Property tests: random traffic through schedule() / update_from_output() on a small page pool.

Arrivals with shared prefixes (so prefix hits happen), random priorities, stops, aborts (also
between schedule() and the step's result) and stop-string finishes; a pool small enough to force
preemptions.  After every step: the structural invariants of `sim.check_invariants`, and the fake
device's check that every position a scheduled token attends holds that request's own K/V.  At
the end every request finished, its tokens are the sampler's, and every page is free again.
"""

from __future__ import annotations

from collections import defaultdict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxturbo.errors import UserError
from jaxturbo.inference.engine.request import FinishReason, Request
from tests.inference.engine.sim import (
    FakeDevice,
    check_invariants,
    fake_token,
    make_scheduler,
    take_outputs,
)

PS = 16
VOCAB = 32
EOS = 0
MAX_MODEL_LEN = 160
# three long shared bases over a small alphabet: prompts start with a prefix of one of them
BASES = [[1 + (i * k) % 5 for i in range(96)] for k in (1, 2, 3)]


@st.composite
def request_specs(draw, pressure: bool = False):
    base = BASES[draw(st.integers(0, len(BASES) - 1))]
    prefix = base[: draw(st.sampled_from([0, 5, 16, 32, 40, 48, 64]))]
    suffix = draw(st.lists(st.integers(1, 6), min_size=0 if prefix else 1, max_size=20))
    return dict(
        prompt=prefix + suffix,
        max_tokens=draw(st.integers(1, 40)),
        priority=draw(st.integers(0, 2)),
        ignore_eos=True if pressure else draw(st.booleans()),
        stop=draw(st.sampled_from([(), (7,), (3, 5)])),
        arrive=draw(st.integers(0, 3 if pressure else 12)),
        # abort at a step (before schedule, or between schedule and the step's result)
        abort=draw(st.none() | st.tuples(st.integers(0, 60), st.booleans())),
        stop_string_after=draw(
            st.none() | st.integers(1, 10)
        ),  # outputs before the caller stops it
    )


@st.composite
def scenarios(draw, windowed: bool, pressure: bool = False):
    """pressure: requests arrive together and ignore EOS in a pool of 5-9 pages, so running ones
    keep growing into each other and preempt (victims also among those already scheduled)."""
    max_num_seqs = draw(st.integers(2 if pressure else 1, 6))
    return dict(
        num_pages=draw(st.integers(5, 9) if pressure else st.integers(4, 14)),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=draw(st.integers(max_num_seqs, 72)),
        long_prefill_token_threshold=draw(st.none() | st.integers(1, 40)),
        enable_prefix_caching=draw(st.booleans()),
        sliding_window=draw(st.integers(1, 40)) if windowed else None,
        decode_steps=draw(st.sampled_from([1, 1, 3, 4])),
        requests=draw(
            st.lists(request_specs(pressure), min_size=3 if pressure else 1, max_size=12)
        ),
    )


def run_scenario(sc: dict) -> None:
    specs = sc.pop("requests")
    sched = make_scheduler(max_model_len=MAX_MODEL_LEN, **sc)
    device = FakeDevice(sched, vocab=VOCAB)
    tokens_of: dict[str, list[int]] = {}
    outputs: dict[str, list[int]] = defaultdict(list)
    reasons: dict[str, FinishReason] = {}
    accepted: dict[str, Request] = {}
    arrivals = sorted(enumerate(specs), key=lambda x: x[1]["arrive"])
    step = 0
    while arrivals or sched.has_unfinished():
        assert step < 5000, "the scheduler stopped making progress"
        while arrivals and arrivals[0][1]["arrive"] <= step:
            i, s = arrivals.pop(0)
            req = Request(
                f"r{i}",
                s["prompt"],
                s["max_tokens"],
                priority=s["priority"],
                ignore_eos=s["ignore_eos"],
                stop_token_ids=s["stop"],
                eos_token_ids=(EOS,),
            )
            try:
                sched.add_request(req)
            except UserError:
                # only a request that can never fit is refused
                need = sched.kv.max_pages_needed(
                    min(len(s["prompt"]) + s["max_tokens"], MAX_MODEL_LEN) - 1,
                    sched.config.max_chunk_tokens,
                )
                assert need > sched.kv.num_usable_pages
                continue
            accepted[req.request_id] = req
            tokens_of[req.request_id] = list(s["prompt"])
        for i, s in enumerate(specs):
            if s["abort"] == (step, False) and sched.abort_request(f"r{i}"):
                reasons[f"r{i}"] = FinishReason.ABORT
        check_invariants(sched)

        out = sched.schedule()
        check_invariants(sched, out)
        for i, s in enumerate(specs):
            if s["abort"] == (step, True) and sched.abort_request(f"r{i}"):
                reasons[f"r{i}"] = FinishReason.ABORT
        sampled = device.run(
            out, tokens_of
        )  # the step runs as scheduled, aborted requests included
        for o in sched.update_from_output(sampled):
            rid = o.request_id
            tokens_of[rid].extend(o.new_token_ids)
            reason = take_outputs(sched, o, outputs[rid], specs[int(rid[1:])]["stop_string_after"])
            if reason is not None:
                reasons[rid] = reason
        check_invariants(sched)
        step += 1

    # every page is free again (cached pages are evictable), nothing is left running or waiting
    pool = sched.kv.pool
    assert pool.num_free == pool.num_usable and pool.num_used == 0
    assert not sched.running and sched.num_waiting == 0
    assert sorted(reasons) == sorted(accepted)
    for rid, req in accepted.items():
        after = specs[int(rid[1:])]["stop_string_after"]
        by_caller = reasons[rid] is FinishReason.STOP and len(outputs[rid]) == after
        assert req.is_finished and (by_caller or req.finish_reason is reasons[rid])
        # the caller's stop drops the tokens of a multi-step decode after it
        assert req.output_token_ids[: len(outputs[rid])] == outputs[rid]
        assert by_caller or req.output_token_ids == outputs[rid]
        p0 = req.num_prompt_tokens
        assert outputs[rid] == [fake_token(rid, p0 + k, VOCAB) for k in range(len(outputs[rid]))]
        if reasons[rid] is FinishReason.LENGTH:
            assert len(outputs[rid]) == req.max_tokens or req.num_tokens == MAX_MODEL_LEN
        if reasons[rid] is FinishReason.STOP and outputs[rid] and not by_caller:
            assert outputs[rid][-1] in req.stop_token_ids or (
                not req.ignore_eos and outputs[rid][-1] == EOS
            )
        # no earlier token should have stopped it
        for t in outputs[rid][:-1]:
            assert t not in req.stop_token_ids and (req.ignore_eos or t != EOS)
    stats = sched.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.kv.prefix_hit_tokens <= stats.kv.prefix_query_tokens


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(scenarios(windowed=False))
def test_random_traffic_full_attention(sc):
    run_scenario(sc)


@SETTINGS
@given(scenarios(windowed=True))
def test_random_traffic_sliding_window(sc):
    run_scenario(sc)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(windowed=False, pressure=True))
def test_random_traffic_under_page_pressure(sc):
    run_scenario(sc)
