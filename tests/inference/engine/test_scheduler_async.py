"""Asynchronous scheduling (commit_step / resolve_tokens): step N+1 is scheduled and run before
step N's tokens reach the scheduler, decode inputs being placeholders the device fills in.  On
random traffic (shared prefixes, stops, stop strings, preemption, sliding windows) every request
gets exactly the tokens and finish reason of the synchronous protocol; with aborts too, the
invariants hold after every step and every page ends free.  Pages holding a placeholder are
registered in the prefix cache only once its value is known."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from hypothesis import HealthCheck, given, settings

from jaxturbo.errors import UserError
from jaxturbo.inference.engine.request import PLACEHOLDER_TOKEN, FinishReason, Request
from jaxturbo.inference.engine.scheduler import SchedulerOutput
from tests.inference.engine.sim import (
    FakeDevice,
    check_invariants,
    fake_token,
    make_scheduler,
    take_outputs,
)
from tests.inference.engine.test_scheduler_properties import EOS, MAX_MODEL_LEN, VOCAB, scenarios


def run(sc: dict, asynchronous: bool) -> tuple[dict, dict]:
    """Drive a scenario; returns (outputs, finish reasons) per accepted request."""
    specs = sc["requests"]
    sched = make_scheduler(
        max_model_len=MAX_MODEL_LEN, **{k: v for k, v in sc.items() if k != "requests"}
    )
    device = FakeDevice(sched, vocab=VOCAB)
    true: dict[str, list[int]] = {}  # every request's tokens as the device knows them
    outputs: dict[str, list[int]] = defaultdict(list)
    reasons: dict[str, FinishReason] = {}
    arrivals = sorted(enumerate(specs), key=lambda x: x[1]["arrive"])

    def launch(out: SchedulerOutput) -> dict[str, int]:
        # the device feeds its own previous samples where the host has placeholders
        real = dataclasses.replace(
            out,
            scheduled=tuple(
                dataclasses.replace(
                    sr,
                    token_ids=tuple(
                        true[sr.request_id][sr.start_position + j] if t == PLACEHOLDER_TOKEN else t
                        for j, t in enumerate(sr.token_ids)
                    ),
                )
                for sr in out.scheduled
            ),
        )
        sampled = device.run(real, true)
        for rid, t in sampled.items():
            true[rid].extend((t,) if isinstance(t, int) else t)
        return sampled

    def take(results) -> None:
        for o in results:
            rid = o.request_id
            reason = take_outputs(sched, o, outputs[rid], specs[int(rid[1:])]["stop_string_after"])
            if reason is not None:
                reasons[rid] = reason

    def aborts(step: int, between: bool) -> None:
        for i, s in enumerate(specs):
            if s["abort"] == (step, between) and sched.abort_request(f"r{i}"):
                reasons[f"r{i}"] = FinishReason.ABORT

    inflight, step = None, 0
    while arrivals or sched.has_unfinished() or inflight is not None:
        assert step < 5000, "no progress"
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
                continue
            true[req.request_id] = list(s["prompt"])
            outputs[req.request_id] = []
        aborts(step, False)
        if not asynchronous:
            out = sched.schedule()
            check_invariants(sched, out)
            aborts(step, True)
            take(sched.update_from_output(launch(out)))
        else:
            if inflight is None:
                out = sched.schedule()
                check_invariants(sched, out)
                if not out.is_empty:
                    inflight = launch(out)
                    sched.commit_step()
            if inflight is not None:
                nxt = sched.schedule()  # before the in-flight step's tokens are known
                check_invariants(sched, nxt)
                for sr in nxt.scheduled:  # placeholders: the last step's tokens, at the end
                    r = sched.get_request(sr.request_id)
                    toks = r.all_token_ids
                    assert PLACEHOLDER_TOKEN not in toks[: r.num_known_tokens]
                    assert r.num_tokens - r.num_known_tokens <= sched.config.decode_steps
                aborts(step, True)
                following = None if nxt.is_empty else launch(nxt)
                take(sched.resolve_tokens(inflight))
                if following is not None:
                    sched.commit_step()
                inflight = following
        check_invariants(sched)
        for r in sched.running:  # pages are hashed only over known tokens
            assert r.num_cached_pages * sched.config.page_size <= r.num_known_tokens
        step += 1

    pool = sched.kv.pool
    assert pool.num_free == pool.num_usable and pool.num_used == 0
    assert not sched.running and sched.num_waiting == 0 and not sched.has_unresolved
    for rid, toks in outputs.items():
        assert PLACEHOLDER_TOKEN not in toks
        p0 = len(specs[int(rid[1:])]["prompt"])
        assert toks == [fake_token(rid, p0 + k, VOCAB) for k in range(len(toks))]
    return dict(outputs), reasons


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def without_aborts(sc: dict) -> dict:
    return {**sc, "requests": [{**s, "abort": None} for s in sc["requests"]]}


def single_steps(sc: dict) -> dict:
    return {**sc, "decode_steps": 1}


@SETTINGS
@given(scenarios(windowed=False))
def test_async_gives_the_synchronous_tokens(sc):
    """...and multi-step decodes (when the scenario draws decode_steps > 1) give the tokens
    and finish reasons of single steps, with either protocol."""
    sc = without_aborts(sc)
    reference = run(single_steps(sc), asynchronous=False)
    assert run(sc, asynchronous=True) == reference
    assert run(sc, asynchronous=False) == reference


@SETTINGS
@given(scenarios(windowed=True))
def test_async_gives_the_synchronous_tokens_with_a_window(sc):
    sc = without_aborts(sc)
    reference = run(single_steps(sc), asynchronous=False)
    assert run(sc, asynchronous=True) == reference
    assert run(sc, asynchronous=False) == reference


@SETTINGS
@given(scenarios(windowed=False, pressure=True))
def test_async_under_page_pressure_with_aborts(sc):
    _, reasons = run(sc, asynchronous=True)
    assert all(isinstance(r, FinishReason) for r in reasons.values())


def test_stop_token_relabels_a_length_finish_and_placeholder_pages_wait():
    """max_tokens reached at the commit: the request finishes "length" before its last token is
    known; that token being a stop token makes it "stop".  A page whose last token is a
    placeholder is hashed for the prefix cache only after resolve_tokens."""
    sched = make_scheduler(num_pages=8, max_num_batched_tokens=64)
    stop = fake_token("a", 15, 1000)
    a = Request("a", list(range(1, 16)), max_tokens=1, stop_token_ids=(stop,))
    b = Request("b", list(range(1, 16)), max_tokens=5)  # its decode completes page 0 (16 tokens)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sched.commit_step()
    assert a.is_finished and a.finish_reason is FinishReason.LENGTH
    assert b.all_token_ids[-1] == PLACEHOLDER_TOKEN and b.num_known_tokens == 15
    nxt = sched.schedule()  # b decodes its placeholder: page 0 now full
    assert nxt.scheduled[0].token_ids == (PLACEHOLDER_TOKEN,)
    assert sched.kv.pool.num_cached == 0  # page 0 ends in a placeholder: not hashed yet
    outs = sched.resolve_tokens(
        {sr.request_id: fake_token(sr.request_id, sr.seq_len, 1000) for sr in out.scheduled}
    )
    assert a.finish_reason is FinishReason.STOP
    assert [(o.request_id, o.finish_reason) for o in outs] == [
        ("a", FinishReason.STOP),
        ("b", None),
    ]
    sched.commit_step()
    sched.schedule()  # b's next allocation registers page 0
    assert sched.kv.pool.num_cached == 1
