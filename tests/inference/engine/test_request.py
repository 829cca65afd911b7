"""Request state, stop rules and the priority-FCFS policy."""

import pytest

from jaxturbo.errors import UserError
from jaxturbo.inference.engine.policy import PriorityFCFS
from jaxturbo.inference.engine.request import FinishReason, Request, RequestStatus


def test_token_bookkeeping():
    r = Request("a", [5, 6, 7], max_tokens=4)
    r.append_output_token(9)
    assert list(r.all_token_ids) == [5, 6, 7, 9] and r.output_token_ids == [9]
    assert (r.num_tokens, r.num_prompt_tokens, r.num_output_tokens) == (4, 3, 1)
    r.num_computed_tokens = 3
    assert r.num_tokens_to_compute == 1


@pytest.mark.parametrize(
    "args, kw, msg",
    [
        (("a", [], 4), {}, "empty prompt"),
        (("a", [1, -2], 4), {}, "token id -2"),
        (("a", [1, 2**31], 4), {}, f"token id {2**31}"),
        (("a", [1], 0), {}, "max_tokens=0"),
    ],
)
def test_bad_requests(args, kw, msg):
    with pytest.raises(UserError, match=msg):
        Request(*args, **kw)


def test_stop_rules():
    def ended(token, max_tokens=10, **kw):
        r = Request("a", [1, 2], max_tokens=max_tokens, eos_token_ids=(0,), **kw)
        r.append_output_token(token)
        return r.stop_reason(max_model_len=100)

    assert ended(4) is None
    assert ended(0) is FinishReason.STOP
    assert ended(0, ignore_eos=True) is None
    assert ended(4, stop_token_ids=(4,)) is FinishReason.STOP
    assert (
        ended(4, stop_token_ids=(4,), ignore_eos=True) is FinishReason.STOP
    )  # ignore_eos spares only EOS
    assert ended(4, max_tokens=1) is FinishReason.LENGTH
    assert ended(0, max_tokens=1) is FinishReason.STOP  # a natural end wins over the length limit
    r = Request("b", [1, 2], max_tokens=10)
    r.append_output_token(4)
    assert r.stop_reason(max_model_len=3) is FinishReason.LENGTH


def test_status_maps_to_finish_reason():
    assert not RequestStatus.PREEMPTED.is_finished and RequestStatus.PREEMPTED.finish_reason is None
    for reason in FinishReason:
        status = RequestStatus.finished(reason)
        assert status.is_finished and status.finish_reason is reason


def _req(rid, priority, arrival):
    r = Request(rid, [1], max_tokens=1, priority=priority)
    r.arrival = arrival
    return r


def test_priority_fcfs_orders_by_priority_then_arrival():
    q = PriorityFCFS()
    reqs = [
        _req("late-urgent", 0, 3),
        _req("early", 1, 0),
        _req("urgent", 0, 1),
        _req("later", 1, 2),
    ]
    for r in reqs:
        q.add(r)
    assert [r.request_id for r in q] == ["urgent", "late-urgent", "early", "later"]
    assert q.remove(reqs[0]) and not q.remove(reqs[0])
    assert len(q) == 3
    assert [q.pop().request_id for _ in range(3)] == ["urgent", "early", "later"]
    assert q.peek() is None
    with pytest.raises(IndexError):
        q.pop()


def test_priority_fcfs_victim_and_requeue():
    q = PriorityFCFS()
    running = [_req("a", 0, 0), _req("b", 1, 1), _req("c", 1, 2), _req("d", 0, 3)]
    victim = q.select_victim(running)
    assert victim.request_id == "c"  # lowest priority (largest value), latest arrival
    q.add(_req("e", 1, 5))
    q.add(victim)  # a preempted request keeps its arrival: ahead of later arrivals of its priority
    assert q.peek() is victim
