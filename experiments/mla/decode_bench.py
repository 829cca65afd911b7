"""Decode speed of MLA models (absorbed latent decode) vs their GQA original at long context.

Every row: greedy decode steps over a cache already holding `context` tokens per row (random
contents: decode time does not depend on them), timed as ms per step and tokens/s, next to the
bytes each step must read (weights + cache) over the copy bandwidth measured in the same run.
Every model runs through the same loop (`lax.fori_loop` of one-token forwards, argmax feedback,
the cache donated and fed back so no call copies it) with attention implementation `auto`: the
GQA decode kernel for the original, `pallas_kernels.mla_decode_attention` for MLA.  The decode
path that ran is read from the kernels' dispatch record (`pallas_kernels.api.CHOICES`).  XLA
runs with `jaxturbo generate`'s decode flags (`DECODE_XLA_FLAGS`).

Shapes (`jaxturbo.models.shapes`, random weights; MLA widths from a KV budget, as convert-mla
splits it, plus a power-of-two split of the same size):

  python -m experiments.mla.decode_bench --preset cpu    # seconds, a smoke run
  python -m experiments.mla.decode_bench --preset gpu    # SmolLM2-135M shape at 8K/32K

Real checkpoints (the GQA original vs DeepSeek-V3 directories written by convert-mla, or
converted here first with --convert; bf16, batch 16, contexts 8192 and 32768 by default):

  python -m experiments.mla.decode_bench --original smollm2-135m \\
      --convert care-adjusted,care-uniform --kv-budget 0.5
  python -m experiments.mla.decode_bench --original DIR --converted MLA_DIR [MLA_DIR ...]
  python -m experiments.mla.decode_bench --preset models-cpu --original DIR --converted D2 ...

Every mode writes OUT.{json,md,png} (OUT a path stem; default experiments/mla/results/
decode_random_<preset> in shape mode, experiments/mla/results/decode_converted in model mode);
conversions go to --convert-dir (reused when there), never next to OUT.
Positions may pass the model's max_position_embeddings at 32K: RoPE is computed for any
position, so the speed is measured all the same (not the quality at that length).
Peak memory per row: XLA's buffer assignment for the row's compiled decode loop (arguments +
outputs not aliased to them + temporaries), so each row's number is that row's alone.

MLA widths at budget b in shape mode (DeepSeek layout, as `jaxturbo convert-mla` builds them):
rope key dr = head_dim/2, latent R = b * 2*K*hd - dr, nope/value head dims = head_dim.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from jaxturbo.cli.common import use_decode_xla_flags

use_decode_xla_flags()  # before JAX starts its backend: the flags `jaxturbo generate` decodes with

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.bench_util import (  # noqa: E402
    compiled_bytes,
    copy_bandwidth,
    device_name,
    time_fn,
    write_table,
)
from jaxturbo.errors import UserError  # noqa: E402
from jaxturbo.models.config import ModelConfig  # noqa: E402
from jaxturbo.models.init import init_params  # noqa: E402
from jaxturbo.models.mla import MLAConfig, init_mla_cache, mla_forward  # noqa: E402
from jaxturbo.models.shapes import shape  # noqa: E402
from jaxturbo.models.transformer import Params, forward, init_cache  # noqa: E402
from pallas_kernels import api as kernels_api  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = {
    "cpu": dict(
        cases=[("tiny", 256)], batch=2, new=8, budgets=(0.5,), dtype="float32", copy_bytes=1 << 26
    ),
    "gpu": dict(
        cases=[("smollm2-135m", 8192), ("smollm2-135m", 32768)],
        batch=16,
        new=128,
        budgets=(1.0, 0.5, 0.25),
        dtype="bfloat16",
        copy_bytes=1 << 31,
    ),
}
# model mode (--original): real checkpoints
MODEL_PRESETS = {
    "models": dict(
        batch=16, contexts=(8192, 32768), new=128, reps=3, dtype="bfloat16", copy_bytes=1 << 31
    ),
    "models-cpu": dict(
        batch=2, contexts=(40, 100), new=4, reps=3, dtype="float32", copy_bytes=1 << 24
    ),
}
MLA_OP, GQA_OP = "mla_decode_attention", "decode_attention_append"  # CHOICES keys


def mla_shape(cfg: ModelConfig, budget: float, pow2: bool = False) -> MLAConfig | None:
    """MLA widths spending `budget` of the GQA cache (values per token per layer).

    Default: convert-mla's split (rope key dr = head_dim/2, the rest latent: ranks like 160
    or 352).  pow2: the largest power-of-two latent with a power-of-two rope key
    (DeepSeek-like), for comparison.
    """
    total = int(round(budget * 2 * cfg.num_key_value_heads * cfg.head_dim))
    dr = cfg.head_dim // 2
    if pow2:
        dr = total - (1 << (total.bit_length() - 1))
        if dr == 0 or dr & (dr - 1):  # total is a power of two, or the rest is not one
            dr = (1 << (total.bit_length() - 1)) // 2
        if dr > cfg.head_dim:  # no such split with a rope key no wider than a head
            return None
    rank = total - dr
    if rank <= 0:
        raise ValueError(f"budget {budget} leaves no latent after a {dr}-dim rope key")
    return MLAConfig(
        base=cfg,
        kv_lora_rank=rank,
        qk_nope_head_dim=cfg.head_dim,
        qk_rope_head_dim=dr,
        v_head_dim=cfg.head_dim,
        latent_norm=False,
    )


def init_mla_params(mcfg: MLAConfig, key: jax.Array, dtype) -> Params:
    """Random MLA params: the GQA model's non-attention leaves plus MLA projections [out, in]."""
    cfg = mcfg.base
    p = init_params(cfg, key, dtype)
    layers = {
        k: v
        for k, v in p["layers"].items()
        if not k.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    }
    L, D, H = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads
    R, dn, dr, dv = mcfg.kv_lora_rank, mcfg.qk_nope_head_dim, mcfg.qk_rope_head_dim, mcfg.v_head_dim
    shapes = {
        "self_attn.q_proj.weight": (L, H * (dn + dr), D),
        "self_attn.kv_a_proj_with_mqa.weight": (L, R + dr, D),
        "self_attn.kv_b_proj.weight": (L, H * (dn + dv), R),
    }
    for i, (name, dims) in enumerate(shapes.items()):
        draw = jax.random.normal(jax.random.fold_in(key, 1000 + i), dims)
        layers[name] = (0.02 * draw).astype(dtype)
    return {**p, "layers": layers}


