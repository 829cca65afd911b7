"""GRPO rollout engines head to head: the static sampler against the serving engine (one and
several decode steps per launch), on one GRPO batch shape, with the engine's host time split
by phase and, on a GPU, its kernels traced.

    python -m experiments.rl.rollout_bench --preset cpu        # tiny shape, CPU, seconds
    python -m experiments.rl.rollout_bench --preset gpu        # SmolLM2 shape, random weights

A batch: `prompts` problems of `prompt_len` random tokens, `group` samples each, `new` tokens
per sample at temperature 1.0, no stop token (random weights: every sample runs to `new`, so
the engines compute the same tokens; the real task's EOS stops are in RESULTS.md's GRPO runs).
Each system: one warm-up batch, then `repeats` batches with other seeds; the batch of median
wall time is reported.  Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from jaxturbo.cli.common import use_decode_xla_flags

use_decode_xla_flags()  # before JAX starts its backend: the flags the CLI decodes with

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.bench_util import (  # noqa: E402
    device_name,
    positive_ints,
    trace_kernels,
    write_table,
)
from experiments.engine.bench import host_phases  # noqa: E402
from jaxturbo.inference.sampling import SamplingParams  # noqa: E402
from jaxturbo.models.init import init_params  # noqa: E402
from jaxturbo.models.shapes import shape  # noqa: E402
from jaxturbo.rl.rollout import JaxEngine, PagedEngine  # noqa: E402

RESULTS = Path(__file__).parent / "results"

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(shape="tiny", prompts=4, group=4, prompt_len=40, new=12, repeats=2),
    # the GRPO runs' batch: 16 problems x 8 samples, 24 new tokens, chat prompts of ~45 tokens
    "gpu": dict(shape="smollm2-135m", prompts=16, group=8, prompt_len=45, new=24, repeats=5),
}
COLUMNS = [
    "system",
    "wall_s",
    "tokens_per_s",
    "vs_static",
    "launches",
    "ms_per_launch",
    "host_ms",
    "gpu_busy_ms",
]


def batch(p: dict, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    problems = [
        list(map(int, rng.integers(0, vocab, p["prompt_len"]))) for _ in range(p["prompts"])
    ]
    return [q for q in problems for _ in range(p["group"])]


def run(engine: Any, p: dict, vocab: int, seed: int) -> tuple[float, int]:
    """(wall seconds, tokens generated) of one batch."""
    prompts = batch(p, vocab, seed)
    t0 = time.perf_counter()
    out = engine.generate(
        prompts, SamplingParams(temperature=1.0), max_new_tokens=p["new"], seed=seed
    )
    jax.effects_barrier()
    return time.perf_counter() - t0, sum(map(len, out.completions))


def measure(label: str, engine: Any, p: dict, vocab: int, static_s: float | None) -> dict:
    run(engine, p, vocab, seed=0)  # warm-up: first-use allocations (and the static compile)
    paged = isinstance(engine, PagedEngine)
    runs = []
    for r in range(p["repeats"]):
        if paged:
            before = engine.engine.runner.num_launches
            with host_phases(engine.engine) as sec:
                wall, tokens = run(engine, p, vocab, seed=1 + r)
            n = engine.engine.runner.num_launches - before
            runs.append((wall, tokens, n, {k: 1e3 * v for k, v in sec.items()}))
        else:
            runs.append((*run(engine, p, vocab, seed=1 + r), 0, {}))
    wall, tokens, n_launch, phases = sorted(runs, key=lambda x: x[0])[len(runs) // 2]
    row = {
        "system": label,
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "vs_static": "" if static_s is None else round(static_s / wall, 3),
        "launches": n_launch or "",
        "ms_per_launch": round(1e3 * wall / n_launch, 2) if n_launch else "",
        "host_ms": {k: round(v, 1) for k, v in sorted(phases.items())} if phases else "",
        "walls_s": [round(x[0], 4) for x in runs],
    }
    traced = trace_kernels(lambda: run(engine, p, vocab, seed=99), steps=1)
    if traced is not None:
        row["gpu_busy_ms"] = round(traced["busy_ms_per_step"], 1)
        row["kernels"] = traced["kernels_per_step"]
        row["top_kernels"] = traced["top"][:12]
        for k in row["top_kernels"]:
            print(f"  {k['us_per_step']:>10.1f} us {k['per_step']:>7.0f}x {k['kernel']}")
    print(f"{label}: {wall * 1e3:.1f} ms, {row['tokens_per_s']:.0f} tok/s, {row}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.rl.rollout_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--decode-steps", default="1,8", help="comma-separated engine variants")
    ap.add_argument("--out", help="path stem of the .json/.md")
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    steps = positive_ints(args.decode_steps, "--decode-steps", ap.error)
    cfg = shape(p["shape"])
    params = init_params(cfg, jax.random.key(0), jnp.float32)  # GRPO's float32 policy
    rows = [measure("static sampler (jax)", JaxEngine(cfg, params), p, cfg.vocab_size, None)]
    static_s = rows[0]["wall_s"]
    max_len = p["prompt_len"] + p["new"]
    for k in steps:
        eng = PagedEngine(
            cfg,
            params,
            max_num_seqs=p["prompts"] * p["group"],
            max_model_len=max_len,
            decode_steps=k,
        )
        label = f"engine, {k} decode step{'s' if k > 1 else ''} per launch"
        rows.append(measure(label, eng, p, cfg.vocab_size, static_s))
        del eng
    meta = {
        "device": device_name(),
        "jax": jax.__version__,
        "shape": p["shape"],
        "batch": {k: p[k] for k in ("prompts", "group", "prompt_len", "new")},
        "statistic": f"batch of median wall time of {p['repeats']} (after one warm-up)",
        "median_walls_s": {r["system"]: statistics.median(r["walls_s"]) for r in rows},
    }
    out = Path(args.out) if args.out else RESULTS / f"rollout_{args.preset}_{p['shape']}"
    md = write_table(rows, COLUMNS, out, "GRPO rollout engines, one batch", meta)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
