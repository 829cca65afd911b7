"""`jaxturbo bench NAME [ARGS...]`: run the benchmark script `experiments/NAME_bench.py`.

The scripts own their arguments (`jaxturbo bench ladder --help`); this command only finds the
script and runs it in a fresh interpreter, because benchmarks set XLA/NCCL environment variables
that must be in place before JAX starts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from jaxturbo.errors import UserError

NAME = "bench"
HELP = "run a benchmark from experiments/ (ladder, attention, ...): jaxturbo bench ladder --preset tiny"
EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def available() -> list[str]:
    return sorted(p.name[: -len("_bench.py")] for p in EXPERIMENTS.glob("*_bench.py"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="benchmark name (experiments/NAME_bench.py)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")


def run(args: argparse.Namespace) -> int:
    script = EXPERIMENTS / f"{args.name}_bench.py"
    if not script.is_file():
        names = ", ".join(available()) or "none found"
        raise UserError(f"no benchmark {args.name!r} (no {script}); available: {names}")
    env_path = str(EXPERIMENTS.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env_path, env.get("PYTHONPATH", "")]))
    return subprocess.call([sys.executable, str(script), *args.args], env=env)
