"""experiments/ladder/analysis.py: ladder-vs-standard ratios from rows (`runs`), the all-reduce
overlap of a compiled module (`hlo`, as `schedule` reports it) and the per-stream reading of a
profiler trace that tells whether a decode step waits for its all-reduces or runs slower beside
them (`trace`)."""

from __future__ import annotations

import gzip
import json

import pytest

from experiments.ladder import analysis


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
    (row,) = analysis.summarize(_trace(), layers=2)
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
    (row,) = analysis.summarize(ev, layers=2)
    assert row["idle_at_comm_ms"] == 0.0
    assert row["idle_after_comm_ms"] == 0.0


def test_a_gap_ending_a_while_after_the_collective_is_a_late_hand_off():
    ev = _trace()
    for e in ev:
        if e.get("name", "").startswith("nccl"):
            e["dur"] = 32  # ends at 52, inside the gap [50, 60): the gap ends 8 us after it
    (row,) = analysis.summarize(ev, layers=2)
    assert row["idle_at_comm_ms"] == 0.0 and row["idle_after_comm_ms"] == pytest.approx(10e-3)
    (row,) = analysis.summarize(ev, layers=2, late_us=5.0)
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
    (row,) = analysis.summarize(ev, layers=2)
    assert row["window_ms"] == pytest.approx(210e-3)  # still one step
    assert row["lead_median_us"] == 300 and row["lead_under_10us"] == pytest.approx(3 / 8)


def test_cli_reads_a_trace_folder(tmp_path, capsys):
    d = tmp_path / "ladder_tp2_b1" / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as fh:
        json.dump(dict(traceEvents=_trace()), fh)
    assert analysis.main(["trace", str(tmp_path / "ladder_tp2_b1"), "--layers", "2"]) == 0
    assert (
        "| ladder_tp2_b1 | /device:GPU:0 | 0.210 | 0.170 | 0.040 | 0.010 |"
        in capsys.readouterr().out
    )
    assert analysis.main(["trace", str(tmp_path / "missing"), "--layers", "2"]) == 1


def test_hlo_loops_tell_known_trip_counts_from_host_checked_ones():
    """experiments/ladder/analysis.loops: which compiled `while` loops read their predicate
    on the host every iteration (the decode loop's stop test) and which XLA runs blind."""
    text = (
        "  %while.1 = (s32[], bf16[8]{0}) while(%tuple.1), condition=%cond.2, body=%body.3, "
        'metadata={op_name="jit(f)/while/body/while"}, backend_config={"known_trip_count":{"n":"16"},'
        '"known_init_step":{"init":"0","step":"1"}}\n'
        "  %while.9 = (s32[], bf16[8]{0}) while(%tuple.8), condition=%cond.4, body=%body.5, "
        'metadata={op_name="jit(f)/while"}\n'
    )
    got = analysis.loops(text).splitlines()
    assert got == [
        "loop while.1 (body body.3): known trip count 16, no host round trip",
        "loop while.9 (body body.5): trip count unknown: the host reads the predicate "
        "every iteration",
    ]


