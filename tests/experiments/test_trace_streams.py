"""experiments/ladder/trace_streams.py: the per-stream reading of a profiler trace that tells
whether a decode step waits for its all-reduces or runs slower beside them."""

from __future__ import annotations

import gzip
import json

import pytest

from experiments.ladder import hlo_overlap, trace_streams


def _trace():
    """One GPU, 2 layers per step, 1 step: compute stream (tid 1) and a collective stream (tid 2).
    Compute gaps: [50, 60) right after the all-reduce ends at 58 (waiting for it), [150, 180)
    with no collective ending there (something else)."""
    meta = [
        dict(ph="M", name="process_name", pid=7, args=dict(name="/device:GPU:0")),
        dict(ph="M", name="process_name", pid=1, args=dict(name="/host:CPU")),
    ]
    k = lambda name, ts, dur, tid=1: dict(ph="X", pid=7, tid=tid, name=name, ts=ts, dur=dur)
    kernels = [
        k("jaxturbo_decode_0", 0, 10),
        k("gemv", 10, 40),
        k("gemv_overlapping", 30, 15),
        k("gemv", 60, 40),
        k("jaxturbo_decode_1", 100, 10),
        k("gemv", 110, 40),
        k("gemv", 180, 20),
        k("jaxturbo_decode_0", 200, 10),
        k("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 20, 38, tid=2),
        k("prefill_gemm", 500, 100),
    ]  # outside the decode window
    host = [dict(ph="X", pid=1, tid=3, name="jaxturbo_decode launch", ts=0, dur=5)]
    return meta + kernels + host


def test_summarize_splits_idle_into_waiting_for_comm_and_the_rest():
    (row,) = trace_streams.summarize(_trace(), layers=2)
    assert row["gpu"] == "/device:GPU:0"
    assert row["window_ms"] == pytest.approx(210e-3)
    assert row["busy_ms"] == pytest.approx(170e-3)  # the overlapping kernel counted once
    assert row["idle_ms"] == pytest.approx(40e-3)
    assert row["idle_at_comm_ms"] == pytest.approx(10e-3)
    assert row["comm_per_step"] == 1 and row["comm_mean_us"] == pytest.approx(38)
    assert row["kernels_per_step"] == 8


def test_a_gap_long_after_the_collective_is_not_waiting_for_it():
    ev = _trace()
    for e in ev:
        if e.get("name", "").startswith("nccl"):
            e["dur"] = 20  # ends at 40, long before the gap at 50
    (row,) = trace_streams.summarize(ev, layers=2)
    assert row["idle_at_comm_ms"] == 0.0
    assert row["idle_after_comm_ms"] == 0.0


def test_a_gap_ending_a_while_after_the_collective_is_a_late_hand_off():
    ev = _trace()
    for e in ev:
        if e.get("name", "").startswith("nccl"):
            e["dur"] = 32  # ends at 52, inside the gap [50, 60): the gap ends 8 us after it
    (row,) = trace_streams.summarize(ev, layers=2)
    assert row["idle_at_comm_ms"] == 0.0 and row["idle_after_comm_ms"] == pytest.approx(10e-3)
    (row,) = trace_streams.summarize(ev, layers=2, late_us=5.0)
    assert row["idle_after_comm_ms"] == 0.0


def test_launch_lead_and_merge_kernels_are_not_markers():
    """Each compute kernel's start against its launch call on the host (same correlation id);
    the decode kernel's merge kernel is not a per-layer marker (the step count stays 1)."""
    ev = _trace()
    kernels = [e for e in ev if e.get("pid") == 7 and e.get("tid") == 1 and e["ts"] < 500]
    for i, e in enumerate(kernels):
        e["args"] = {"correlation_id": i}
        # the first three start 4 us after their launch (launch-bound), the rest 300 us after
        ev.append(
            dict(
                ph="X",
                pid=1,
                tid=3,
                name="cuLaunchKernelEx",
                dur=2,
                ts=e["ts"] - (4 if i < 3 else 300),
                args={"correlation_id": i},
            )
        )
    ev.append(dict(ph="X", pid=7, tid=1, name="jaxturbo_decode_merge", ts=112, dur=1))
    (row,) = trace_streams.summarize(ev, layers=2)
    assert row["window_ms"] == pytest.approx(210e-3)  # still one step
    assert row["lead_median_us"] == 300 and row["lead_under_10us"] == pytest.approx(3 / 8)


def test_cli_reads_a_trace_folder(tmp_path, capsys):
    d = tmp_path / "ladder_tp2_b1" / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as fh:
        json.dump(dict(traceEvents=_trace()), fh)
    assert trace_streams.main([str(tmp_path / "ladder_tp2_b1"), "--layers", "2"]) == 0
    assert (
        "| ladder_tp2_b1 | /device:GPU:0 | 0.210 | 0.170 | 0.040 | 0.010 |"
        in capsys.readouterr().out
    )
    assert trace_streams.main([str(tmp_path / "missing"), "--layers", "2"]) == 1


def test_hlo_loops_tell_known_trip_counts_from_host_checked_ones():
    """experiments/ladder/hlo_overlap.loops: which compiled `while` loops read their predicate
    on the host every iteration (the decode loop's stop test) and which XLA runs blind."""
    text = (
        "  %while.1 = (s32[], bf16[8]{0}) while(%tuple.1), condition=%cond.2, body=%body.3, "
        'metadata={op_name="jit(f)/while/body/while"}, backend_config={"known_trip_count":{"n":"16"},'
        '"known_init_step":{"init":"0","step":"1"}}\n'
        "  %while.9 = (s32[], bf16[8]{0}) while(%tuple.8), condition=%cond.4, body=%body.5, "
        'metadata={op_name="jit(f)/while"}\n'
    )
    got = hlo_overlap.loops(text).splitlines()
    assert got == [
        "loop while.1 (body body.3): known trip count 16, no host round trip",
        "loop while.9 (body body.5): trip count unknown: the host reads the predicate "
        "every iteration",
    ]


def test_hlo_overlap_counts_pairs_and_launches():
    """experiments/ladder/hlo_overlap.analyse on a scheduled computation: one async pair with a
    kernel inside, one sync all-reduce, and the launches (kernels, copies, collectives; not the
    done, the tuple or the parameter)."""
    text = """%body.1 (p: bf16[8]) -> bf16[8] {
  %p = bf16[8]{0} parameter(0)
  %ars = bf16[8]{0} all-reduce-start(%p), replica_groups={{0,1}}, to_apply=%add
  %f1 = bf16[8]{0} fusion(%p), kind=kLoop, calls=%fused_1
  %ard = bf16[8]{0} all-reduce-done(%ars)
  %cc = bf16[8]{0} custom-call(%ard), custom_call_target="__gpu$xla.gpu.triton"
  %ar = bf16[8]{0} all-reduce(%cc), replica_groups={{0,1}}, to_apply=%add
  %c = bf16[8]{0} copy(%ar)
  ROOT %t = (bf16[8]{0}) tuple(%c)
}
"""
    (rep,) = hlo_overlap.analyse(text)
    assert rep.computation == "body.1" and rep.launches == 5
    assert [p.between for p in rep.pairs] == [["fusion f1"]] and [n for n, _ in rep.sync] == ["ar"]
    assert hlo_overlap.summary([rep]).endswith("0 combined (multi-operand), 5 launches")
