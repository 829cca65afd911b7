"""Scheduler: budgets, chunked prefill, stop rules, aborts, preemption by recompute."""

import pytest

from jaxturbo.errors import UserError
from jaxturbo.inference.engine.config import EngineConfig
from jaxturbo.inference.engine.kv_cache_manager import KVCacheManager
from jaxturbo.inference.engine.request import FinishReason, Request, RequestStatus
from jaxturbo.inference.engine.scheduler import Scheduler
from tests.inference.engine.sim import FakeDevice, check_invariants, fake_token, make_scheduler

PS = 16


class Driver:
    """schedule() -> fake device -> update_from_output(), with the invariants checked each step."""

    def __init__(self, sched: Scheduler, vocab: int = 1000) -> None:
        self.sched = sched
        self.device = FakeDevice(sched, vocab=vocab)
        self.tokens: dict[str, list[int]] = {}
        self.outs = []  # SchedulerOutput per step

    def add(self, req: Request) -> Request:
        self.sched.add_request(req)
        self.tokens[req.request_id] = list(req.prompt_token_ids)
        return req

    def step(self):
        out = self.sched.schedule()
        check_invariants(self.sched, out)
        self.outs.append(out)
        results = self.sched.update_from_output(self.device.run(out, self.tokens))
        for o in results:
            self.tokens[o.request_id].append(o.new_token_id)
        check_invariants(self.sched)
        return out, results

    def run(self, max_steps: int = 1000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("requests still unfinished")


def test_prefill_then_decode_until_max_tokens():
    d = Driver(make_scheduler(num_pages=8, max_num_batched_tokens=64, max_num_seqs=4))
    r = d.add(Request("a", list(range(1, 21)), max_tokens=3))
    out, res = d.step()
    (sr,) = out.scheduled
    assert (sr.token_ids, sr.start_position, sr.samples, sr.seq_len) == (
        tuple(range(1, 21)),
        0,
        True,
        20,
    )
    assert len(sr.page_table) == 2 and out.num_scheduled_tokens == 20
    assert [(o.new_token_id, o.finished) for o in res] == [(fake_token("a", 20, 1000), False)]
    out, res = d.step()
    (sr,) = out.scheduled
    assert sr.token_ids == (fake_token("a", 20, 1000),) and sr.start_position == 20
    d.step()
    assert r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 3
    assert not d.sched.has_unfinished() and d.sched.kv.pool.num_used == 0
    out = d.sched.schedule()
    assert out.is_empty and out.finished_ids == ("a",)  # the runner learns it may drop its state


def test_eos_stop_ids_ignore_eos_and_max_model_len():
    eos = fake_token("e", 4, 1000)  # the token "e" samples first
    d = Driver(make_scheduler(num_pages=8, max_model_len=8))
    e = d.add(Request("e", [1, 2, 3, 4], max_tokens=10, eos_token_ids=(eos,)))
    i = d.add(
        Request(
            "i",
            [1, 2, 3, 4],
            max_tokens=10,
            eos_token_ids=(fake_token("i", 4, 1000),),
            ignore_eos=True,
        )
    )
    s = d.add(Request("s", [1, 2, 3, 4], max_tokens=10, stop_token_ids=(fake_token("s", 5, 1000),)))
    d.run()
    assert e.finish_reason is FinishReason.STOP and e.output_token_ids == [eos]
    assert s.finish_reason is FinishReason.STOP and s.num_output_tokens == 2
    assert i.finish_reason is FinishReason.LENGTH and i.num_tokens == 8  # max_model_len


def test_chunked_prefill_under_budget_and_threshold():
    d = Driver(make_scheduler(num_pages=16, max_num_batched_tokens=32, max_num_seqs=4))
    d.add(Request("a", list(range(1, 101)), max_tokens=1))
    chunks = []
    while d.sched.has_unfinished():
        out, _ = d.step()
        chunks += [(sr.start_position, sr.num_tokens, sr.samples) for sr in out.scheduled]
    assert chunks == [(0, 32, False), (32, 32, False), (64, 32, False), (96, 4, True)]

    d = Driver(
        make_scheduler(
            num_pages=16, max_num_batched_tokens=32, max_num_seqs=4, long_prefill_token_threshold=12
        )
    )
    d.add(Request("b", list(range(1, 31)), max_tokens=1))
    d.add(Request("c", [1, 2], max_tokens=1))
    out, _ = d.step()
    assert [(sr.request_id, sr.num_tokens) for sr in out.scheduled] == [("b", 12), ("c", 2)]


def test_running_first_then_waiting_within_budget_and_seq_cap():
    d = Driver(make_scheduler(num_pages=32, max_num_batched_tokens=24, max_num_seqs=3))
    for k in range(4):
        d.add(Request(f"r{k}", list(range(1, 11)), max_tokens=5))
    out, _ = d.step()  # 24 tokens: r0 whole, r1 whole, r2 4-token chunk
    assert [(sr.request_id, sr.num_tokens) for sr in out.scheduled] == [
        ("r0", 10),
        ("r1", 10),
        ("r2", 4),
    ]
    out, _ = d.step()  # decodes first, then r2's next chunk; r3 waits for a sequence slot
    assert [(sr.request_id, sr.num_tokens) for sr in out.scheduled] == [
        ("r0", 1),
        ("r1", 1),
        ("r2", 6),
    ]
    assert d.sched.num_running == 3 and d.sched.num_waiting == 1


def test_priority_admits_urgent_first():
    d = Driver(make_scheduler(num_pages=32, max_num_batched_tokens=16, max_num_seqs=1))
    d.add(Request("low", [1, 2], max_tokens=1, priority=5))
    d.add(Request("high", [1, 2], max_tokens=1, priority=0))
    out, _ = d.step()
    assert [sr.request_id for sr in out.scheduled] == ["high"]


def test_add_request_rejections():
    sched = make_scheduler(num_pages=5, max_model_len=200)  # 4 usable pages = 64 tokens
    sched.add_request(Request("a", [1], max_tokens=1))
    with pytest.raises(UserError, match="request id 'a' is already in use"):
        sched.add_request(Request("a", [1], max_tokens=1))
    with pytest.raises(UserError, match="has 200 tokens; max_model_len=200 allows at most 199"):
        sched.add_request(Request("b", [1] * 200, max_tokens=1))
    with pytest.raises(UserError, match="may need 5 KV pages .* the pool has 4"):
        sched.add_request(Request("c", [1] * 60, max_tokens=6))  # 65 tokens computed at most
    sched.add_request(Request("d", [1] * 60, max_tokens=5))  # 64: fits exactly
    # a sliding window bounds the live pages, so a long request fits a small pool
    win = make_scheduler(
        num_pages=5,
        max_model_len=1000,
        sliding_window=16,
        max_num_batched_tokens=16,
        max_num_seqs=1,
    )
    win.add_request(Request("w", [1] * 500, max_tokens=100))


def test_abort_frees_pages_at_once():
    d = Driver(make_scheduler(num_pages=16, max_num_batched_tokens=64))
    a = d.add(Request("a", list(range(1, 41)), max_tokens=10))
    b = d.add(Request("b", list(range(1, 41)), max_tokens=10, priority=1))
    d.step()
    used = d.sched.kv.pool.num_used
    assert (
        d.sched.abort_request("a")
        and not d.sched.abort_request("a")
        and not d.sched.abort_request("zzz")
    )
    assert a.status is RequestStatus.FINISHED_ABORTED and a.page_table == []
    assert d.sched.kv.pool.num_used < used
    assert d.sched.finish_request("b", FinishReason.STOP)  # a stop string found by the caller
    assert b.status is RequestStatus.FINISHED_STOPPED and d.sched.kv.pool.num_used == 0
    w = Request("w", [1, 2], max_tokens=1)
    d.sched.add_request(w)
    assert d.sched.abort_request("w") and d.sched.num_waiting == 0 and d.sched.schedule().is_empty


def test_abort_between_schedule_and_result():
    d = Driver(make_scheduler(num_pages=16))
    d.add(Request("a", [1, 2, 3], max_tokens=5))
    d.add(Request("b", [1, 2, 3], max_tokens=5))
    d.step()
    out = d.sched.schedule()
    d.sched.abort_request("a")
    res = d.sched.update_from_output({"b": 7})  # a's token may be left out (or given)
    assert [o.request_id for o in res] == ["b"] and d.sched.get_request("a") is None
    assert d.sched.get_request("b").num_computed_tokens == 4 and len(out.scheduled) == 2


def test_step_protocol_errors():
    d = Driver(make_scheduler(num_pages=16))
    d.add(Request("a", [1, 2, 3], max_tokens=5))
    d.sched.schedule()
    with pytest.raises(RuntimeError, match="schedule\\(\\) called twice"):
        d.sched.schedule()
    with pytest.raises(ValueError, match="the step samples for \\['a'\\]"):
        d.sched.update_from_output({"b": 1})
    assert (
        d.sched.update_from_output({"a": 1})[0].new_token_id == 1
    )  # still pending after the bad call
    with pytest.raises(RuntimeError, match="no step is pending"):
        d.sched.update_from_output({"a": 1})
    with pytest.raises(ValueError, match="disagrees with the config"):
        Scheduler(EngineConfig(page_size=32), KVCacheManager(8, 16))


def _recorded_runs(num_pages):
    """Three requests generating 40 tokens each; returns (driver, requests)."""
    d = Driver(
        make_scheduler(
            num_pages=num_pages,
            max_num_batched_tokens=64,
            max_num_seqs=3,
            enable_prefix_caching=False,
        )
    )
    reqs = [
        d.add(
            Request(
                f"r{k}", list(range(1 + k, 31 + k)), max_tokens=40, ignore_eos=True, priority=k % 2
            )
        )
        for k in range(3)
    ]
    d.run()
    return d, reqs


def test_preempted_and_resumed_matches_uninterrupted():
    calm, calm_reqs = _recorded_runs(num_pages=64)
    tight, tight_reqs = _recorded_runs(
        num_pages=10
    )  # 9 pages: 3 x 70 tokens cannot all stay resident
    assert calm.sched.stats().num_preemptions == 0
    assert tight.sched.stats().num_preemptions > 0 and any(r.num_preemptions for r in tight_reqs)
    victims = {rid for o in tight.outs for rid in o.preempted_ids}
    assert "r0" not in victims  # the earliest of the most urgent priority is never the victim
    for c, t in zip(calm_reqs, tight_reqs):
        assert c.output_token_ids == t.output_token_ids
        reference = list(c.all_token_ids)
        # every position the preempted run computed (recomputations included) got the same token
        assert all(reference[p] == tok for p, tok in tight.device.computed[t.request_id])
        assert [p for p, _ in calm.device.computed[c.request_id]] == list(range(c.num_tokens - 1))
    recomputed = sum(len(tight.device.computed[r.request_id]) for r in tight_reqs)
    assert recomputed > sum(len(calm.device.computed[r.request_id]) for r in calm_reqs)
    assert tight.sched.kv.pool.num_used == 0


def test_victim_already_scheduled_this_step_is_undone():
    """A is admitted first with a lower priority; B and C, more urgent, run behind it in the
    running list.  When B needs a page, A (already scheduled this step, its chunk's pages
    registered in the prefix cache) is preempted: its share of the step is taken back, C is still
    served, A is not re-admitted in the same step, and the pages A did not compute must not be
    found when it is admitted again."""
    d = Driver(
        make_scheduler(
            num_pages=10, max_num_batched_tokens=80, max_num_seqs=3, long_prefill_token_threshold=32
        )
    )
    a = d.add(Request("A", list(range(1, 101)), max_tokens=4, priority=1, ignore_eos=True))
    d.step()  # A: [0, 32)
    d.add(Request("B", list(range(200, 216)), max_tokens=4, priority=0, ignore_eos=True))
    d.add(Request("C", list(range(300, 320)), max_tokens=4, priority=0, ignore_eos=True))
    out, _ = d.step()  # A: [32, 64); B, C: whole prompts, sampled
    assert [(sr.request_id, sr.num_tokens) for sr in out.scheduled] == [
        ("A", 32),
        ("B", 16),
        ("C", 20),
    ]
    # A takes the last 2 free pages for [64, 96); B's decode needs a page: A is the victim, and B
    # gets A's tail page; A's page for [64, 80) stays free but must lose its prefix hash
    out, _ = d.step()
    assert out.preempted_ids == ("A",) and [sr.request_id for sr in out.scheduled] == ["B", "C"]
    assert out.num_scheduled_tokens == 2 and a.status is RequestStatus.PREEMPTED
    d.run()  # the fake device checks A's re-admission reads only K/V that were written
    assert a.finish_reason is FinishReason.LENGTH and a.num_preemptions == 1


def test_stats():
    d = Driver(make_scheduler(num_pages=16))
    d.add(Request("a", list(range(1, 40)), max_tokens=2))
    d.add(Request("b", list(range(1, 40)), max_tokens=2))
    d.step()
    st = d.sched.stats()
    assert (st.num_running, st.num_waiting, st.num_steps) == (2, 0, 1)
    assert (
        st.num_scheduled_tokens == 39 + 39 - 32 and st.total_scheduled_tokens == 46
    )  # b hit a's 2 pages
    assert st.kv.prefix_hit_tokens == 32 and st.kv.pages_used == 3 + 1