def random_cache(cache: dict, context: int, key: jax.Array) -> dict:
    """Fill every array of a fresh cache with noise and mark `context` slots valid per row."""
    out = {}
    for i, (name, a) in enumerate(sorted(cache.items())):
        if name == "lengths":
            out[name] = jnp.full_like(a, context)
        else:
            # drawn in the cache dtype: a float32 draw of an 8B model's cache would not fit
            out[name] = jax.random.normal(jax.random.fold_in(key, i), a.shape, a.dtype)
    return out


def decode_loop(step_fn, steps: int):
    """jit(params, cache, tok) -> (cache, last tokens) after `steps` greedy one-token steps.

    The cache is donated and comes back with its input lengths, ready for the next call: no
    call copies the cache, and every call decodes from the same context."""

    def run(params, cache, tok):
        def body(_, carry):
            cache, tok = carry
            logits, cache = step_fn(params, tok[:, None], cache)
            return cache, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

        out, tok = jax.lax.fori_loop(0, steps, body, (cache, tok))
        return {**out, "lengths": cache["lengths"]}, tok

    return jax.jit(run, donate_argnums=1)


def nbytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def time_decode(step_fn, params: Params, cache: dict, batch: int, steps: int, reps: int) -> dict:
    """Time `steps` greedy decode steps of step_fn(params, tok [B, 1], cache) -> (logits,
    cache), median of `reps` calls after a warm-up.  Returns ms per step, tokens/s, the decode
    paths the kernels' dispatch chose while tracing (`CHOICES`), and the compiled loop's
    device memory (arguments + outputs not aliased to them + temporaries)."""
    tok = jnp.zeros((batch,), jnp.int32)
    for op in (MLA_OP, GQA_OP):
        kernels_api.CHOICES.pop(op, None)
    compiled = decode_loop(step_fn, steps).lower(params, cache, tok).compile()
    paths = {op: kernels_api.CHOICES.get(op) for op in (MLA_OP, GQA_OP)}
    peak = compiled_bytes(compiled)
    state = {"cache": cache}

    def call():
        state["cache"], out = compiled(params, state["cache"], tok)
        return out

    per_step = time_fn(call, repeats=reps) / steps
    return {
        "ms_per_step": per_step * 1e3,
        "tokens_per_s": batch / per_step,
        "paths": paths,
        "peak_MiB": None if peak is None else peak / 2**20,
    }


