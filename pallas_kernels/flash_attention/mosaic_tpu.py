"""Flash attention for TPU through Mosaic TPU (`jax.experimental.pallas.tpu`).

TPU-shaped FlashAttention-2: heads move in front of the sequence ([B, H, T, D]) so each block is
a (rows, head_dim) tile; the key-block loop is the last grid axis ("arbitrary"), with the
running max / sum / accumulator in VMEM scratch.  The visible key-block range of each query
block is scalar-prefetched into SMEM: out-of-range steps skip the compute and their index map
repeats the previous block index, so no DMA is issued for them.  Tested on CPU in TPU interpret
mode (`pltpu.InterpretParams`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import common
from pallas_kernels.flash_attention.common import MaskSpec


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes (rows); TPU wants multiples of 8 (128 for best MXU use)."""

    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int = 128
    block_k_bwd: int = 128


def _dot(a, b, ca: int, cb: int):
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a, b, (((ca,), (cb,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
    )


def _mask(spec: MaskSpec, i, j, bq: int, bk: int, qseg_ref, kseg_ref):
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    q_seg = qseg_ref[...] if spec.has_segments else None  # [bq, 1]
    k_seg = kseg_ref[...] if spec.has_segments else None  # [1, bk]
    return common.visible(spec, q_pos, k_pos, q_seg, k_seg)


def _logits(spec: MaskSpec, q, k):
    s = _dot(q, k, 1, 1) * spec.scale
    if spec.softcap is None:
        return s, None
    t = jnp.tanh(s / spec.softcap)
    return spec.softcap * t, t


def _fwd_kernel(lo_ref, hi_ref, *refs, spec: MaskSpec, bq: int, bk: int, nq: int, nk: int):
    if spec.has_segments:
        q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
        qseg_ref = kseg_ref = None
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, common.NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((j >= lo_ref[b * nq + i]) & (j < hi_ref[b * nq + i]))
    def _():
        s, _ = _logits(spec, q_ref[...], k_ref[...])
        s = jnp.where(_mask(spec, i, j, bq, bk, qseg_ref, kseg_ref), s, common.NEG_INF)
        m = m_sc[...]
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == common.NEG_INF, 0.0, m_new)  # no NaN on empty rows
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v.dtype), v, 1, 0)
        m_sc[...] = m_new

    @pl.when(j == nk - 1)
    def _():
        l = l_sc[...]
        empty = l == 0.0
        o_ref[...] = (acc_sc[...] / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(
            empty, common.NEG_INF, m_sc[...] + jnp.log(jnp.where(empty, 1.0, l))
        )


def _dq_kernel(lo_ref, hi_ref, *refs, spec: MaskSpec, bq: int, bk: int, nq: int, nk: int):
    if spec.has_segments:
        (q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc = refs
        qseg_ref = kseg_ref = None
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when((j >= lo_ref[b * nq + i]) & (j < hi_ref[b * nq + i]))
    def _():
        k = k_ref[...]
        s, t = _logits(spec, q_ref[...], k)
        lse = lse_ref[...]
        lse = jnp.where(lse == common.NEG_INF, 0.0, lse)
        p = jnp.where(_mask(spec, i, j, bq, bk, qseg_ref, kseg_ref), jnp.exp(s - lse), 0.0)
        ds = p * (_dot(do_ref[...], v_ref[...], 1, 1) - delta_ref[...])
        if t is not None:
            ds = ds * (1.0 - t * t)
        dq_sc[...] += _dot(ds.astype(k.dtype), k, 1, 0)

    @pl.when(j == nk - 1)
    def _():
        dq_ref[...] = (dq_sc[...] * spec.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    lo_ref, hi_ref, *refs, spec: MaskSpec, bq: int, bk: int, nq: int, nk: int, groups: int
):
    if spec.has_segments:
        (
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
            dk_sc,
            dv_sc,
        ) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
        qseg_ref = kseg_ref = None
    b, j, r = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    i = r % nq  # the reduction axis runs over (query head in the GQA group, query block)

    @pl.when(r == 0)
    def _():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when((i >= lo_ref[b * nk + j]) & (i < hi_ref[b * nk + j]))
    def _():
        q, do = q_ref[...], do_ref[...]
        s, t = _logits(spec, q, k_ref[...])
        lse = lse_ref[...]
        lse = jnp.where(lse == common.NEG_INF, 0.0, lse)
        p = jnp.where(_mask(spec, i, j, bq, bk, qseg_ref, kseg_ref), jnp.exp(s - lse), 0.0)
        dv_sc[...] += _dot(p.astype(do.dtype), do, 0, 0)
        ds = p * (_dot(do, v_ref[...], 1, 1) - delta_ref[...])
        if t is not None:
            ds = ds * (1.0 - t * t)
        dk_sc[...] += _dot(ds.astype(q.dtype), q, 0, 0)

    @pl.when(r == groups * nq - 1)
    def _():
        dk_ref[...] = (dk_sc[...] * spec.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _clamp(idx, lo, hi, n):
    """Block index for a possibly skipped step: stay inside [lo, hi) so no new DMA is issued."""
    return jnp.clip(jnp.clip(idx, lo, hi - 1), 0, n - 1)


def _params():
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    )


def _layout(q, k, v, q_seg, k_seg, spec: MaskSpec, bq: int, bk: int):
    """[B, T, H, D] -> padded [B, H, T, D]; segment ids as a column [B, T, 1] and row [B, 1, S]."""
    tp = common.round_up(spec.q_len, bq)
    sp = common.round_up(spec.kv_len, bk)
    qt = common.pad_seq(q, tp).transpose(0, 2, 1, 3)
    kt = common.pad_seq(k, sp).transpose(0, 2, 1, 3)
    vt = common.pad_seq(v, sp).transpose(0, 2, 1, 3)
    segs = []
    if spec.has_segments:
        segs = [
            common.pad_seq(q_seg.astype(jnp.int32), tp, mode="edge")[:, :, None],
            common.pad_seq(k_seg.astype(jnp.int32), sp, mode="edge")[:, None, :],
        ]
    return qt, kt, vt, segs


def _query_grid_specs(spec: MaskSpec, g: int, bq: int, bk: int, d: int, nq: int, nk: int):
    """BlockSpecs of a (batch, head, query block, key block) grid that reduces over the visible
    key blocks of each query block (forward and dQ): q/o rows, per-row scalars, and the inputs
    q, k, v (+ segment ids).  Key blocks outside [lo, hi] repeat the nearest visible one, so no
    new DMA is issued for them."""

    def kv_map(bb, hh, i, j, lo, hi):
        return bb, hh // g, _clamp(j, lo[bb * nq + i], hi[bb * nq + i], nk), 0

    def kseg_map(bb, hh, i, j, lo, hi):
        return bb, 0, _clamp(j, lo[bb * nq + i], hi[bb * nq + i], nk)

    q_spec = pl.BlockSpec((None, None, bq, d), lambda bb, hh, i, j, lo, hi: (bb, hh, i, 0))
    row_spec = pl.BlockSpec((None, None, bq, 1), lambda bb, hh, i, j, lo, hi: (bb, hh, i, 0))
    in_specs = [
        q_spec,
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
    ]
    if spec.has_segments:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda bb, hh, i, j, lo, hi: (bb, i, 0)),
            pl.BlockSpec((None, 1, bk), kseg_map),
        ]
    return q_spec, row_spec, in_specs


