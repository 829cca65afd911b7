"""experiments/ladder/runs_report.py: ladder-vs-standard ratios run by run, and per layout."""

from __future__ import annotations

import json

import pytest

from experiments.ladder import runs_report


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
    runs = runs_report.group_runs(ROWS)
    by = {(r["note"], r["call"], r["run"], r["batch"]): r for r in runs}
    assert by[("fused", 1, 1, 1)]["ratio"] == pytest.approx(1.3)
    assert by[("fused", 2, 1, 1)]["ratio"] == pytest.approx(1.2)
    assert by[("fused", 2, 2, 1)]["ratio"] == pytest.approx(1.3)
    assert by[("profile", 3, 1, 1)]["ratio"] is None  # no standard in that run
    assert by[("fused", 1, 1, 4)]["ratio"] == pytest.approx(1.5)
    med = runs_report.layout_medians(runs)
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
        runs_report.group_runs(ROWS + [_row("ladder", 1.0, 1)])


def test_cli_writes_table_and_plot(tmp_path, capsys):
    src = tmp_path / "rows.json"
    src.write_text(json.dumps(ROWS))
    png, md = tmp_path / "r.png", tmp_path / "r.md"
    assert runs_report.main([str(src), "--bar", "1.28", "--png", str(png), "--md", str(md)]) == 0
    assert png.stat().st_size > 0 and "| fused | 1 | on | 3 | 1.300x |" in md.read_text()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert runs_report.main([str(bad)]) == 2
    assert "not ladder bench rows" in capsys.readouterr().err
    assert runs_report.main([str(src), str(src)]) == 2  # two files only with --grid
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
    cells = runs_report.grid(GRID_ROWS, "nccl_lhs+fusedproj")
    assert [(c["tp"], c["batch"], c["p2p"]) for c in cells] == [(4, 1, True), (2, 1, False)]
    tp4, tp2 = cells
    # medians of round 10's runs; desync only in round 8, so borrowed and marked
    assert (tp4["session"], tp4["standard"], tp4["ladder"]) == (10, 328.0, 410.0)
    assert tp4["ratio"] == pytest.approx(410.0 / 328.0)
    assert tp4["desync"] == 460.0 and tp4["borrowed"] == {"desync": 8}
    assert tp2["parallel"] == 253.0 and tp2["ratio"] == pytest.approx(1.2) and not tp2["borrowed"]
    symm = runs_report.grid(GRID_ROWS, "nccl_lhs_symm+fusedproj")
    assert len(symm) == 1 and symm[0]["ratio"] == pytest.approx(395.0 / 350.0)
    text = runs_report.grid_table(cells)
    assert "| 4 | 1 | on | 328.0 | 410.0 | - | 460.0 (s8) | 1.250x | 10 |" in text
    assert "| 2 | 1 | off | 220.0 | 264.0 | 253.0 | - | 1.200x | 10 |" in text


def test_grid_cli(tmp_path, capsys):
    """Two files (a list of rows, and an object holding them under "rows", as the committed
    results file) read as one."""
    a, b = tmp_path / "s8.json", tmp_path / "s10.json"
    a.write_text(json.dumps([r for r in GRID_ROWS if r["session"] == 8]))
    b.write_text(json.dumps(dict(rows=[r for r in GRID_ROWS if r["session"] == 10])))
    md = tmp_path / "grid.md"
    assert runs_report.main(["--grid", str(a), str(b), "--md", str(md)]) == 0
    assert "460.0 (s8)" in md.read_text()
    capsys.readouterr()
    assert runs_report.main(["--grid", str(a), "--xla-preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "nccl_lhs+fusedproj" in err