def test_hlo_counts_pairs_and_launches():
    """experiments/ladder/analysis.analyse on a scheduled computation: one async pair with a
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
    (rep,) = analysis.analyse(text)
    assert rep.computation == "body.1" and rep.launches == 5
    assert [p.between for p in rep.pairs] == [["fusion f1"]] and [n for n, _ in rep.sync] == ["ar"]
    assert analysis.summary([rep]).endswith("0 combined (multi-operand), 5 launches")


def _row(mode, tps, call, run=1, note="fused", batch=1, p2p=True):
    return dict(
        residual=mode,
        tokens_per_s=tps,
        call=call,
        run=run,
        note=note,
        batch=batch,
        p2p=p2p,
        host="B",
        preset="8b",
        tp=4,
        device="H100",
    )


ROWS = [
    _row("standard", 300.0, 1),
    _row("ladder", 390.0, 1),
    _row("desync", 450.0, 1),
    _row("standard", 320.0, 2),
    _row("ladder", 384.0, 2),
    _row("standard", 310.0, 2, run=2),
    _row("ladder", 403.0, 2, run=2),
    _row("ladder", 330.0, 3, note="profile"),
    _row("standard", 900.0, 1, batch=4, p2p=False),
    _row("ladder", 1350.0, 1, batch=4, p2p=False),
]


def test_runs_pair_each_ladder_with_its_own_standard():
    runs = analysis.group_runs(ROWS)
    by = {(r["note"], r["call"], r["run"], r["batch"]): r for r in runs}
    assert by[("fused", 1, 1, 1)]["ratio"] == pytest.approx(1.3)
    assert by[("fused", 2, 1, 1)]["ratio"] == pytest.approx(1.2)
    assert by[("fused", 2, 2, 1)]["ratio"] == pytest.approx(1.3)
    assert by[("profile", 3, 1, 1)]["ratio"] is None  # no standard in that run
    assert by[("fused", 1, 1, 4)]["ratio"] == pytest.approx(1.5)
    med = analysis.layout_medians(runs)
    s = med[("fused", 1, True)]
    assert (s["n"], s["ratio"], s["min"], s["max"]) == (
        3,
        pytest.approx(1.3),
        pytest.approx(1.2),
        pytest.approx(1.3),
    )
    assert s["standard"] == 310.0 and s["desync"] == 450.0
    assert med[("profile", 1, True)]["n"] == 0


def test_a_run_with_two_rows_of_one_mode_is_refused():
    with pytest.raises(ValueError, match="two ladder rows"):
        analysis.group_runs(ROWS + [_row("ladder", 1.0, 1)])


def test_cli_writes_table_and_plot(tmp_path, capsys):
    src = tmp_path / "rows.json"
    src.write_text(json.dumps(ROWS))
    png, md = tmp_path / "r.png", tmp_path / "r.md"
    assert (
        analysis.main(["runs", str(src), "--bar", "1.28", "--png", str(png), "--md", str(md)]) == 0
    )
    assert png.stat().st_size > 0 and "| fused | 1 | on | 3 | 1.300x |" in md.read_text()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert analysis.main(["runs", str(bad)]) == 2
    assert "not ladder bench rows" in capsys.readouterr().err
    assert analysis.main(["runs", str(src), str(src)]) == 2  # two files only with --grid
    assert "use --grid" in capsys.readouterr().err


def _grid_row(mode, tps, session, tp=4, batch=1, p2p=True, xla="nccl_lhs+fusedproj"):
    return dict(
        residual=mode,
        tokens_per_s=tps,
        session=session,
        tp=tp,
        batch=batch,
        p2p=p2p,
        xla_preset=xla,
    )


GRID_ROWS = [
    # round 8: TP 4 batch 1 with desync; round 10 repeats standard/ladder three times
    _grid_row("standard", 320.0, 8),
    _grid_row("ladder", 400.0, 8),
    _grid_row("desync", 460.0, 8),
    *[_grid_row("standard", t, 10) for t in (330.0, 326.0, 328.0)],
    *[_grid_row("ladder", t, 10) for t in (410.0, 409.0, 411.0)],
    # another flag set in the same round: not part of the grid
    _grid_row("standard", 350.0, 10, xla="nccl_lhs_symm+fusedproj"),
    _grid_row("ladder", 395.0, 10, xla="nccl_lhs_symm+fusedproj"),
    # TP 2, P2P off, with parallel; a TP 1 cell with standard only (no ratio: left out)
    _grid_row("standard", 220.0, 10, tp=2, p2p=False),
    _grid_row("ladder", 264.0, 10, tp=2, p2p=False),
    _grid_row("parallel", 253.0, 10, tp=2, p2p=False),
    _grid_row("standard", 6000.0, 8, tp=1, batch=64),
]


def test_grid_takes_each_cell_from_the_latest_round_with_a_pair():
    cells = analysis.grid(GRID_ROWS, "nccl_lhs+fusedproj")
    assert [(c["tp"], c["batch"], c["p2p"]) for c in cells] == [(4, 1, True), (2, 1, False)]
    tp4, tp2 = cells
    # medians of round 10's runs; desync only in round 8, so borrowed and marked
    assert (tp4["session"], tp4["standard"], tp4["ladder"]) == (10, 328.0, 410.0)
    assert tp4["ratio"] == pytest.approx(410.0 / 328.0)
    assert tp4["desync"] == 460.0 and tp4["borrowed"] == {"desync": 8}
    assert tp2["parallel"] == 253.0 and tp2["ratio"] == pytest.approx(1.2) and not tp2["borrowed"]
    symm = analysis.grid(GRID_ROWS, "nccl_lhs_symm+fusedproj")
    assert len(symm) == 1 and symm[0]["ratio"] == pytest.approx(395.0 / 350.0)
    text = analysis.grid_table(cells)
    assert "| 4 | 1 | on | 328.0 | 410.0 | - | 460.0 (s8) | 1.250x | 10 |" in text
    assert "| 2 | 1 | off | 220.0 | 264.0 | 253.0 | - | 1.200x | 10 |" in text


def test_grid_cli(tmp_path, capsys):
    """Two files (a list of rows, and an object holding them under "rows", as the committed
    results file) read as one."""
    a, b = tmp_path / "s8.json", tmp_path / "s10.json"
    a.write_text(json.dumps([r for r in GRID_ROWS if r["session"] == 8]))
    b.write_text(json.dumps(dict(rows=[r for r in GRID_ROWS if r["session"] == 10])))
    md = tmp_path / "grid.md"
    assert analysis.main(["runs", "--grid", str(a), str(b), "--md", str(md)]) == 0
    assert "460.0 (s8)" in md.read_text()
    capsys.readouterr()
    assert analysis.main(["runs", "--grid", str(a), "--xla-preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "nccl_lhs+fusedproj" in err


def test_main_names_its_subcommands(capsys):
    assert analysis.main([]) == 2
    assert "schedule" in capsys.readouterr().err
    assert analysis.main(["--help"]) == 0
    assert "trace" in capsys.readouterr().out
