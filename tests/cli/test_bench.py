"""`jaxturbo bench`: runs the repository's experiments package from a clone; outside a clone (an
installed wheel) one line on stderr saying where the benchmarks live, exit 2."""

from pathlib import Path

import pytest

from jaxturbo.cli import bench as bench_cmd
from jaxturbo.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_bench_runs_a_topic_script_from_a_clone(capfd, monkeypatch, tmp_path):
    # from a directory outside the clone, as an editable install sees it
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "sp", "--help"]) == 0
    out = capfd.readouterr().out
    assert "python -m experiments.sp.bench" in out  # the module's own argparse ran
    assert "--check-only" in out


def test_bench_lists_topics_and_scripts():
    names = bench_cmd.available(REPO)
    assert {
        "attention",
        "generate",
        "sp",
        "train",
        "mla.decode_bench",
        "engine.rpa_bench",
        "moe.gmm_bench",
        "sp.longest",
    } <= set(names)
    assert bench_cmd.module_for("mla.decode_bench", REPO) == "experiments.mla.decode_bench"
    assert bench_cmd.module_for("sp", REPO) == "experiments.sp.bench"


def test_bench_unknown_name_is_one_line(capsys):
    assert main(["bench", "warp-drive"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "'warp-drive'" in err[0] and "mla.decode_bench" in err[0]


def test_bench_outside_a_clone_says_where_the_benchmarks_are(capsys, monkeypatch, tmp_path):
    # an installed wheel: neither the working directory nor the package's parent has experiments/
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench_cmd, "PACKAGE_ROOT", tmp_path / "site-packages")
    assert bench_cmd.experiments_root() is None
    assert main(["bench", "ladder", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    assert "experiments/ folder" in err[0] and "python -m experiments.ladder.bench" in err[0]


@pytest.mark.parametrize("sub", ["", "nested/deeper"])
def test_experiments_root_found_from_inside_the_clone(sub):
    assert bench_cmd.experiments_root(REPO / sub if sub else REPO) == REPO