def _forward(q, k, v, q_seg, k_seg, spec: MaskSpec, cfg: Config, interpret):
    b, t, h, d = q.shape
    kh = k.shape[2]
    g = h // kh
    bq, bk = cfg.block_q, cfg.block_k
    vis = common.block_visibility(spec, bq, bk, q_seg, k_seg)
    lo, hi = common.block_ranges(jnp.broadcast_to(vis, (b,) + vis.shape[1:]), axis=2)
    qt, kt, vt, segs = _layout(q, k, v, q_seg, k_seg, spec, bq, bk)
    tp, sp = qt.shape[2], kt.shape[2]
    nq, nk = tp // bq, sp // bk

    q_spec, row_spec, in_specs = _query_grid_specs(spec, g, bq, bk, d, nq, nk)
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, spec=spec, bq=bq, bk=bk, nq=nq, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, h, nq, nk),
            in_specs=in_specs,
            out_specs=[q_spec, row_spec],
            scratch_shapes=[
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, d), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((b, h, tp, d), q.dtype),
            jax.ShapeDtypeStruct((b, h, tp, 1), jnp.float32),
        ],
        compiler_params=_params(),
        interpret=interpret,
        name="jaxturbo_flash_fwd_tpu",
    )(lo.reshape(-1), hi.reshape(-1), qt, kt, vt, *segs)
    return o.transpose(0, 2, 1, 3)[:, :t], lse[:, :, :t, 0]


