"""experiments/ladder/runs_report.py: ladder-vs-standard ratios run by run, and per layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments" / "ladder"))
import runs_report  # noqa: E402


def _row(mode, tps, call, run=1, note="fused", batch=1, p2p=True):
    return dict(residual=mode, tokens_per_s=tps, call=call, run=run, note=note, batch=batch,
                p2p=p2p, host="B", preset="8b", tp=4, device="H100")


ROWS = [_row("standard", 300.0, 1), _row("ladder", 390.0, 1), _row("desync", 450.0, 1),
        _row("standard", 320.0, 2), _row("ladder", 384.0, 2),
        _row("standard", 310.0, 2, run=2), _row("ladder", 403.0, 2, run=2),
        _row("ladder", 330.0, 3, note="profile"),
        _row("standard", 900.0, 1, batch=4, p2p=False), _row("ladder", 1350.0, 1, batch=4, p2p=False)]


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
    assert (s["n"], s["ratio"], s["min"], s["max"]) == (3, pytest.approx(1.3), pytest.approx(1.2),
                                                        pytest.approx(1.3))
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
    assert "not a ladder_bench rows list" in capsys.readouterr().err
