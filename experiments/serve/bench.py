"""`jaxturbo serve` over HTTP against the same engine offline, on random weights of a named shape.

One engine (random weights of `--shape`, a word-level tokenizer so that outputs are
detokenized as for a real model) runs the W1 workload three ways in one process:

  offline      `Engine.generate` on every prompt at once: the engine's own throughput;
  served, max  the same prompts sent all at once over HTTP to a `Server` over that engine
               (streaming /v1/completions, token-id prompts, EOS ignored): served output
               tokens/s over the offline figure is what the HTTP layer costs at saturation;
  served, half Poisson arrivals at half the offline throughput (in requests/s): time to first
               token, inter-token latency and end-to-end latency percentiles of a server that
               keeps up.

W1, the engine settings and the presets are the engine benchmark's (experiments/engine/bench.py):
R prompts of lengths uniform in [lo, hi] (numpy seed 0), N greedy new tokens each, EOS ignored
(gpu: 256 prompts of 256..1024 tokens, 256 new tokens; cpu: 8 of 16..64, 16 new).  The load
generator (`jaxturbo.serve.loadgen`) runs in a subprocess, so the client's parsing does not
share the server's interpreter lock; it reads the prompts from a JSONL file this script writes.

    python -m experiments.serve.bench --preset cpu                       # tiny shape, seconds
    python -m experiments.serve.bench --preset gpu --shape llama3-8b     # one GPU
    python -m experiments.serve.bench --preset gpu --shape smollm2-135m

Writes <out>.json, <out>.md and <out>.png (default experiments/serve/results/serve_<preset>_<shape>), after
every phase (a run cut short by a timeout keeps what it measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from jaxturbo.cli.common import use_decode_xla_flags

use_decode_xla_flags()  # before JAX starts its backend: the flags `jaxturbo serve` decodes with

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments.bench_util import (  # noqa: E402
    device_name,
    word_tokenizer,  # noqa: E402
    write_table,
)
from experiments.engine.bench import PRESETS as ENGINE_PRESETS  # noqa: E402
from experiments.engine.bench import run_engine_w1, w1_prompts  # noqa: E402
from jaxturbo.inference.engine.config import EngineConfig  # noqa: E402
from jaxturbo.inference.engine.engine import Engine  # noqa: E402
from jaxturbo.inference.engine.params import RequestParams  # noqa: E402
from jaxturbo.models.init import init_params  # noqa: E402
from jaxturbo.models.shapes import shape  # noqa: E402
from jaxturbo.serve.server import ServeConfig, Server  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# the engine benchmark's presets: the same W1 workload, engine settings and shapes
PRESETS: dict[str, dict[str, Any]] = {
    name: {k: p[k] for k in ("shape", "dtype", "w1", "engine", "compilation_cache")}
    for name, p in ENGINE_PRESETS.items()
}
COLUMNS = [
    "system",
    "rate_rps",
    "completed",
    "wall_s",
    "output_tokens_per_s",
    "of_offline",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "e2e_p50_s",
    "e2e_p99_s",
    "steps",
    "preemptions",
]


def loadgen(
    url: str, prompts_file: Path, requests: int, new: int, rate: float, out: Path, timeout: float
) -> dict:
    """Run `jaxturbo bench serve` (the load generator) in a subprocess; its result.json."""
    cmd = [
        sys.executable,
        "-m",
        "jaxturbo.serve.loadgen",
        "--url",
        url,
        "--prompts",
        str(prompts_file),
        "--requests",
        str(requests),
        "--max-tokens",
        str(new),
        "--ignore-eos",
        "--rate",
        "inf" if math.isinf(rate) else repr(rate),
        "--seed",
        "0",
        "--timeout",
        str(timeout),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, timeout=timeout, env=dict(os.environ))
    return json.loads((out / "result.json").read_text())


def warm_up(url: str, prompt: list[int]) -> None:
    """One short request through a fresh server: its first request pays one-time Python costs
    (route and model set-up, lazy imports) that are not the steady state being measured."""
    body = json.dumps({"prompt": prompt, "max_tokens": 2, "stream": True}).encode()
    req = urllib.request.Request(
        f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()


def served_row(system: str, r: dict, offline_tps: float) -> dict:
    """A table row of a load-generator report."""
    return {
        "system": system,
        "rate_rps": r["rate"],
        "completed": f"{r['completed']}/{r['requests']}",
        "wall_s": r["duration_s"],
        "output_tokens": r["output_tokens"],
        "output_tokens_per_s": r["output_tokens_per_s"],
        "of_offline": r["output_tokens_per_s"] / offline_tps,
        "ttft_p50_ms": r["ttft_ms"]["p50"],
        "ttft_p99_ms": r["ttft_ms"]["p99"],
        "itl_p50_ms": r["itl_ms"]["p50"],
        "itl_p99_ms": r["itl_ms"]["p99"],
        "e2e_p50_s": r["e2e_s"]["p50"],
        "e2e_p99_s": r["e2e_s"]["p99"],
        "errors": r["errors"],
        # every percentile the load generator reports, for the plot and the JSON
        "latency": {k: r[k] for k in ("ttft_ms", "itl_ms", "e2e_s")},
    }


def plot(rows: list[dict], out: Path, title: str) -> None:
    """<out>.png: output tokens/s of every run, and the served runs' time to first token and
    inter-token latency at each reported percentile (log scale)."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    served = [r for r in rows if "latency" in r]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    ax.bar(range(len(rows)), [r["output_tokens_per_s"] for r in rows])
    ax.set_xticks(
        range(len(rows)),
        [r["system"].replace(": ", ":\n").replace(" at ", "\nat ") for r in rows],
        fontsize=7,
    )
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput")
    for ax, key, label in (
        (axes[1], "ttft_ms", "time to first token (ms)"),
        (axes[2], "itl_ms", "inter-token latency (ms)"),
    ):
        for r in served:
            pct = {k: v for k, v in r["latency"][key].items() if k.startswith("p") and v}
            ax.plot(
                [int(k[1:]) for k in pct],
                list(pct.values()),
                marker="o",
                label=r["system"].removeprefix("served: "),
            )
        ax.set_xlabel("percentile")
        ax.set_yscale("log")
        ax.set_title(label)
        if served:  # the file is rewritten after every row, the first is offline only
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.serve.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--shape", help="model shape (jaxturbo.models.shapes); default: the preset's")
    ap.add_argument("--requests", type=int, help="W1 requests (default: the preset's)")
    ap.add_argument("--out", help="path stem of the .json/.md")
    ap.add_argument(
        "--decode-steps",
        type=int,
        default=1,
        help="decode steps per launch of the engine (EngineConfig.decode_steps), offline and served",
    )
    ap.add_argument(
        "--no-dispatch-thread",
        action="store_true",
        help="launch the engine's steps from the scheduling thread (Engine dispatch_thread=False)",
    )
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    name = args.shape or p["shape"]
    cfg = shape(name)
    w = {**p["w1"], **({"requests": args.requests} if args.requests else {})}
    new, num = w["new"], w["requests"]
    dtype = p["dtype"]
    out = Path(args.out) if args.out else RESULTS / f"serve_{args.preset}_{name}"
    title = f"jaxturbo serve vs the engine offline ({device_name()}, {name})"
    rows: list[dict] = []
    meta: dict[str, Any] = {
        "shape": name,
        "dtype": dtype,
        "preset": args.preset,
        "device": device_name(),
        "jax": jax.__version__,
        "w1": w,
    }

    def save() -> str:
        md = write_table(rows, COLUMNS, out, title, meta)
        plot(rows, out, title)
        return md

    prompts = w1_prompts(w, cfg.vocab_size)
    t0 = time.perf_counter()
    params = init_params(cfg, jax.random.key(0), jnp.dtype(dtype))
    engine = Engine(
        params,
        cfg,
        word_tokenizer(cfg.vocab_size),
        EngineConfig(**{**p["engine"], "decode_steps": args.decode_steps}),
        sort_variants=False,
        compilation_cache_dir="default" if p["compilation_cache"] else None,
        dispatch_thread=not args.no_dispatch_thread,
    )
    meta.update(
        dispatch_thread=engine.runner.dispatch_thread,
        decode_steps=engine.config.decode_steps,
        startup_s=round(time.perf_counter() - t0, 2),
        engine_pool=engine.runner.pool_note,
        engine_config={
            k: v for k, v in dataclasses.asdict(engine.config).items() if k in p["engine"]
        },
    )
    print(
        f"{meta['device']}: engine ready in {meta['startup_s']} s ({meta['engine_pool']})",
        flush=True,
    )

    # offline: a short warm-up run (first-use allocations), then W1 all at once
    engine.generate(prompts[:2], RequestParams(max_tokens=2, ignore_eos=True))
    off = run_engine_w1(engine, prompts, new)
    offline_tps = num * new / off["wall_s"]
    rows.append(
        {
            "system": "offline: Engine.generate",
            "rate_rps": "all at once",
            "completed": f"{num}/{num}",
            "wall_s": off["wall_s"],
            "output_tokens": num * new,
            "output_tokens_per_s": offline_tps,
            "of_offline": 1.0,
            "steps": off["steps"],
            "preemptions": off["preemptions"],
        }
    )
    print(f"offline: {offline_tps:.0f} output tokens/s", flush=True)
    save()

    config = ServeConfig(model_name=name, port=0, max_queue=num, shutdown_grace=5.0)
    meta["served_config"] = {
        "max_num_seqs": engine.config.max_num_seqs,
        "max_queue": config.max_queue,
    }
    timeout = max(120.0, 20 * off["wall_s"])
    half = 0.5 * num / off["wall_s"]  # requests/s: half the offline throughput
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = Path(tmp) / "w1.jsonl"
        prompts_file.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in prompts))
        for label, rate in (
            ("served: all at once", math.inf),
            ("served: Poisson at half the offline throughput", half),
        ):
            # a server per run over the same engine, its prefix cache emptied: no run reuses
            # the pages of the one before (as in the offline run)
            engine.set_prefix_caching(True)
            s0 = engine.stats()
            server = Server.from_engine(engine, config)
            url = server.start(timeout=600)
            try:
                warm_up(url, prompts[0])
                r = loadgen(url, prompts_file, num, new, rate, Path(tmp) / "run", timeout)
            finally:
                server.shutdown(grace=0.0)
            s1 = engine.stats()
            rows.append(
                {
                    **served_row(label, r, offline_tps),
                    "steps": s1.num_steps - s0.num_steps,
                    "preemptions": s1.num_preemptions - s0.num_preemptions,
                }
            )
            print(
                f"{label}: {r['output_tokens_per_s']:.0f} output tokens/s "
                f"({rows[-1]['of_offline']:.3f} of offline), TTFT p50 "
                f"{r['ttft_ms']['p50']:.4g} ms, ITL p50 {r['itl_ms']['p50']:.4g} ms",
                flush=True,
            )
            save()
    stats = engine.stats()
    meta["engine_after"] = {"kv_pages_used": stats.kv_pages_used, "num_running": stats.num_running}
    print(save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
