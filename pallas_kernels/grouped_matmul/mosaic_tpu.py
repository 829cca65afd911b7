"""Grouped matmuls through Mosaic TPU (TPU interpret mode on CPU), in the megablox style.

Rows are cut into fixed tiles of `block_m` rows aligned to the array (the TPU's DMAs want
static, aligned block shapes), so a tile may straddle group boundaries.  A jit-side schedule
lists the grid's "visits": one per (segment, row tile it overlaps), segments in row order, and
is scalar-prefetched with the segments' row ranges; the index maps read it to pick each step's
lhs tile and expert weight, and each visit's kernel masks the rows outside its segment.

gmm: grid (N tile, visit, K tile).  Consecutive visits of one row tile keep the same output
block, which stays in VMEM between them: the first visit starts from zeros and each visit
writes its own rows only.  Rows past sum(group_sizes) are a pseudo-segment whose visits skip
the matmul and write zeros; experts with no rows get no visit, so their weights are not read.

tgmm: grid (K tile, N tile, visit), visits innermost: a group's consecutive visits accumulate
lhs_tile^T @ grad_tile (rows outside the group zeroed) in a VMEM scratch, stored at its last
visit.  An empty group gets one visit with nothing in its mask, so its gradient block is zeros.

The visit count is static: sum over segments of the tiles each overlaps is at most
ceil(M / block_m) + G; the spare steps repeat the last visit's block indices (no new DMA) and
do nothing.  Only tested in TPU interpret mode (no TPU lent here).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention.common import round_up
from pallas_kernels.grouped_matmul.reference import group_offsets


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes: block_m rows (a multiple of 16 for bf16), block_k / block_n a multiple of
    128; a block_k or block_n that does not divide K or N is replaced by the whole dimension."""

    block_m: int = 128
    block_k: int = 128
    block_n: int = 128


def _interp(interpret):
    return pltpu.InterpretParams() if interpret is True else interpret


def _dot(a, b, dims):
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a, b, (dims, ((), ())), precision=prec, preferred_element_type=jnp.float32
    )


def visit_schedule(
    group_sizes: jax.Array, m: int, block_m: int, *, tail: bool, visit_empty: bool
) -> tuple[jax.Array, ...]:
    """The grid's visits for row tiles of block_m rows over M rows.

    Segments are the G groups, plus (tail=True) the rows past sum(group_sizes) as segment G.
    Returns seg [V], tile [V] (per visit), seg_start [S], seg_end [S] (row ranges) and
    num_visits [1], V = ceil(M / block_m) + G static.  A non-empty segment visits every row
    tile it overlaps; an empty one visits nothing, or (visit_empty) its own first tile once."""
    g = group_sizes.shape[0]
    tiles_m = pl.cdiv(m, block_m)
    offsets = jnp.minimum(group_offsets(group_sizes), m)
    start, end = offsets[:-1], offsets[1:]
    if tail:
        start = jnp.concatenate([start, offsets[-1:]])
        end = jnp.concatenate([end, jnp.full((1,), m, jnp.int32)])
    size = end - start
    first = jnp.minimum(start // block_m, tiles_m - 1)
    last = jnp.maximum(end - 1, 0) // block_m
    count = jnp.where(size > 0, last - first + 1, 1 if visit_empty else 0)
    cum = jnp.cumsum(count)
    total = cum[-1]
    v = jnp.minimum(jnp.arange(tiles_m + g, dtype=jnp.int32), total - 1)
    seg = jnp.searchsorted(cum, v, side="right").astype(jnp.int32)
    tile = first[seg] + v - (cum[seg] - count[seg])
    return seg, tile.astype(jnp.int32), start, end, total.reshape(1).astype(jnp.int32)


def _row_mask(tile, seg, start_ref, end_ref, bm: int):
    rows = tile * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    return (rows >= start_ref[seg]) & (rows < end_ref[seg])


def _gmm_kernel(
    seg_ref,
    tile_ref,
    start_ref,
    end_ref,
    nvis_ref,
    lhs_ref,
    rhs_ref,
    out_ref,
    acc_ref,
    *,
    num_groups: int,
    nk: int,
    bm: int,
    transpose_rhs: bool,
):
    v, kk = pl.program_id(1), pl.program_id(2)
    seg, tile = seg_ref[v], tile_ref[v]
    active = v < nvis_ref[0]

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(active & (seg < num_groups))
    def _():
        acc_ref[...] += _dot(
            lhs_ref[...], rhs_ref[...], ((1,), (1,)) if transpose_rhs else ((1,), (0,))
        )

    @pl.when(active & (kk == nk - 1))
    def _():
        # the block is this tile's since its first visit: earlier visits' rows are kept
        first_visit = (v == 0) | (tile_ref[jnp.maximum(v - 1, 0)] != tile)
        prev = jnp.where(first_visit, 0.0, out_ref[...].astype(jnp.float32))
        mask = _row_mask(tile, seg, start_ref, end_ref, bm)
        out_ref[...] = jnp.where(mask, acc_ref[...], prev).astype(out_ref.dtype)


def _tile_sizes(cfg: Config, k: int, n: int) -> tuple[int, int]:
    return (cfg.block_k if k % cfg.block_k == 0 else k, cfg.block_n if n % cfg.block_n == 0 else n)


def _pad_rows(x: jax.Array, mp: int) -> jax.Array:
    return x if x.shape[0] == mp else jnp.pad(x, ((0, mp - x.shape[0]), (0, 0)))


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
    transpose_rhs: bool = False,
    config: Config | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """lhs [M, K], rhs [G, K, N] ([G, N, K] with transpose_rhs), group_sizes [G] -> [M, N]
    (see `gmm_reference`), float32 accumulation.  Not differentiable by itself."""
    cfg = config or Config()
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = preferred_element_type or lhs.dtype
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    bm = cfg.block_m
    bk, bn = _tile_sizes(cfg, k, n)
    mp = round_up(m, bm)
    seg, tile, start, end, nvis = visit_schedule(group_sizes, m, bm, tail=True, visit_empty=False)
    nk = k // bk
    lhs_spec = pl.BlockSpec((bm, bk), lambda j, v, kk, s, t, *_: (t[v], kk))
    if transpose_rhs:
        rhs_spec = pl.BlockSpec(
            (None, bn, bk), lambda j, v, kk, s, *_: (jnp.minimum(s[v], g - 1), j, kk)
        )
    else:
        rhs_spec = pl.BlockSpec(
            (None, bk, bn), lambda j, v, kk, s, *_: (jnp.minimum(s[v], g - 1), kk, j)
        )
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, num_groups=g, nk=nk, bm=bm, transpose_rhs=transpose_rhs),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(n // bn, seg.shape[0], nk),
            in_specs=[lhs_spec, rhs_spec],
            out_specs=pl.BlockSpec((bm, bn), lambda j, v, kk, s, t, *_: (t[v], j)),
            scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        interpret=_interp(interpret),
        name="jaxturbo_gmm_tpu",
    )(seg, tile, start, end, nvis, _pad_rows(lhs, mp), rhs)
    return out[:m]


