"""GEMV through the Pallas-Triton lowering (GPU; interpret mode on CPU), for batch-1 decode.

At batch 1 a projection is a stream of its weight through the SMs: XLA hands it to cuBLAS, whose
H100 GEMV read the 8B model's MLP weights at 2.6 TB/s in the TP 2 decode step (78% of HBM
peak; experiments/ladder/NOTES.md).  This kernel is the candidate to replace it: each program
owns `block_n` output rows and walks the contraction in `block_k` slices, keeping elementwise
products in registers and reducing once at the end (a cross-lane reduction per slice would cost
more than the loads), with the loads software-pipelined by Triton (`num_stages`).  The weight
may be one layer of a stacked [L, N, K] parameter, read in place (a slice handed to a custom
call is a copy).  Not wired into the models: `experiments/gemv_bench.py` measures it first.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class Config:
    """Output rows per program, contraction slice per step, Triton launch parameters."""

    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 4


def _gemv_kernel(layer_ref, x_ref, w_ref, o_ref, *, n: int, k: int, block_n: int, block_k: int):
    """One block of output rows: o [Bp, block_n] = x [Bp, K] @ w[layer, rows, :]^T."""
    layer, row0 = layer_ref[...], pl.program_id(0) * block_n
    inside = (row0 + jnp.arange(block_n) < n)[:, None]

    def body(j, acc):
        c0 = pl.multiple_of(j * block_k, block_k)
        view = w_ref.at[layer, pl.ds(row0, block_n), pl.ds(c0, block_k)]
        w = view[...] if n % block_n == 0 else plgpu.load(view, mask=inside, other=0)
        x = x_ref[:, pl.ds(c0, block_k)]
        return acc + x.astype(jnp.float32)[:, None, :] * w.astype(jnp.float32)[None, :, :]

    acc = lax.fori_loop(0, k // block_k, body,
                        jnp.zeros((x_ref.shape[0], block_n, block_k), jnp.float32))
    o_ref[...] = jnp.sum(acc, axis=2).astype(o_ref.dtype)


def gemv(x: jax.Array, w: jax.Array, *, layer: jax.Array | int | None = None,
         config: Config | None = None, interpret: bool = False) -> jax.Array:
    """x [B, K] @ w[N, K]^T -> [B, N] in x.dtype (see `gemv_reference`).

    layer: w is a stacked [L, N, K] parameter and layer `layer` (int or traced int32) is read in
    place.  B is padded to a power of two (Triton tiles); keep it small (decode batches)."""
    cfg = config or Config()
    if layer is None:
        w, layer = w[None], 0
    b, k = x.shape
    n = w.shape[1]
    if w.shape[2] != k:
        raise ValueError(f"x has {k} features but the weight has {w.shape[2]} (w is [N, K])")
    if k % cfg.block_k:
        raise ValueError(f"block_k={cfg.block_k} must divide the contraction length {k}")
    bp = pl.next_power_of_2(b)
    xp = jnp.pad(x, ((0, bp - b), (0, 0)))
    out = pl.pallas_call(
        functools.partial(_gemv_kernel, n=n, k=k, block_n=cfg.block_n, block_k=cfg.block_k),
        grid=(pl.cdiv(n, cfg.block_n),),
        in_specs=[pl.BlockSpec((None,), lambda i: (0,)),
                  pl.BlockSpec((bp, k), lambda i: (0, 0)),
                  pl.BlockSpec(w.shape, lambda i: (0, 0, 0))],  # indexed in-kernel
        out_specs=pl.BlockSpec((bp, cfg.block_n), lambda i: (0, i)),
        out_shape=jax.ShapeDtypeStruct((bp, n), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages),
        interpret=interpret,
        name="jaxturbo_gemv",
    )(jnp.asarray(layer, jnp.int32).reshape(1), xp, w)
    return out[:b]