def _path(paths: dict, op: str) -> str:
    """The implementation `op` ran with, '-' when it did not run."""
    return paths[op][0] if paths.get(op) else "-"


def bench_case(
    name: str, context: int, budgets, batch: int, new: int, dtype, bw: float, reps: int = 3
) -> list[dict]:
    cfg = shape(name)
    key = jax.random.key(0)
    # cache slots a multiple of 256, as generation's buckets are: the decode kernels then tile
    # the cache without padding it (a pad would copy the whole cache every step)
    slots = -(-(context + new + 1) // 256) * 256
    rows = []
    variants = [("gqa", None)]
    for b in budgets:
        variants.append((f"mla@{b:g}", mla_shape(cfg, b)))
        m2 = mla_shape(cfg, b, pow2=True)
        if m2 is not None and m2.kv_lora_rank != variants[-1][1].kv_lora_rank:
            variants.append((f"mla@{b:g} pow2", m2))
    for label, mcfg in variants:
        if mcfg is None:
            params = init_params(cfg, key, dtype)
            cache = init_cache(cfg, batch, slots, dtype)
            step = lambda p, t, c: forward(p, cfg, t, cache=c, attn_impl="auto")  # noqa: E731
            kv_per_token = 2 * cfg.num_key_value_heads * cfg.head_dim
        else:
            params = init_mla_params(mcfg, key, dtype)
            cache = init_mla_cache(mcfg, batch, slots, dtype)
            step = lambda p, t, c, m=mcfg: mla_forward(p, m, t, cache=c, attn_impl="auto")  # noqa: E731
            kv_per_token = mcfg.kv_lora_rank + mcfg.qk_rope_head_dim
        cache = random_cache(cache, context, key)
        res = time_decode(step, params, cache, batch, new, reps)
        del cache
        itemsize = jnp.dtype(dtype).itemsize
        weight_bytes = nbytes(params) - (
            0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * itemsize
        )
        kv_bytes = cfg.num_hidden_layers * kv_per_token * itemsize * batch * context
        floor = (weight_bytes + kv_bytes) / bw
        per_step = res["ms_per_step"] / 1e3
        rows.append(
            {
                "shape": name,
                "model": label,
                "context": context,
                "batch": batch,
                "kv_values_per_token_layer": kv_per_token,
                "latent+rope": "-"
                if mcfg is None
                else f"{mcfg.kv_lora_rank}+{mcfg.qk_rope_head_dim}",
                "mla_decode": "-" if mcfg is None else _path(res["paths"], MLA_OP),
                "ms_per_step": res["ms_per_step"],
                "tokens_per_s": res["tokens_per_s"],
                "floor_ms": floor * 1e3,
                "fraction_of_floor": floor / per_step,
                "kv_GB_read": kv_bytes / 1e9,
                "peak_MiB": res["peak_MiB"],
            }
        )
        r = rows[-1]
        print(
            f"{name} ctx {context} {label}: {r['tokens_per_s']:.0f} tok/s, {r['ms_per_step']:.3f} "
            f"ms/step (floor {r['floor_ms']:.3f}), MLA decode {r['mla_decode']}",
            flush=True,
        )
        del params
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_gqa"] = r["tokens_per_s"] / base
    return rows


def plot(
    rows: list[dict],
    out: Path,
    panel=lambda r: f"{r['shape']}, ctx {r['context']}",
    label=lambda r: r["model"],
) -> None:
    """Bars of decode tokens/s (label(row) under each), one panel per distinct panel(row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(panel(r) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, name in zip(axes[0], panels):
        rs = [r for r in rows if panel(r) == name]
        x = np.arange(len(rs))
        ax.bar(x, [r["tokens_per_s"] for r in rs])
        ax.set_xticks(x, [label(r) for r in rs], rotation=30, fontsize=7)
        ax.set_title(f"{name}, batch {rs[0]['batch']}", fontsize=9)
        ax.set_ylabel("decode tokens/s")
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=120)


# ----------------------------------------------------------------------------- model mode
def convert(original: str, spec: str, budget: float, root: Path, extra: list[str]) -> Path:
    """A DeepSeek-V3 directory of `original` converted by `jaxturbo convert-mla` with spec
    METHOD-RANKS (care-adjusted, care-uniform, svd-joint-uniform, ...) at `budget`, written
    under `root` (an existing conversion there is reused).  extra: more convert-mla flags."""
    from jaxturbo.cli import main as cli_main
    from jaxturbo.convert.mla.factorize import METHODS, RANK_MODES

    method, _, ranks = spec.rpartition("-")
    if method not in METHODS or ranks not in RANK_MODES:
        raise UserError(
            f"--convert {spec!r}: expected METHOD-RANKS with METHOD in {METHODS} and "
            f"RANKS in {RANK_MODES}, e.g. care-adjusted"
        )
    out = root / f"{Path(original).name.removesuffix('.gguf')}-{spec}-kv{budget:g}"
    if (out / "config.json").is_file():
        print(f"reusing the conversion in {out}", flush=True)
        return out
    argv = [
        "convert-mla",
        "--model",
        original,
        "--out",
        str(out),
        "--method",
        method,
        "--ranks",
        ranks,
        "--kv-budget",
        str(budget),
        "--eval-tokens",
        "0",
        *extra,
    ]
    print("jaxturbo " + shlex.join(argv), flush=True)
    if cli_main(argv) != 0:
        raise UserError(f"convert-mla {spec} failed (see above)")
    return out


def _conversion_summary(path: Path) -> dict:
    import json

    f = path / "mla_conversion.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def bench_models(
    original: str,
    converted: list[Path],
    contexts,
    batch: int,
    new: int,
    reps: int,
    dtype,
    bw: float,
    mla_impls=("auto",),
) -> list[dict]:
    """Rows for the GQA original (loaded with `bridge.load_model`) and each converted
    DeepSeek-V3 directory (`bridge.deepseek.load_deepseek`) at every context, all timed in this
    process; `speedup_vs_original` divides by the original's tokens/s at the same context."""
    from jaxturbo.bridge import load_model
    from jaxturbo.bridge.deepseek import load_deepseek

    itemsize = jnp.dtype(dtype).itemsize
    key = jax.random.key(0)
    rows = []
    models = [("original", original, None)] + [
        (Path(d).name, d, impl) for d in converted for impl in mla_impls
    ]
    for label, where, impl in models:
        if impl is None:
            cfg, params, _ = load_model(where, dtype=dtype)
            if isinstance(cfg, MLAConfig):
                raise UserError(f"--original {where} is an MLA model; give the GQA original")
            base = cfg
            kv_stored = kv_ranks = (
                2 * cfg.num_key_value_heads * cfg.head_dim * cfg.num_hidden_layers
            )
            widths = f"K={cfg.num_key_value_heads} x hd {cfg.head_dim}"
            step = lambda p, t, c, m=cfg: forward(p, m, t, cache=c, attn_impl="auto")  # noqa: E731
            new_cache = lambda n, m=cfg: init_cache(m, batch, n, dtype)  # noqa: E731
        else:
            cfg, params = load_deepseek(where, dtype=dtype)
            base = cfg.base
            kv_stored = base.num_hidden_layers * (cfg.cache_rank + cfg.qk_rope_head_dim)
            kv_ranks = cfg.kv_values_per_token()
            widths = f"{cfg.kv_lora_rank}+{cfg.qk_rope_head_dim}"
            if cfg.cache_rank != cfg.kv_lora_rank:
                widths += f" (stored {cfg.cache_rank})"
            if cfg.layer_ranks:
                widths += f" (ranks {min(cfg.layer_ranks)}..{max(cfg.layer_ranks)})"
            step = lambda p, t, c, m=cfg, i=impl: mla_forward(
                p,
                m,
                t,
                cache=c,  # noqa: E731
                attn_impl=i,
            )
            new_cache = lambda n, m=cfg: init_mla_cache(m, batch, n, dtype)  # noqa: E731
        weight_bytes = nbytes(params) - (
            0 if base.tie_word_embeddings else base.vocab_size * base.hidden_size * itemsize
        )
        for ctx in contexts:
            if ctx + new > base.max_position_embeddings:
                print(
                    f"note: {label} at context {ctx}: positions up to {ctx + new} pass "
                    f"max_position_embeddings {base.max_position_embeddings} (fine for a "
                    "speed measurement)",
                    flush=True,
                )
            slots = -(-(ctx + new + 1) // 256) * 256  # generation's 256-aligned buckets
            cache = random_cache(new_cache(slots), ctx, key)
            res = time_decode(step, params, cache, batch, new, reps)
            del cache
            kv_read = kv_stored * itemsize * batch * ctx
            floor = (weight_bytes + kv_read) / bw
            path = _path(res["paths"], GQA_OP) if impl is None else _path(res["paths"], MLA_OP)
            rows.append(
                {
                    "model": label,
                    "attn": "auto" if impl is None else impl,
                    "context": ctx,
                    "batch": batch,
                    "kv_widths": widths,
                    "kv_bytes_per_token": kv_stored * itemsize,
                    "kv_bytes_per_token_ranks": kv_ranks * itemsize,
                    "decode_path": path,
                    "ms_per_step": res["ms_per_step"],
                    "tokens_per_s": res["tokens_per_s"],
                    "floor_ms": floor * 1e3,
                    "fraction_of_floor": floor * 1e3 / res["ms_per_step"],
                    "peak_MiB": res["peak_MiB"],
                    "conversion": {
                        k: v
                        for k, v in _conversion_summary(Path(where)).items()
                        if k
                        in (
                            "method",
                            "ranks",
                            "kv_budget",
                            "rope_dim",
                            "kv_lora_rank",
                            "ppl_before",
                            "ppl_after",
                        )
                    }
                    if impl is not None
                    else {},
                }
            )
            r = rows[-1]
            peak = "?" if r["peak_MiB"] is None else f"{r['peak_MiB']:.0f}"
            print(
                f"{label} [{r['attn']}] ctx {ctx}: {r['tokens_per_s']:.0f} tok/s, "
                f"{r['ms_per_step']:.3f} ms/step, decode path {path}, {peak} MiB",
                flush=True,
            )
        del params
    for r in rows:
        ref = next(b for b in rows if b["model"] == "original" and b["context"] == r["context"])
        r["speedup_vs_original"] = r["tokens_per_s"] / ref["tokens_per_s"]
    return rows


def models_main(args: argparse.Namespace) -> int:
    p = dict(MODEL_PRESETS[args.preset or "models"])
    for k in ("batch", "new", "reps", "dtype"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    if args.contexts:
        p["contexts"] = tuple(int(c) for c in args.contexts.split(","))
    if p["reps"] < 3:
        raise UserError(f"--reps {p['reps']}: the median needs at least 3 timed repetitions")
    converted = [Path(d) for d in args.converted or []]
    if args.convert:
        from jaxturbo.bridge.registry import cache_dir

        root = Path(args.convert_dir) if args.convert_dir else cache_dir() / "mla-converted"
        extra = shlex.split(args.convert_args or "")
        converted += [
            convert(args.original, spec.strip(), args.kv_budget, root, extra)
            for spec in args.convert.split(",")
            if spec.strip()
        ]
    if not converted:
        raise UserError("model mode needs --converted DIR [DIR ...] and/or --convert METHODS")
    for d in converted:
        if not (d / "config.json").is_file():
            raise UserError(
                f"--converted {d}: no config.json (a DeepSeek-V3 directory from "
                "jaxturbo convert-mla)"
            )
    dtype = jnp.dtype(p["dtype"])
    bw = copy_bandwidth(p["copy_bytes"])
    rows = bench_models(
        args.original,
        converted,
        p["contexts"],
        p["batch"],
        p["new"],
        p["reps"],
        dtype,
        bw,
        tuple(args.mla_impls.split(",")),
    )
    meta = {
        "device": device_name(),
        "copy_bandwidth_GBps": round(bw / 1e9, 1),
        "dtype": p["dtype"],
        "batch": p["batch"],
        "steps_timed": p["new"],
        "repetitions": f"median of {p['reps']}",
        "original": args.original,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "jax": jax.__version__,
        "positions": "may pass max_position_embeddings (speed only)",
        "peak_MiB": "per row: XLA's buffers for the row's compiled decode loop "
        "(arguments + unaliased outputs + temporaries)",
    }
    cols = [
        "model",
        "attn",
        "context",
        "batch",
        "kv_widths",
        "kv_bytes_per_token",
        "decode_path",
        "ms_per_step",
        "tokens_per_s",
        "speedup_vs_original",
        "floor_ms",
        "fraction_of_floor",
        "peak_MiB",
    ]
    out = Path(args.out) if args.out else RESULTS / "decode_converted"
    md = write_table(
        rows, cols, out, f"MLA conversions vs the GQA original, decode ({meta['device']})", meta
    )
    plot(
        rows,
        out,
        panel=lambda r: f"context {r['context']}",
        label=lambda r: r["model"] if r["attn"] == "auto" else f"{r['model']} [{r['attn']}]",
    )
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.mla.decode_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--preset",
        choices=sorted(PRESETS) + sorted(MODEL_PRESETS),
        default=None,
        help="shape mode: cpu (default), gpu; model mode (--original): models "
        "(default), models-cpu",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="path stem of the .json/.md/.png (default experiments/mla/results/"
        "decode_random_<preset> in shape mode, .../decode_converted in model "
        "mode)",
    )
    ap.add_argument(
        "--original", help="model mode: the GQA original (registry name, HF dir, .gguf)"
    )
    ap.add_argument("--converted", nargs="+", help="model mode: DeepSeek-V3 dirs from convert-mla")
    ap.add_argument(
        "--convert",
        help="model mode: convert the original first, comma-separated "
        "METHOD-RANKS (e.g. care-adjusted,care-uniform)",
    )
    ap.add_argument("--kv-budget", type=float, default=0.5, help="--convert's KV budget")
    ap.add_argument(
        "--convert-dir",
        help="where --convert writes (default: jaxturbo's cache "
        "dir / mla-converted); existing conversions are reused",
    )
    ap.add_argument(
        "--convert-args",
        help="more convert-mla flags, one string (e.g. '--calib-samples 8 --eval-tokens 2048')",
    )
    ap.add_argument(
        "--mla-impls",
        default="auto",
        help="model mode: MLA attention implementations to time, comma-separated (e.g. auto,xla)",
    )
    ap.add_argument("--contexts", help="model mode: comma-separated contexts (default 8192,32768)")
    ap.add_argument("--batch", type=int, help="model mode: rows (default 16)")
    ap.add_argument("--steps", dest="new", type=int, help="model mode: decode steps per call")
    ap.add_argument("--reps", type=int, help="model mode: timed calls (median; >= 3)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), help="model mode: weights + cache")
    args = ap.parse_args(argv)
    if args.original or args.preset in MODEL_PRESETS:
        if not args.original:
            raise UserError(f"--preset {args.preset} needs --original")
        try:
            return models_main(args)
        except UserError as e:
            print(f"experiments.mla.decode_bench: error: {e}", file=sys.stderr)
            return 2
    p = PRESETS[args.preset or "cpu"]
    bw = copy_bandwidth(p["copy_bytes"])
    rows = []
    for name, ctx in p["cases"]:
        try:
            rows += bench_case(
                name, ctx, p["budgets"], p["batch"], p["new"], jnp.dtype(p["dtype"]), bw
            )
        except Exception as e:  # one case running out of memory should not lose the others
            print(f"{name} ctx {ctx}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    meta = {
        "device": device_name(),
        "copy_bandwidth_GBps": round(bw / 1e9, 1),
        "dtype": p["dtype"],
        "new_tokens": p["new"],
        "jax": jax.__version__,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }
    cols = [
        "shape",
        "model",
        "context",
        "batch",
        "kv_values_per_token_layer",
        "latent+rope",
        "mla_decode",
        "ms_per_step",
        "tokens_per_s",
        "speedup_vs_gqa",
        "floor_ms",
        "fraction_of_floor",
        "peak_MiB",
    ]
    out = Path(args.out) if args.out else RESULTS / f"decode_random_{args.preset or 'cpu'}"
    md = write_table(rows, cols, out, f"MLA vs GQA decode ({meta['device']})", meta)
    if rows:
        plot(rows, out)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
