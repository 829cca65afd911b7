"""Where does a batch-1 decode step of a Llama-3-8B-shaped model spend its time?

Times one jitted cached decode step (8 of the 32 layers of the Llama-3-8B shape, random bf16
weights, to keep compiles short) for variants that each change one suspect, plus
single-projection GEMV micro-benchmarks:
  attn     decode attention: the Pallas kernel ("auto") vs the XLA reference
  linear   projections asking XLA for a float32 result (preferred_element_type) vs the model's
           `layers.linear` (a result in the parameters' dtype)
  layout   weights [out, in] (HF, x @ W^T) vs [in, out] (x @ W)
Writes a table (JSON + Markdown).  One GPU:

  python -m experiments.generate.decode_probe [--out STEM]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxturbo.cli.common import use_decode_xla_flags

use_decode_xla_flags()  # before JAX starts its backend: the flags `jaxturbo generate` decodes with

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxturbo.models.layers as layers  # noqa: E402
import jaxturbo.models.transformer as tr  # noqa: E402
from experiments.bench_util import copy_bandwidth, device_name, time_fn, write_table  # noqa: E402
from jaxturbo.models.init import init_params  # noqa: E402
from jaxturbo.models.shapes import shape  # noqa: E402

CFG = shape("llama3-8b", num_hidden_layers=8)


def f32_result_linear(x, w, b=None):
    """The projection as it was before the fix: XLA asked for a float32 result."""
    y = jnp.einsum("...i,oi->...o", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return y if b is None else y + b.astype(y.dtype)


def step_time(params, batch: int, attn_impl: str, ctx: int = 1152) -> float:
    cache = tr.init_cache(CFG, batch, 1280, jnp.bfloat16)
    cache["lengths"] = jnp.full((batch,), ctx, jnp.int32)
    tok = jnp.ones((batch, 1), jnp.int32)
    f = jax.jit(
        lambda p, t, c: tr.forward(p, CFG, t, cache=c, attn_impl=attn_impl), donate_argnums=(2,)
    )
    state = {"c": cache}

    def once():
        out, state["c"] = f(params, tok, state["c"])
        state["c"]["lengths"] = state["c"]["lengths"] - 1  # stay at the same context
        return out

    return time_fn(once, repeats=20, warmup=2)


def gemv_times(m: int) -> dict:
    k1, k2 = jax.random.split(jax.random.key(0))
    w_oi = jax.random.normal(k1, (14336, 4096), jnp.bfloat16)
    w_io = w_oi.T.copy()
    x = jax.random.normal(k2, (m, 4096), jnp.bfloat16)
    n = 28  # rotate among weights bigger than L2
    ws_oi = [w_oi + i for i in range(n)]
    ws_io = [w_io + i for i in range(n)]
    out = {}
    for name, ws, fn in (
        (
            "oi_f32acc",
            ws_oi,
            lambda x, w: jnp.einsum("mi,oi->mo", x, w, preferred_element_type=jnp.float32).astype(
                x.dtype
            ),
        ),
        ("oi_plain", ws_oi, lambda x, w: jnp.einsum("mi,oi->mo", x, w)),
        ("io_plain", ws_io, lambda x, w: x @ w),
    ):
        f = jax.jit(lambda x, *ws: [fn(x, w) for w in ws])
        t = time_fn(lambda: f(x, *ws), repeats=10) / n
        out[name] = t
        out[name + "_GBps"] = 14336 * 4096 * 2 / t / 1e9
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.generate.decode_probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results" / "decode_probe"),
        help="path stem of the .json/.md (default experiments/generate/results/decode_probe)",
    )
    out = Path(ap.parse_args(argv).out)
    bw = copy_bandwidth(1 << 31)
    params = init_params(CFG, jax.random.key(0), jnp.bfloat16)
    wbytes = sum(a.size for a in jax.tree.leaves(params["layers"])) * 2
    head = CFG.vocab_size * CFG.hidden_size * 2
    floor_ms = (wbytes + head) / bw * 1e3
    rows = []
    orig = layers.linear
    for lin_name, lin in (("f32acc", f32_result_linear), ("plain", orig)):
        tr.linear = lin  # both modules call linear: the attention and the MLP projections
        layers.linear = lin
        for attn in ("auto", "xla"):
            for b in (1, 16) if (lin_name, attn) == ("f32acc", "auto") else (1,):
                t = step_time(params, b, attn)
                rows.append(
                    {
                        "linear": lin_name,
                        "attn": attn,
                        "batch": b,
                        "step_ms": t * 1e3,
                        "floor_ms": floor_ms,
                        "floor_frac": floor_ms / (t * 1e3),
                    }
                )
                print(rows[-1], flush=True)
    tr.linear = layers.linear = orig
    for m in (1, 16):
        g = gemv_times(m)
        rows.append(
            {
                "linear": "gemv 14336x4096",
                "attn": "-",
                "batch": m,
                **{k: (v * 1e3 if not k.endswith("GBps") else v) for k, v in g.items()},
            }
        )
        print(rows[-1], flush=True)
    meta = {"device": device_name(), "copy_GBps": round(bw / 1e9), "layers": CFG.num_hidden_layers}
    cols = [
        "linear",
        "attn",
        "batch",
        "step_ms",
        "floor_ms",
        "floor_frac",
        "oi_f32acc",
        "oi_f32acc_GBps",
        "oi_plain",
        "oi_plain_GBps",
        "io_plain",
        "io_plain_GBps",
    ]
    print(write_table(rows, cols, out, "decode-step probe (8 layers of Llama-3-8B)", meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
