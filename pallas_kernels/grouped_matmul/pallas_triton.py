"""Grouped matmuls through the Pallas-Triton lowering (any CUDA GPU; interpret mode on CPU).

gmm: a tile schedule computed under jit from the group sizes maps each program to (group, first
row) of a BLOCK_M-row tile inside one group, so a tile never straddles two groups and no
program computes rows it then throws away (only a group's last tile is partial, its extra rows
masked).  The schedule is static in length: sum_g ceil(size_g / BLOCK_M) <= M // BLOCK_M +
(non-empty groups), so M // BLOCK_M + min(G + 1, M) programs per column tile always suffice;
the spare ones exit at once.  An extra pseudo-group after the last one covers rows past
sum(group_sizes), which are written as zeros.  Experts with no rows get no tile, so their
weights are never read (what keeps the decode step's traffic to the routed experts).

The grid is (column tile, row tile) with the column tile fastest: the programs resident at
once share a few row tiles of lhs and one group's weight, both of which stay in L2, so each is
read from HBM about once.

tgmm (the weight gradient): one program per (N tile, K tile, group) loops over its group's rows
in BLOCK_M steps (the first one starting mid-tile, rows outside the group masked to zero); an
empty group loops zero times and writes zeros.

gmv (decode): one program per (N tile, token) streams rhs[expert_ids[m]] once through
registers with elementwise products reduced at the end (a GEMV; one row is too few for a tensor
core tile), skipping tokens whose expert id is outside [0, G).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.grouped_matmul.reference import group_offsets
from pallas_kernels.triton_dot import dot as _dot


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes (powers of two, each >= 16) and Triton launch parameters.

    gmm: output tiles [block_m, block_n], contraction in block_k steps.  tgmm: output tiles
    [block_k, block_n] of each group's [K, N] gradient, contraction over rows in block_m steps."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3


# Output tiles 256 wide for wide outputs: in the tile sweep of `experiments/moe/gmm_bench.py`
# on an H200 (Qwen3-30B-A3B layer, 131,072 routed rows) they were the fastest of 12 gmm and 6
# tgmm configs: gmm 1.13x (gate/up) and 1.03x (down) over 128-wide tiles, tgmm 1.03x and 1.06x.
WIDE_N = 1024


def default_config(m: int, num_groups: int, n: int = 0) -> Config:
    """Config() with block_m cut to the mean rows per group (>= 16): a decode-sized call gets
    one small tile per routed expert instead of a mostly masked 128-row one; full 128-row
    tiles over n >= WIDE_N output columns are 256 wide."""
    bm = min(Config.block_m, max(16, pl.next_power_of_2(pl.cdiv(m, max(num_groups, 1)))))
    bn = 256 if bm == Config.block_m and n >= WIDE_N else Config.block_n
    return dataclasses.replace(Config(), block_m=bm, block_n=bn, num_warps=8 if bm >= 64 else 4)


def default_tgmm_config(n: int = 0) -> Config:
    """tgmm contracts over a group's rows (about a thousand for the MoE shapes): 64-row steps
    into a [128, 128] output tile per program ([128, 256] for n >= WIDE_N columns)."""
    return Config(block_m=64, block_n=256 if n >= WIDE_N else 128, block_k=128)


@dataclasses.dataclass(frozen=True)
class GmvConfig:
    """gmv: block_n output columns per program, contraction in block_k steps."""

    block_n: int = 128
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 4


# For weights stored [G, N, K] a row of the tile is contiguous along K: few rows, long slices.
GMV_CONFIG_T = GmvConfig(block_n=16, block_k=256)


def _start(j, block: int):
    """First index of block j, traced: a static start of a partial last block would fail the
    static bounds check of `pl.ds` (the loads there are masked); a loop index gets the hint."""
    if isinstance(j, int):
        return jnp.int32(j * block)
    return pl.multiple_of(j * block, block)


def _check_blocks(cfg, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(cfg, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name}={v}: Triton tiles must be powers of two >= 16")


def num_tiles(m: int, num_groups: int, block_m: int) -> int:
    """Static bound on the row tiles of `tile_schedule` (the pseudo-group of padding rows
    included): sum of ceil(rows / block_m) over the G + 1 segments of [0, M)."""
    return m // block_m + min(num_groups + 1, m)


def tile_schedule(
    group_sizes: jax.Array, m: int, block_m: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """group_sizes [G] -> (group [P], start [P], end [P]) int32, P = `num_tiles`.

    Tile p covers rows [start, min(start + block_m, end)) of group `group`; group G is the
    zero-filled rows past sum(group_sizes), group G + 1 a spare program with nothing to do.
    Sizes summing past M are clipped to M (rows beyond M do not exist)."""
    g = group_sizes.shape[0]
    starts = jnp.minimum(group_offsets(group_sizes), m)  # [G + 1] segment starts
    sizes = jnp.concatenate([jnp.diff(starts), m - starts[-1:]])  # [G + 1], sums to M
    tiles = (sizes + block_m - 1) // block_m
    cum = jnp.cumsum(tiles)
    p = jnp.arange(num_tiles(m, g, block_m), dtype=jnp.int32)
    seg = jnp.searchsorted(cum, p, side="right").astype(jnp.int32)  # G + 1 past the last tile
    s = jnp.minimum(seg, g)
    start = starts[s] + (p - (cum[s] - tiles[s])) * block_m
    return seg, start.astype(jnp.int32), (starts[s] + sizes[s]).astype(jnp.int32)


def _gmm_kernel(
    group_ref,
    start_ref,
    end_ref,
    lhs_ref,
    rhs_ref,
    out_ref,
    *,
    num_groups: int,
    k: int,
    n: int,
    bm: int,
    bn: int,
    bk: int,
    transpose_rhs: bool,
):
    """Output rows [start, end) x columns [n0, n0 + bn) of group `group` (masked).

    The pseudo-group G (rows past the sum) runs no contraction step and stores its zero
    accumulator; a spare program (G + 1) has an empty row range and stores nothing.  No
    branch around the loop: it stays the kernel's top-level loop, which Triton pipelines."""
    group, start, end = group_ref[...], start_ref[...], end_ref[...]
    gi = jnp.minimum(group, num_groups - 1)  # an address inside rhs even where unused
    n0 = pl.program_id(0) * bn
    cols = n0 + jnp.arange(bn)
    row_ok = (start + jnp.arange(bm) < end)[:, None]

    def step(j, acc, masked_k: bool):
        k0 = _start(j, bk)
        kc = k0 + jnp.arange(bk)
        a_mask = row_ok & (kc < k)[None, :] if masked_k else row_ok
        a = plgpu.load(
            lhs_ref.at[pl.ds(start, bm), pl.ds(k0, bk)],
            mask=jnp.broadcast_to(a_mask, (bm, bk)),
            other=0,
        )
        if transpose_rhs:  # rhs[g] is [N, K]: load a [bn, bk] tile, contract its dim 1
            w_view = rhs_ref.at[gi, pl.ds(n0, bn), pl.ds(k0, bk)]
            w_mask = (cols < n)[:, None] & (kc < k)[None, :]
        else:
            w_view = rhs_ref.at[gi, pl.ds(k0, bk), pl.ds(n0, bn)]
            w_mask = (kc < k)[:, None] & (cols < n)[None, :]
        w = plgpu.load(w_view, mask=w_mask, other=0) if masked_k or n % bn else w_view[...]
        return acc + _dot(a, w, trans_b=transpose_rhs)

    full = (group < num_groups).astype(jnp.int32) * (k // bk)
    acc = jnp.zeros((bm, bn), jnp.float32)
    if k // bk:  # (not traced at all when K < block_k: its unmasked loads would overrun K)
        acc = lax.fori_loop(0, full, functools.partial(step, masked_k=False), acc)
    if k % bk:  # the partial last K block, for real groups only
        acc = lax.fori_loop(
            full,
            full + (group < num_groups).astype(jnp.int32),
            functools.partial(step, masked_k=True),
            acc,
        )
    mask = jnp.broadcast_to(row_ok & (cols < n)[None, :], (bm, bn))
    plgpu.store(out_ref.at[pl.ds(start, bm), pl.ds(n0, bn)], acc.astype(out_ref.dtype), mask=mask)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
    transpose_rhs: bool = False,
    config: Config | None = None,
    interpret: bool = False,
) -> jax.Array:
    """lhs [M, K], rhs [G, K, N] ([G, N, K] with transpose_rhs), group_sizes [G] -> [M, N]
    (see `gmm_reference`), float32 accumulation, result in preferred_element_type or
    lhs.dtype.  Not differentiable by itself: `grouped_matmul.gmm` adds the gradient.
    config: default `default_config(M, G, N)`."""
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    cfg = config or default_config(m, g, n)
    _check_blocks(cfg, ("block_m", "block_n", "block_k"))
    out_dtype = preferred_element_type or lhs.dtype
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    group, start, end = tile_schedule(group_sizes, m, bm)
    p = group.shape[0]
    scalar = pl.BlockSpec((None,), lambda j, t: (t,))
    kernel = functools.partial(
        _gmm_kernel, num_groups=g, k=k, n=n, bm=bm, bn=bn, bk=bk, transpose_rhs=transpose_rhs
    )
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bn), p),
        in_specs=[
            scalar,
            scalar,
            scalar,
            pl.BlockSpec(lhs.shape, lambda j, t: (0, 0)),  # indexed in-kernel
            pl.BlockSpec(rhs.shape, lambda j, t: (0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((m, n), lambda j, t: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="jaxturbo_gmm",
    )(group, start, end, lhs, rhs)


def _tgmm_kernel(
    start_ref, end_ref, lhs_ref, grad_ref, out_ref, *, k: int, n: int, bm: int, bk: int, bn: int
):
    """out[g, k0:k0+bk, n0:n0+bn] = lhs[rows_g, k-tile]^T @ grad[rows_g, n-tile]."""
    start, end = start_ref[...], end_ref[...]
    k0, n0 = pl.program_id(1) * bk, pl.program_id(0) * bn
    k_ok = (k0 + jnp.arange(bk) < k)[None, :]
    n_ok = (n0 + jnp.arange(bn) < n)[None, :]

    def step(i, acc):
        r0 = start + i * bm
        r_ok = (r0 + jnp.arange(bm) < end)[:, None]  # rows of the next group are zeros
        a = plgpu.load(
            lhs_ref.at[pl.ds(r0, bm), pl.ds(k0, bk)],
            mask=jnp.broadcast_to(r_ok & k_ok if k % bk else r_ok, (bm, bk)),
            other=0,
        )
        b = plgpu.load(
            grad_ref.at[pl.ds(r0, bm), pl.ds(n0, bn)],
            mask=jnp.broadcast_to(r_ok & n_ok if n % bn else r_ok, (bm, bn)),
            other=0,
        )
        return acc + _dot(a, b, trans_a=True)

    steps = (end - start + bm - 1) // bm
    acc = lax.fori_loop(0, steps, step, jnp.zeros((bk, bn), jnp.float32))
    mask = jnp.broadcast_to(k_ok.reshape(bk, 1) & n_ok, (bk, bn))
    plgpu.store(
        out_ref.at[pl.program_id(2), pl.ds(k0, bk), pl.ds(n0, bn)],
        acc.astype(out_ref.dtype),
        mask=mask,
    )


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
    config: Config | None = None,
    interpret: bool = False,
) -> jax.Array:
    """lhs [M, K], grad [M, N], group_sizes [G] -> [G, K, N] = lhs_g^T @ grad_g per group (see
    `tgmm_reference`); empty groups give zeros.  Result in preferred_element_type or
    lhs.dtype."""
    m, k = lhs.shape
    n = grad.shape[1]
    cfg = config or default_tgmm_config(n)
    _check_blocks(cfg, ("block_m", "block_n", "block_k"))
    g = group_sizes.shape[0]
    out_dtype = preferred_element_type or lhs.dtype
    if m == 0:
        return jnp.zeros((g, k, n), out_dtype)
    offsets = jnp.minimum(group_offsets(group_sizes), m)
    bm, bk, bn = cfg.block_m, cfg.block_k, cfg.block_n
    scalar = pl.BlockSpec((None,), lambda j, i, gg: (gg,))
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, k=k, n=n, bm=bm, bk=bk, bn=bn),
        grid=(pl.cdiv(n, bn), pl.cdiv(k, bk), g),
        in_specs=[
            scalar,
            scalar,
            pl.BlockSpec(lhs.shape, lambda j, i, gg: (0, 0)),
            pl.BlockSpec(grad.shape, lambda j, i, gg: (0, 0)),
        ],
        out_specs=pl.BlockSpec((g, k, n), lambda j, i, gg: (0, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((g, k, n), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="jaxturbo_tgmm",
    )(offsets[:-1], offsets[1:], lhs, grad)


def _gmv_kernel(
    ids_ref,
    x_ref,
    rhs_ref,
    out_ref,
    *,
    num_groups: int,
    k: int,
    n: int,
    bn: int,
    bk: int,
    transpose_rhs: bool,
):
    """out[m, n0:n0+bn] = x[m] @ rhs[ids[m]][:, n0:n0+bn]; an id outside [0, G) runs no
    step (its expert is not read) and stores zeros."""
    e, row = ids_ref[...], pl.program_id(1)
    routed = (e >= 0) & (e < num_groups)
    e = jnp.clip(e, 0, num_groups - 1)
    n0 = pl.program_id(0) * bn
    n_ok = n0 + jnp.arange(bn) < n

    def step(j, acc, masked_k: bool):
        k0 = _start(j, bk)
        k_ok = k0 + jnp.arange(bk) < k
        x_view = x_ref.at[row, pl.ds(k0, bk)]
        x = (plgpu.load(x_view, mask=k_ok, other=0) if masked_k else x_view[...]).astype(
            jnp.float32
        )
        if transpose_rhs:
            view, mask, xb = (
                rhs_ref.at[e, pl.ds(n0, bn), pl.ds(k0, bk)],
                n_ok[:, None] & k_ok[None, :],
                x[None, :],
            )
        else:
            view, mask, xb = (
                rhs_ref.at[e, pl.ds(k0, bk), pl.ds(n0, bn)],
                k_ok[:, None] & n_ok[None, :],
                x[:, None],
            )
        w = plgpu.load(view, mask=mask, other=0) if masked_k or n % bn else view[...]
        return acc + xb * w.astype(jnp.float32)

    full = routed.astype(jnp.int32) * (k // bk)
    acc = jnp.zeros((bn, bk) if transpose_rhs else (bk, bn), jnp.float32)
    if k // bk:  # see _gmm_kernel
        acc = lax.fori_loop(0, full, functools.partial(step, masked_k=False), acc)
    if k % bk:
        acc = lax.fori_loop(
            full, full + routed.astype(jnp.int32), functools.partial(step, masked_k=True), acc
        )
    out = jnp.sum(acc, axis=1 if transpose_rhs else 0)
    plgpu.store(out_ref.at[row, pl.ds(n0, bn)], out.astype(out_ref.dtype), mask=n_ok)


def gmv(
    x: jax.Array,
    rhs: jax.Array,
    expert_ids: jax.Array,
    *,
    preferred_element_type=None,
    transpose_rhs: bool = False,
    config: GmvConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """x [M, K], rhs [G, K, N] ([G, N, K] with transpose_rhs), expert_ids [M] -> [M, N]
    (see `gmv_reference`): only the experts some token is routed to are read."""
    cfg = config or (GMV_CONFIG_T if transpose_rhs else GmvConfig())
    _check_blocks(cfg, ("block_n", "block_k"))
    m, k = x.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = preferred_element_type or x.dtype
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    return pl.pallas_call(
        functools.partial(
            _gmv_kernel,
            num_groups=g,
            k=k,
            n=n,
            bn=cfg.block_n,
            bk=cfg.block_k,
            transpose_rhs=transpose_rhs,
        ),
        grid=(pl.cdiv(n, cfg.block_n), m),
        in_specs=[
            pl.BlockSpec((None,), lambda j, r: (r,)),
            pl.BlockSpec(x.shape, lambda j, r: (0, 0)),
            pl.BlockSpec(rhs.shape, lambda j, r: (0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((m, n), lambda j, r: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="jaxturbo_gmv",
    )(expert_ids.astype(jnp.int32), x, rhs)