def _tgmm_kernel(
    seg_ref, tile_ref, start_ref, end_ref, nvis_ref, lhs_ref, grad_ref, out_ref, acc_ref, *, bm: int
):
    v = pl.program_id(2)
    nvis = nvis_ref[0]
    seg, tile = seg_ref[v], tile_ref[v]
    active = v < nvis

    @pl.when((v == 0) | (seg_ref[jnp.maximum(v - 1, 0)] != seg))
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(active)
    def _():
        mask = _row_mask(tile, seg, start_ref, end_ref, bm)
        a = jnp.where(mask, lhs_ref[...], 0).astype(lhs_ref.dtype)
        b = jnp.where(mask, grad_ref[...], 0).astype(grad_ref.dtype)
        acc_ref[...] += _dot(a, b, ((0,), (0,)))

    last = (v == nvis - 1) | (seg_ref[jnp.minimum(v + 1, seg_ref.shape[0] - 1)] != seg)

    @pl.when(active & last)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
    config: Config | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """lhs [M, K], grad [M, N], group_sizes [G] -> [G, K, N] = lhs_g^T @ grad_g (see
    `tgmm_reference`); empty groups give zeros."""
    cfg = config or Config()
    m, k = lhs.shape
    n = grad.shape[1]
    g = group_sizes.shape[0]
    out_dtype = preferred_element_type or lhs.dtype
    if m == 0:
        return jnp.zeros((g, k, n), out_dtype)
    bm = cfg.block_m
    bk, bn = _tile_sizes(cfg, k, n)
    mp = round_up(m, bm)
    seg, tile, start, end, nvis = visit_schedule(group_sizes, m, bm, tail=False, visit_empty=True)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, bm=bm),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(k // bk, n // bn, seg.shape[0]),
            in_specs=[
                pl.BlockSpec((bm, bk), lambda i, j, v, s, t, *_: (t[v], i)),
                pl.BlockSpec((bm, bn), lambda i, j, v, s, t, *_: (t[v], j)),
            ],
            out_specs=pl.BlockSpec((None, bk, bn), lambda i, j, v, s, *_: (s[v], i, j)),
            scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((g, k, n), out_dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=_interp(interpret),
        name="jaxturbo_tgmm_tpu",
    )(seg, tile, start, end, nvis, _pad_rows(lhs, mp), _pad_rows(grad, mp))