def _backward(q, k, v, q_seg, k_seg, o, lse, do, dlse, spec: MaskSpec, cfg: Config, interpret):
    b, t, h, d = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    g = h // kh
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse  # d lse / d logits = p, so a lse cotangent shifts delta
    vis = common.block_visibility(spec, bq, bk, q_seg, k_seg)
    vis = jnp.broadcast_to(vis, (b,) + vis.shape[1:])
    kv_lo, kv_hi = common.block_ranges(vis, axis=2)
    q_lo, q_hi = common.block_ranges(vis, axis=1)
    qt, kt, vt, segs = _layout(q, k, v, q_seg, k_seg, spec, bq, bk)
    tp, sp = qt.shape[2], kt.shape[2]
    nq, nk = tp // bq, sp // bk
    dot_ = common.pad_seq(do, tp).transpose(0, 2, 1, 3)
    lset = common.pad_seq(lse, tp, axis=2)[..., None]
    deltat = common.pad_seq(delta, tp, axis=2)[..., None]

    # dQ: grid over query blocks, reduction over key blocks.
    q_spec, row_spec, in_specs = _query_grid_specs(spec, g, bq, bk, d, nq, nk)
    in_specs += [q_spec, row_spec, row_spec]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec, bq=bq, bk=bk, nq=nq, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, h, nq, nk),
            in_specs=in_specs,
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((b, h, tp, d), q.dtype),
        compiler_params=_params(),
        interpret=interpret,
        name="jaxturbo_flash_dq_tpu",
    )(kv_lo.reshape(-1), kv_hi.reshape(-1), qt, kt, vt, *segs, dot_, lset, deltat)

    # dK/dV: grid over key blocks of each KV head, reduction over (group head, query block).
    def qh(bb, kk, j, r, lo, hi):
        i = _clamp(r % nq, lo[bb * nk + j], hi[bb * nk + j], nq)
        return kk * g + r // nq, i

    def q_map(bb, kk, j, r, lo, hi):
        hh, i = qh(bb, kk, j, r, lo, hi)
        return bb, hh, i, 0

    def qseg_map(bb, kk, j, r, lo, hi):
        return bb, qh(bb, kk, j, r, lo, hi)[1], 0

    kv_spec = pl.BlockSpec((None, None, bk, d), lambda bb, kk, j, r, lo, hi: (bb, kk, j, 0))
    in_specs = [pl.BlockSpec((None, None, bq, d), q_map), kv_spec, kv_spec]
    if spec.has_segments:
        in_specs += [
            pl.BlockSpec((None, bq, 1), qseg_map),
            pl.BlockSpec((None, 1, bk), lambda bb, kk, j, r, lo, hi: (bb, 0, j)),
        ]
    in_specs += [
        pl.BlockSpec((None, None, bq, d), q_map),
        pl.BlockSpec((None, None, bq, 1), q_map),
        pl.BlockSpec((None, None, bq, 1), q_map),
    ]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, spec=spec, bq=bq, bk=bk, nq=nq, nk=nk, groups=g),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kh, nk, g * nq),
            in_specs=in_specs,
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct((b, kh, sp, d), k.dtype)] * 2,
        compiler_params=_params(),
        interpret=interpret,
        name="jaxturbo_flash_dkv_tpu",
    )(q_lo.reshape(-1), q_hi.reshape(-1), qt, kt, vt, *segs, dot_, lset, deltat)
    back = lambda x, n: x.transpose(0, 2, 1, 3)[:, :n]
    return back(dq, t), back(dk, s_len), back(dv, s_len)


_flash = common.flash_with_vjp(_forward, _backward)


def _interpret(interpret):
    return pltpu.InterpretParams() if interpret is True else interpret


def flash_attention(
    call: common.AttentionCall,
    *,
    config: Config | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Flash attention on TPU of `call` (q [B, T, H, D], k/v [B, S, K, D]) -> [B, T, H, D]
    (, lse [B, H, T]).  Same semantics as `attention_reference`.  `interpret=True` runs TPU
    interpret mode on CPU."""
    return common.run_forward(_flash, call, config or Config(), _interpret(interpret))


def flash_attention_backward(
    call: common.AttentionCall,
    out: jax.Array,
    lse: jax.Array,
    dout: jax.Array,
    *,
    config: Config | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The kernels' backward from a saved out [B, T, H, D] and lse [B, H, T] (see
    `reference.attention_backward_reference`) -> (dq, dk, dv) in the inputs' dtype."""
    return common.run_backward(
        _backward, call, out, lse, dout, config or Config(), _interpret(interpret)
    )
