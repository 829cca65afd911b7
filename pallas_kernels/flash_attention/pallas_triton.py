"""Flash attention through the Pallas-Triton lowering (any CUDA GPU; interpret mode on CPU).

Kept alone in this file because the Pallas-Triton lowering is deprecated in JAX 0.11: swapping
it for jax-triton later touches only this module.

FlashAttention-2 (Dao, 2023): the forward keeps a running max and sum per query row over key
blocks; the backward recomputes the probabilities from the saved log-sum-exp and runs two
kernels, one per query block for dQ and one per key block for dK/dV.  GQA: the dK/dV kernel of
a KV head loops over the query heads of its group, so K/V are never repeated in memory.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention import common
from pallas_kernels.flash_attention.common import MaskSpec
from pallas_kernels.triton_dot import dot as _dot


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes and Triton launch parameters (static)."""

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int | None = None
    num_stages: int = 3
    num_warps_bwd: int | None = None
    num_stages_bwd: int = 2


def _logits(spec: MaskSpec, q, k):
    """Scaled (and soft-capped) logits [bq, bk] plus tanh for the softcap derivative."""
    s = _dot(q, k, trans_b=True) * spec.scale
    if spec.softcap is None:
        return s, None
    t = jnp.tanh(s / spec.softcap)
    return spec.softcap * t, t


