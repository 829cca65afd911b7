"""`jaxturbo bench NAME [ARGS...]`: run a benchmark of the repository's `experiments/` package.

NAME is a topic (`ladder` runs `python -m experiments.ladder.bench`) or TOPIC.SCRIPT for a
topic's other scripts (`mla.decode_bench`, `engine.rpa_bench`).  The scripts own their arguments
(`jaxturbo bench ladder --help`); this command only finds the module and runs it in a fresh
interpreter, because benchmarks set XLA/NCCL environment variables that must be in place before
JAX starts.  The benchmarks are not part of the installed wheel: they run from a clone (the
current directory or one above it, or the checkout jaxturbo itself is installed from).

`jaxturbo bench serve --url URL ...` is the exception: the load generator of `jaxturbo serve`
ships in the library (`jaxturbo.serve.loadgen`), so it runs from an installed wheel too (the
serving topic's own benchmark, server against engine, runs as `python -m experiments.serve.bench`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from jaxturbo.errors import UserError

NAME = "bench"
HELP = (
    "run a benchmark of the repository's experiments/ (ladder, attention, mla.decode_bench, "
    "...): jaxturbo bench ladder --preset tiny"
)
# the checkout an editable install points at (jaxturbo/cli/bench.py -> the repository root)
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def experiments_root(cwd: Path | None = None) -> Path | None:
    """The repository root holding the `experiments` package: the current directory or one of
    its parents, else the checkout jaxturbo is installed from; None outside a clone."""
    here = (cwd or Path.cwd()).resolve()
    for base in (here, *here.parents, PACKAGE_ROOT):
        pkg = base / "experiments"
        if (pkg / "__init__.py").is_file() and (pkg / "bench_util.py").is_file():
            return base
    return None


def available(root: Path) -> list[str]:
    """Benchmark names under root/experiments: TOPIC for a topic's bench.py, TOPIC.SCRIPT for
    its other runnable scripts."""
    names = []
    for topic in sorted((root / "experiments").iterdir()):
        # topics are namespace packages (folders without __init__.py); tools/ is GPU plumbing
        if not topic.is_dir() or topic.name.startswith(("_", ".")) or topic.name == "tools":
            continue
        for script in sorted(topic.glob("*.py")):
            if script.name.startswith("_") or "__main__" not in script.read_text(errors="ignore"):
                continue
            names.append(topic.name if script.stem == "bench" else f"{topic.name}.{script.stem}")
    return names


def module_for(name: str, root: Path) -> str:
    """`experiments.<topic>.<script>` for NAME (TOPIC or TOPIC.SCRIPT), checked to exist."""
    topic, _, script = name.partition(".")
    script = script or "bench"
    if name not in available(root):
        raise UserError(
            f"no benchmark {name!r} (no experiments/{topic}/{script}.py under "
            f"{root}); available: {', '.join(available(root)) or 'none'}"
        )
    return f"experiments.{topic}.{script}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="TOPIC (experiments/TOPIC/bench.py) or TOPIC.SCRIPT")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")


def run(args: argparse.Namespace) -> int:
    if args.name == "serve":  # in the library, not in experiments/: works from a wheel
        from jaxturbo.serve.loadgen import main as loadgen

        return loadgen(args.args)
    root = experiments_root()
    if root is None:
        raise UserError(
            "the benchmarks live in the repository's experiments/ folder, not in the installed "
            f"package: clone the repository and run `jaxturbo bench {args.name}` (or "
            f"`python -m experiments.{args.name if '.' in args.name else args.name + '.bench'}`) "
            "from its root"
        )
    module = module_for(args.name, root)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    return subprocess.call([sys.executable, "-m", module, *args.args], env=env)
