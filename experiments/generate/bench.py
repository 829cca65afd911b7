"""Decode throughput of jaxturbo's on-device generation loop vs the memory-bandwidth floor.

For each model and batch: prefill time, decode ms/step and tokens/s, and the floor
  bytes read per decode step (all weights once + the KV cache at mean context) / copy bandwidth
with the copy bandwidth measured in the same run.  Writes JSON + Markdown + a plot.

  python -m experiments.generate.bench --preset cpu   # tiny + SmolLM2-135M shapes, CPU, float32
  python -m experiments.generate.bench --preset gpu   # SmolLM2-135M + Llama-3-8B, 1 GPU, bf16

Models: a name of the shape table (`jaxturbo.models.shapes`: llama3-8b, smollm2-135m, tiny, ...)
gets random weights of that shape (speed does not depend on the values); anything else (an HF
directory, a .gguf) is loaded with its weights.

Timing: `generate(1 new token)` (prefill + one sampled token) and `generate(N new tokens)` run
back to back `--reps` times; decode ms/step = the median of the pairs' differences / (N - 1)
(`bench_util.time_difference`; a non-positive difference is an error, not a row); prefill s =
the median of the `generate(1)` times.  No stop token: every row runs N steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxturbo.cli.common import use_decode_xla_flags

use_decode_xla_flags()  # before JAX starts its backend: the flags `jaxturbo generate` decodes with

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.bench_util import (  # noqa: E402
    copy_bandwidth,
    device_name,
    process_peak_bytes,
    time_difference,
    write_table,
)
from jaxturbo.inference.generation import generate_arrays  # noqa: E402
from jaxturbo.inference.sampling import SamplingParams  # noqa: E402
from jaxturbo.models.config import ModelConfig  # noqa: E402
from jaxturbo.models.init import init_params  # noqa: E402
from jaxturbo.models.shapes import SHAPES, shape  # noqa: E402
from jaxturbo.models.transformer import kv_cache_bytes_per_token  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = {
    "cpu": dict(
        models=["tiny", "smollm2-135m"],
        batches=[1, 16],
        prompt=128,
        new=32,
        dtype="float32",
        copy_bytes=1 << 28,
    ),
    "gpu": dict(
        models=["smollm2-135m", "llama3-8b"],
        batches=[1, 16],
        prompt=1024,
        new=256,
        dtype="bfloat16",
        copy_bytes=1 << 31,
    ),
}


def load(name: str, dtype: str) -> tuple[ModelConfig, dict]:
    """(config, params): random weights for a shape-table name, else the model's own weights."""
    if name in SHAPES:
        cfg = shape(name)
        return cfg, init_params(cfg, jax.random.key(0), jnp.dtype(dtype))
    from jaxturbo.bridge import load_model

    cfg, params, _ = load_model(name, dtype=dtype, progress=False)
    return cfg, params


def run_case(
    cfg: ModelConfig, params: dict, batch: int, prompt: int, new: int, bw: float, reps: int
) -> dict:
    """One row: `batch` random prompts of `prompt` tokens, `new` greedy tokens each."""
    if new < 2:
        raise ValueError(
            f"new tokens {new}: decode time needs at least 2 (generate(N) - generate(1))"
        )
    rng = np.random.RandomState(0)
    toks = jnp.asarray(rng.randint(0, cfg.vocab_size, (batch, prompt)), jnp.int32)
    lens = jnp.full((batch,), prompt, jnp.int32)
    stops = jnp.asarray([-1], jnp.int32)  # no stop token: every row runs the full length
    dtype = jnp.dtype(jax.tree.leaves(params)[0].dtype).name

    def gen(n: int):
        return lambda: generate_arrays(
            params,
            toks,
            lens,
            jax.random.key(0),
            stops,
            cfg=cfg,
            max_new_tokens=n,
            sampling=SamplingParams(),
            stream=None,
            attn_impl="auto",
            cache_dtype=dtype,
        )

    t1, _, decode_s = time_difference(
        gen(1),
        gen(new),
        repeats=reps,
        what=f"decode time of {new - 1} steps",
        fix="raise --new-tokens (or --reps)",
    )
    per_tok = decode_s / (new - 1)
    itemsize = jnp.dtype(dtype).itemsize
    weight_bytes = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params)) * itemsize
    if not cfg.tie_word_embeddings:  # the input embedding is gathered, not read whole
        weight_bytes -= cfg.vocab_size * cfg.hidden_size * itemsize
    kv_bytes = kv_cache_bytes_per_token(cfg, dtype) * batch * (prompt + new / 2)
    floor = (weight_bytes + kv_bytes) / bw
    return {
        "batch": batch,
        "prompt": prompt,
        "new_tokens": new,
        "prefill_s": t1,
        "decode_ms_per_step": per_tok * 1e3,
        "tokens_per_s": batch / per_tok,
        "floor_ms_per_step": floor * 1e3,
        "fraction_of_floor": floor / per_tok,
        "weights_GB": weight_bytes / 1e9,
        "kv_GB_read": kv_bytes / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.generate.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument(
        "--models", nargs="*", help="override the preset's models (shape names or model paths)"
    )
    ap.add_argument("--new-tokens", type=int, help="override the preset's new tokens per row")
    ap.add_argument("--reps", type=int, default=3, help="back-to-back pairs timed (median)")
    ap.add_argument(
        "--out",
        help="path stem of the .json/.md/.png (default "
        "experiments/generate/results/decode_<preset>)",
    )
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    new = args.new_tokens or p["new"]
    bw = copy_bandwidth(p["copy_bytes"])
    rows = []
    for name in args.models or p["models"]:
        cfg, params = load(name, p["dtype"])
        for b in p["batches"]:
            r = {"model": name, **run_case(cfg, params, b, p["prompt"], new, bw, args.reps)}
            rows.append(r)
            print(
                f"{name} batch {b}: {r['tokens_per_s']:.1f} tok/s, "
                f"{r['decode_ms_per_step']:.2f} ms/step (floor {r['floor_ms_per_step']:.2f})",
                flush=True,
            )
        del params
    meta = {
        "device": device_name(),
        "copy_bandwidth_GBps": round(bw / 1e9, 1),
        "dtype": p["dtype"],
        "jax": jax.__version__,
        "repetitions": f"median of {args.reps}",
        "weights": "random for shape-table names",
        # the allocator's high-water mark over every model and batch of this run
        "process_peak_bytes_in_use": process_peak_bytes(),
    }
    cols = [
        "model",
        "batch",
        "prompt",
        "new_tokens",
        "prefill_s",
        "decode_ms_per_step",
        "tokens_per_s",
        "floor_ms_per_step",
        "fraction_of_floor",
    ]
    out = Path(args.out) if args.out else RESULTS / f"decode_{args.preset}"
    md = write_table(rows, cols, out, f"Decode throughput ({meta['device']})", meta)
    plot(rows, out)
    print(md)
    return 0


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\nb={r['batch']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.5))
    ax.bar(x - 0.2, [r["decode_ms_per_step"] for r in rows], 0.4, label="measured")
    ax.bar(x + 0.2, [r["floor_ms_per_step"] for r in rows], 0.4, label="bandwidth floor")
    ax.set_xticks(x, labels)
    ax.set_ylabel("ms per decode step")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