def _three_loops(lo_ref, flo_ref, fhi_ref, hi_ref, body, carry):
    """Masked blocks [lo, flo), mask-free blocks [flo, fhi), masked blocks [fhi, hi)."""
    lo, flo, fhi, hi = lo_ref[...], flo_ref[...], fhi_ref[...], hi_ref[...]
    carry = lax.fori_loop(lo, flo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(flo, fhi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(fhi, hi, functools.partial(body, masked=True), carry)


def _fwd_kernel(
    lo_ref,
    flo_ref,
    fhi_ref,
    hi_ref,
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kseg_ref,
    o_ref,
    lse_ref,
    *,
    spec: MaskSpec,
    block_q: int,
    block_k: int,
):
    qi = pl.program_id(0)
    q = q_ref[...]
    q_pos = qi * block_q + jnp.arange(block_q)
    q_seg = qseg_ref[...] if spec.has_segments else None
    d = q.shape[-1]

    def body(j, carry, masked):
        acc, m, l = carry
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s, _ = _logits(spec, q, k)
        if masked:
            k_pos = start + jnp.arange(block_k)
            k_seg = kseg_ref[pl.ds(start, block_k)] if spec.has_segments else None
            mask = common.visible(spec, q_pos[:, None], k_pos[None, :], _col(q_seg), _row(k_seg))
            s = jnp.where(mask, s, common.NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row with no visible key yet keeps m = -inf; shift by 0 so exp gives 0, not NaN.
        m_safe = jnp.where(m_new == common.NEG_INF, 0.0, m_new)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    acc = jnp.zeros((block_q, d), jnp.float32)
    m = jnp.full((block_q,), common.NEG_INF, jnp.float32)
    l = jnp.zeros((block_q,), jnp.float32)
    acc, m, l = _three_loops(lo_ref, flo_ref, fhi_ref, hi_ref, body, (acc, m, l))
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, common.NEG_INF, m + jnp.log(jnp.where(empty, 1.0, l)))


def _dq_kernel(
    lo_ref,
    flo_ref,
    fhi_ref,
    hi_ref,
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kseg_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    *,
    spec: MaskSpec,
    block_q: int,
    block_k: int,
):
    qi = pl.program_id(0)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    lse = jnp.where(lse == common.NEG_INF, 0.0, lse)
    delta = delta_ref[...]
    q_pos = qi * block_q + jnp.arange(block_q)
    q_seg = qseg_ref[...] if spec.has_segments else None

    def body(j, dq, masked):
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s, t = _logits(spec, q, k)
        p = jnp.exp(s - lse[:, None])
        if masked:
            k_pos = start + jnp.arange(block_k)
            k_seg = kseg_ref[pl.ds(start, block_k)] if spec.has_segments else None
            mask = common.visible(spec, q_pos[:, None], k_pos[None, :], _col(q_seg), _row(k_seg))
            p = jnp.where(mask, p, 0.0)
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = _three_loops(
        lo_ref, flo_ref, fhi_ref, hi_ref, body, jnp.zeros((block_q, q.shape[-1]), jnp.float32)
    )
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    lo_ref,
    flo_ref,
    fhi_ref,
    hi_ref,
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kseg_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    spec: MaskSpec,
    block_q: int,
    block_k: int,
    groups: int,
):
    kj = pl.program_id(0)
    kvh = pl.program_id(2)
    k = k_ref[...]
    v = v_ref[...]
    k_pos = kj * block_k + jnp.arange(block_k)
    k_seg = kseg_ref[...] if spec.has_segments else None

    def head_body(g, carry):
        h = kvh * groups + g

        def body(i, carry, masked):
            dk, dv = carry
            start = pl.multiple_of(i * block_q, block_q)
            q = q_ref[pl.ds(start, block_q), h, :]
            do = do_ref[pl.ds(start, block_q), h, :]
            lse = lse_ref[h, pl.ds(start, block_q)]
            lse = jnp.where(lse == common.NEG_INF, 0.0, lse)
            delta = delta_ref[h, pl.ds(start, block_q)]
            s, t = _logits(spec, q, k)
            p = jnp.exp(s - lse[:, None])
            if masked:
                q_pos = start + jnp.arange(block_q)
                q_seg = qseg_ref[pl.ds(start, block_q)] if spec.has_segments else None
                mask = common.visible(
                    spec, q_pos[:, None], k_pos[None, :], _col(q_seg), _row(k_seg)
                )
                p = jnp.where(mask, p, 0.0)
            dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
            ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
            if t is not None:
                ds = ds * (1.0 - t * t)
            dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
            return dk, dv

        return _three_loops(lo_ref, flo_ref, fhi_ref, hi_ref, body, carry)

    zeros = jnp.zeros((block_k, k.shape[-1]), jnp.float32)
    dk, dv = lax.fori_loop(0, groups, head_body, (zeros, zeros))
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _col(x):
    return None if x is None else x[:, None]


def _row(x):
    return None if x is None else x[None, :]


def _prepare(q, k, v, q_seg, k_seg, spec: MaskSpec, block_q: int, block_k: int):
    """Pads to whole blocks; segment ids default to zeros only when absent from the spec."""
    tp = common.round_up(spec.q_len, block_q)
    sp = common.round_up(spec.kv_len, block_k)
    q = common.pad_seq(q, tp)
    k = common.pad_seq(k, sp)
    v = common.pad_seq(v, sp)
    if spec.has_segments:
        q_seg = common.pad_seq(q_seg.astype(jnp.int32), tp, mode="edge")
        k_seg = common.pad_seq(k_seg.astype(jnp.int32), sp, mode="edge")
    return q, k, v, q_seg, k_seg


def _seg_specs(spec: MaskSpec, q_block, k_block):
    if not spec.has_segments:
        return [None, None]
    return [q_block, k_block]


def _forward(q, k, v, q_seg, k_seg, spec: MaskSpec, cfg: Config, interpret: bool):
    b, t, h, d = q.shape
    kh = k.shape[2]
    g = h // kh
    bq, bk = cfg.block_q, cfg.block_k
    vis = common.block_visibility(spec, bq, bk, q_seg, k_seg)
    vis = jnp.broadcast_to(vis, (b,) + vis.shape[1:])
    full = common.block_visibility(spec, bq, bk, q_seg, k_seg, full=True)
    ranges = common.split_ranges(vis, full, axis=2)
    qp, kp, vp, qsp, ksp = _prepare(q, k, v, q_seg, k_seg, spec, bq, bk)
    tp, sp = qp.shape[1], kp.shape[1]
    nq = tp // bq
    num_warps = cfg.num_warps or (4 if d <= 64 else 8)
    kernel = functools.partial(_fwd_kernel, spec=spec, block_q=bq, block_k=bk)
    range_spec = pl.BlockSpec((None, None), lambda i, bb, hh: (bb, i))
    in_specs = (
        [range_spec] * 4
        + [
            pl.BlockSpec((None, bq, None, d), lambda i, bb, hh: (bb, i, hh, 0)),
            pl.BlockSpec((None, sp, None, d), lambda i, bb, hh: (bb, 0, hh // g, 0)),
            pl.BlockSpec((None, sp, None, d), lambda i, bb, hh: (bb, 0, hh // g, 0)),
        ]
        + _seg_specs(
            spec,
            pl.BlockSpec((None, bq), lambda i, bb, hh: (bb, i)),
            pl.BlockSpec((None, sp), lambda i, bb, hh: (bb, 0)),
        )
    )
    o, lse = pl.pallas_call(
        kernel,
        grid=(nq, b, h),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, d), lambda i, bb, hh: (bb, i, hh, 0)),
            pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, h, d), q.dtype),
            jax.ShapeDtypeStruct((b, h, tp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="jaxturbo_flash_fwd",
    )(*ranges, qp, kp, vp, qsp, ksp)
    return o[:, :t], lse[:, :, :t]


def _backward(
    q, k, v, q_seg, k_seg, o, lse, do, dlse, spec: MaskSpec, cfg: Config, interpret: bool
):
    b, t, h, d = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    g = h // kh
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    # delta_i = sum_d o_id * do_id; a log-sum-exp cotangent enters as -dlse (d lse / d s = p).
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse
    vis = common.block_visibility(spec, bq, bk, q_seg, k_seg)
    vis = jnp.broadcast_to(vis, (b,) + vis.shape[1:])
    full = common.block_visibility(spec, bq, bk, q_seg, k_seg, full=True)
    kv_ranges = common.split_ranges(vis, full, axis=2)
    q_ranges = common.split_ranges(vis, full, axis=1)
    qp, kp, vp, qsp, ksp = _prepare(q, k, v, q_seg, k_seg, spec, bq, bk)
    tp, sp = qp.shape[1], kp.shape[1]
    dop = common.pad_seq(do, tp)
    lsep = common.pad_seq(lse, tp, axis=2)
    deltap = common.pad_seq(delta, tp, axis=2)
    nq, nk = tp // bq, sp // bk
    num_warps = cfg.num_warps_bwd or (4 if d <= 64 else 8)
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=cfg.num_stages_bwd)

    range_spec = pl.BlockSpec((None, None), lambda i, bb, hh: (bb, i))
    q_row = pl.BlockSpec((None, bq, None, d), lambda i, bb, hh: (bb, i, hh, 0))
    kv_full = pl.BlockSpec((None, sp, None, d), lambda i, bb, hh: (bb, 0, hh // g, 0))
    row_stat = pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec, block_q=bq, block_k=bk),
        grid=(nq, b, h),
        in_specs=[range_spec] * 4
        + [q_row, kv_full, kv_full]
        + _seg_specs(
            spec,
            pl.BlockSpec((None, bq), lambda i, bb, hh: (bb, i)),
            pl.BlockSpec((None, sp), lambda i, bb, hh: (bb, 0)),
        )
        + [q_row, row_stat, row_stat],
        out_specs=q_row,
        out_shape=jax.ShapeDtypeStruct((b, tp, h, d), q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="jaxturbo_flash_dq",
    )(*kv_ranges, qp, kp, vp, qsp, ksp, dop, lsep, deltap)

    q_full = pl.BlockSpec((None, tp, h, d), lambda j, bb, kk: (bb, 0, 0, 0))
    kv_blk = pl.BlockSpec((None, bk, None, d), lambda j, bb, kk: (bb, j, kk, 0))
    stat_full = pl.BlockSpec((None, h, tp), lambda j, bb, kk: (bb, 0, 0))
    krange = pl.BlockSpec((None, None), lambda j, bb, kk: (bb, j))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, spec=spec, block_q=bq, block_k=bk, groups=g),
        grid=(nk, b, kh),
        in_specs=[krange] * 4
        + [q_full, kv_blk, kv_blk]
        + _seg_specs(
            spec,
            pl.BlockSpec((None, tp), lambda j, bb, kk: (bb, 0)),
            pl.BlockSpec((None, bk), lambda j, bb, kk: (bb, j)),
        )
        + [q_full, stat_full, stat_full],
        out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct((b, sp, kh, d), k.dtype)] * 2,
        compiler_params=params,
        interpret=interpret,
        name="jaxturbo_flash_dkv",
    )(*q_ranges, qp, kp, vp, qsp, ksp, dop, lsep, deltap)
    return dq[:, :t], dk[:, :s_len], dv[:, :s_len]


_flash = common.flash_with_vjp(_forward, _backward)


def flash_attention(
    call: common.AttentionCall, *, config: Config | None = None, interpret: bool = False
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Flash attention of `call` (q [B, T, H, D], k/v [B, S, K, D]) -> out [B, T, H, D]
    (, lse [B, H, T]).  Same semantics as `attention_reference`; differentiable in q, k, v
    (and through lse)."""
    return common.run_forward(_flash, call, config or Config(), interpret)


def flash_attention_backward(
    call: common.AttentionCall,
    out: jax.Array,
    lse: jax.Array,
    dout: jax.Array,
    *,
    config: Config | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The kernels' backward from a saved out [B, T, H, D] and lse [B, H, T] (see
    `reference.attention_backward_reference`) -> (dq, dk, dv) in the inputs' dtype."""
    return common.run_backward(_backward, call, out, lse, dout, config or Config(), interpret)
