"""Batch-1 GEMV: the Pallas-Triton kernel (`pallas_kernels/gemv`) against XLA's cuBLAS call.

The decode step of the 8B model at TP 2 spends 2.2 of its 3.5 busy ms in the MLP's GEMVs, which
cuBLAS runs at 2.6 TB/s (experiments/ladder/NOTES.md, session 7).  This measures, for each
projection of the Llama-3-8B shape under TP 1/2/4, one pass over all 32 layers of a stacked
weight (as the model's unrolled layers read it: XLA through a dynamic-slice fusion into cuBLAS,
the kernel in place through its layer index), for XLA and for every kernel config, in one run.
Reports microseconds per layer, the weight bytes read per second, and the ratio to XLA; checks
each kernel against XLA's output first.

  python experiments/gemv_bench.py --preset tiny            # CPU, interpret mode, seconds
  python experiments/gemv_bench.py --preset h100 --out DIR  # one GPU, ~2 minutes
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pallas_kernels.gemv import pallas_triton as gemv_triton  # noqa: E402

from bench_util import device_name, time_fn, write_table  # noqa: E402

# Llama-3-8B: hidden 4096, MLP 14336, 32 query heads and 8 KV heads of 128
SHAPES_8B = {"gate/up": (14336, 4096), "down": (4096, 14336), "q": (4096, 4096),
             "o": (4096, 4096), "k/v": (1024, 4096)}
CONFIGS = [gemv_triton.Config(*c) for c in (
    (4, 512, 4, 4), (8, 256, 4, 4), (8, 512, 4, 4), (8, 512, 8, 4), (8, 1024, 8, 3),
    (16, 256, 4, 4), (16, 512, 8, 4), (16, 256, 8, 5), (32, 256, 8, 4), (32, 128, 4, 4),
    (4, 1024, 4, 3), (16, 1024, 8, 3))]


def _shard(name: str, n: int, k: int, tp: int) -> tuple[int, int]:
    """Per-GPU [N, K] of a projection: column-parallel splits N, row-parallel (down, o) K."""
    return (n, k // tp) if name in ("down", "o") else (n // tp, k)


def _pass(f, layers: int):
    """All `layers` layers of the stacked weight, one GEMV each, in one jitted call, unrolled
    with static layer indices as the model's decode step has them.  (In a `fori_loop` XLA
    copied each layer's slice before cuBLAS read it: 0.8 TB/s on an H100, not what the model
    runs; `gemv_bench_h100_loop.md`.)"""
    def run(x, w):
        acc = jnp.zeros((x.shape[0], w.shape[1]), jnp.float32)
        for i in range(layers):
            acc = acc + f(x, w, jnp.int32(i)).astype(jnp.float32)
        return acc
    return jax.jit(run)


def main(argv: list[str] | None = None) -> int:
    # XLA's flags as the ladder benchmark's decode step has them (read when the backend starts):
    # without them XLA's dot merger concatenates the layers' weights and Triton GEMM fusions
    # replace cuBLAS, neither of which the model's decode step runs
    from ladder_bench import GPU_FLAGS
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *GPU_FLAGS]).strip()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=("tiny", "h100"))
    p.add_argument("--tp", default="1,2,4")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--inner", type=int, default=20,
                   help="back-to-back calls per timed window (hides the host's per-call cost)")
    p.add_argument("--out", default="runs/gemv_bench")
    a = p.parse_args(argv)
    tiny = a.preset == "tiny"
    interpret = jax.devices()[0].platform != "gpu"
    layers = 2 if tiny else 32
    shapes = {"tiny": (48, 64)} if tiny else SHAPES_8B
    configs = [gemv_triton.Config(8, 32), gemv_triton.Config(16, 64)] if tiny else CONFIGS
    dtype = jnp.float32 if tiny else jnp.bfloat16
    rows = []
    for tp in [int(t) for t in a.tp.split(",")]:
        for name, (n0, k0) in shapes.items():
            n, k = (n0, k0) if tiny else _shard(name, n0, k0, tp)
            kx, kw = jax.random.split(jax.random.PRNGKey(n + k))
            x = jax.random.normal(kx, (a.batch, k), jnp.float32).astype(dtype)
            w = (jax.random.normal(kw, (layers, n, k), jnp.float32) * k ** -0.5).astype(dtype)
            nbytes = layers * n * k * w.dtype.itemsize
            xla = _pass(lambda x, w, i: jnp.einsum("bk,nk->bn", x, w[i]), layers)
            want = np.asarray(xla(x, w))
            t_xla = time_fn(lambda: xla(x, w), repeats=a.reps, inner=a.inner)
            base = dict(tp=tp, proj=name, n=n, k=k, batch=a.batch)
            xla_row = dict(base, impl="xla (cuBLAS)", us_per_layer=t_xla / layers * 1e6,
                           tb_per_s=nbytes / t_xla / 1e12, vs_xla=1.0)
            rows.append(xla_row)
            for cfg in configs:
                label = f"pallas bn{cfg.block_n} bk{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"
                if k % cfg.block_k:
                    continue
                f = _pass(lambda x, w, i, cfg=cfg: gemv_triton.gemv(
                    x, w, layer=i, config=cfg, interpret=interpret), layers)
                try:
                    got = np.asarray(f(x, w))
                except Exception as e:  # a config Triton cannot compile is a row, not a crash
                    rows.append(dict(base, impl=label, error=str(e).splitlines()[0][:80]))
                    continue
                err = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
                t = time_fn(lambda: f(x, w), repeats=a.reps, inner=a.inner)
                rows.append(dict(base, impl=label, us_per_layer=t / layers * 1e6,
                                 tb_per_s=nbytes / t / 1e12, vs_xla=t_xla / t, max_rel_err=err))
            best = max((r for r in rows if r["tp"] == tp and r["proj"] == name
                        and "vs_xla" in r and r["impl"] != "xla (cuBLAS)"),
                       key=lambda r: r["vs_xla"], default=None)
            if best:
                print(f"# tp {tp} {name} [{n}x{k}]: xla {xla_row['tb_per_s']:.2f} "
                      f"TB/s; best {best['impl']} {best['tb_per_s']:.2f} TB/s "
                      f"({best['vs_xla']:.3f}x)", flush=True)
    cols = ["tp", "proj", "n", "k", "batch", "impl", "us_per_layer", "tb_per_s", "vs_xla",
            "max_rel_err", "error"]
    md = write_table(rows, cols, Path(a.out) / "gemv_bench",
                     f"batch-{a.batch} GEMV on {device_name()}",
                     meta=dict(device=device_name(), jax=jax.__version__, layers=layers))
    print(md)
    bad = [r for r in rows if r.get("max_rel_err", 0.0) > (1e-5 if tiny else 2e-2)]
    if bad:
        print(f"{len(bad)} kernel rows differ from XLA's output", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
