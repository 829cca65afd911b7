"""Flash attention backward for Hopper through Mosaic GPU: a dK/dV kernel and a dQ kernel.

Version 1, correctness first (experiments/attention/NOTES.md): checked on CPU in GPU interpret
mode and lowered for a CUDA target; **not yet compiled, run or timed on a GPU**, so it is only
used when asked for (`mosaic_gpu.Config(backward="mosaic_gpu")`).

Both kernels follow FlashAttention-2's split (no atomics): with delta = rowsum(dO * O) - dlse
(the lse cotangent enters here, as in the Pallas-Triton backward) and P recomputed from the
saved lse,

- dK/dV: a program owns 64 keys of one (batch, KV head) and loops over every query head of its
  GQA group and every query block that can see them (causal: from the diagonal on):
  S^T = K Q^T, P^T = exp(S^T - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta),
  dK += dS^T Q;
- dQ: a program owns 64 query rows of one (batch, head) and loops over the key blocks they can
  see: S = Q K^T, P = exp(S - lse), dP = dO V^T, dS = P (dP - delta), dQ += dS K.

Each streams its loop operands through a two-slot shared-memory ring filled by TMA (block j + 1
loads while block j is used).  The matmuls are wgmma with float32 accumulators; P^T and dS^T /
dS feed wgmma from registers (through shared memory in interpret mode).  Missing against FA3:
producer warpgroups, two consumers per program, pre-initialised accumulators and overlap of the
softmax with the matmuls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import common

_B = 64  # rows per program and per loop block: one wgmma M
_SLOTS = 2
_LOG2E = 1.4426950408889634


def _transforms(cols: int, dtype) -> tuple:
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(cols * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _interpret_params(interpret):
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return interpret
    return plgpu.InterpretGPUParams() if interpret else False


def _matmul(shape, a, b, compiled: bool, a_smem=None):
    """a @ b into a fresh float32 accumulator; `a` from registers on the GPU, through `a_smem`
    in interpret mode (its wgmma reads the A operand from a ref)."""
    if a_smem is not None and not compiled:
        a_smem[...] = a
        plgpu.commit_smem()
        a = a_smem

    def run(ref):
        plgpu.wgmma(ref, a, b)
        return ref[...]
    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _row_vector(ref, compiled: bool, axis: int):
    """A [64] float32 vector from shared memory, laid out to broadcast along `axis` of a wgmma
    accumulator (axis 1: one value per row; axis 0: one per column)."""
    if compiled:
        return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(axis))
    return ref[...]


def _dkdv(q, k, v, do, lse2, delta, spec: common.MaskSpec, interpret):
    """q/do [B, Tp, H, D], k/v [B, Sp, K, D], lse2/delta [B, H, Tp] (lse in log2 units, padded
    rows +inf) -> dk, dv [B, Sp, K, D]."""
    b, tp, h, d = q.shape
    sp, kh = k.shape[1], k.shape[2]
    group = h // kh
    nq, nk = tp // _B, sp // _B
    dtype = q.dtype
    compiled = not interpret
    c = spec.scale * _LOG2E
    tr = _transforms(d, dtype)

    def kernel(q_g, k_g, v_g, do_g, lse_g, dl_g, dk_g, dv_g, k_s, v_s, q_s, do_s, lse_s, dl_s,
               kv_bar, bars, *a_smem):
        bk, ki = lax.axis_index("bk"), lax.axis_index("k")
        bi, hk = bk // kh, bk % kh
        k0 = ki * _B
        plgpu.copy_gmem_to_smem(k_g.at[bi, pl.ds(k0, _B), hk], k_s, kv_bar.at[0])
        plgpu.copy_gmem_to_smem(v_g.at[bi, pl.ds(k0, _B), hk], v_s, kv_bar.at[1])
        # query blocks that see any of these keys: causal, from the one holding position k0
        j0 = 0
        if spec.causal:
            j0 = jnp.clip((k0 - spec.offset) // _B, 0, nq)
        per_head = nq - j0
        steps = group * per_head

        def fetch(step, slot):  # one barrier per buffer and slot (bars[buffer * 2 + slot])
            hq = hk * group + step // per_head
            j = j0 + step % per_head
            rows = (bi, pl.ds(j * _B, _B), hq)
            for n, (src, dst) in enumerate([(q_g.at[rows], q_s), (do_g.at[rows], do_s),
                                            (lse_g.at[bi, hq, pl.ds(j * _B, _B)], lse_s),
                                            (dl_g.at[bi, hq, pl.ds(j * _B, _B)], dl_s)]):
                plgpu.copy_gmem_to_smem(src, dst.at[slot], bars.at[n * _SLOTS + slot])

        pl.when(steps > 0)(functools.partial(fetch, 0, 0))
        plgpu.barrier_wait(kv_bar.at[0])
        plgpu.barrier_wait(kv_bar.at[1])
        keys = lax.broadcasted_iota(jnp.int32, (_B, _B), 0) + k0
        cols0 = lax.broadcasted_iota(jnp.int32, (_B, _B), 1) + spec.offset

        def step(i, carry):
            dk, dv = carry
            slot = lax.rem(i, _SLOTS)
            # the other slot was read in step i - 1, whose wgmmas were all waited for
            pl.when(i + 1 < steps)(lambda: fetch(i + 1, 1 - slot))
            for n in range(4):
                plgpu.barrier_wait(bars.at[n * _SLOTS + slot])
            j = j0 + i % per_head
            st = _matmul((_B, _B), k_s, q_s.at[slot].T, compiled)
            lse = _row_vector(lse_s.at[slot], compiled, 0)
            pt = jnp.exp2(st * c - lax.broadcast_in_dim(lse, (_B, _B), [1]))
            if spec.causal:
                pt = jnp.where(keys <= cols0 + j * _B, pt, 0.0)
            pt16 = pt.astype(dtype)
            dv = dv + _matmul((_B, d), pt16, do_s.at[slot], compiled,
                              a_smem[0] if a_smem else None)
            dpt = _matmul((_B, _B), v_s, do_s.at[slot].T, compiled)
            dl = _row_vector(dl_s.at[slot], compiled, 0)
            dst = (pt * (dpt - lax.broadcast_in_dim(dl, (_B, _B), [1]))).astype(dtype)
            dk = dk + _matmul((_B, d), dst, q_s.at[slot], compiled,
                              a_smem[0] if a_smem else None)
            return dk, dv

        zero = jnp.zeros((_B, d), jnp.float32)
        if compiled:
            zero = plgpu.layout_cast(zero, plgpu.Layout.WGMMA)
        dk, dv = lax.fori_loop(0, steps, step, (zero, zero))
        k_s[...] = (dk * spec.scale).astype(dtype)  # K and V are no longer read
        v_s[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_s, dk_g.at[bi, pl.ds(k0, _B), hk])
        plgpu.copy_smem_to_gmem(v_s, dv_g.at[bi, pl.ds(k0, _B), hk])
        plgpu.wait_smem_to_gmem(0)

    kv = jax.ShapeDtypeStruct((b, sp, kh, d), dtype)
    return plgpu.kernel(
        kernel,
        out_type=(kv, kv),
        scratch_types=[
            plgpu.SMEM((_B, d), dtype, transforms=tr),
            plgpu.SMEM((_B, d), dtype, transforms=tr),
            plgpu.SMEM((_SLOTS, _B, d), dtype, transforms=tr),
            plgpu.SMEM((_SLOTS, _B, d), dtype, transforms=tr),
            plgpu.SMEM((_SLOTS, _B), jnp.float32),
            plgpu.SMEM((_SLOTS, _B), jnp.float32),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=4 * _SLOTS),
            *([plgpu.SMEM((_B, _B), dtype, transforms=_transforms(_B, dtype))]
              if interpret else []),
        ],
        grid=(b * kh, nk),
        grid_names=("bk", "k"),
        compiler_params=plgpu.CompilerParams(approx_math=True) if compiled else None,
        interpret=_interpret_params(interpret),
    )(q, k, v, do, lse2, delta)


def _dq(q, k, v, do, lse2, delta, spec: common.MaskSpec, s_len: int, interpret):
    """Same inputs as `_dkdv` -> dq [B, Tp, H, D]."""
    b, tp, h, d = q.shape
    sp, kh = k.shape[1], k.shape[2]
    group = h // kh
    nq, nk = tp // _B, sp // _B
    dtype = q.dtype
    compiled = not interpret
    c = spec.scale * _LOG2E
    tr = _transforms(d, dtype)

    def kernel(q_g, k_g, v_g, do_g, lse_g, dl_g, dq_g, q_s, do_s, lse_s, dl_s, k_s, v_s,
               q_bar, bars, *a_smem):
        bh, qi = lax.axis_index("bh"), lax.axis_index("q")
        bi, hi = bh // h, bh % h
        hk = hi // group
        r0 = qi * _B
        rows_ref = (bi, pl.ds(r0, _B), hi)
        for n, (src, dst) in enumerate([(q_g.at[rows_ref], q_s), (do_g.at[rows_ref], do_s),
                                        (lse_g.at[bi, hi, pl.ds(r0, _B)], lse_s),
                                        (dl_g.at[bi, hi, pl.ds(r0, _B)], dl_s)]):
            plgpu.copy_gmem_to_smem(src, dst, q_bar.at[n])
        n_blocks = nk
        if spec.causal:
            last = jnp.minimum(r0 + _B - 1 + spec.offset, s_len - 1)
            n_blocks = jnp.clip(last // _B + 1, 0, nk)

        def fetch(j, slot):  # bars[slot] for K, bars[2 + slot] for V
            keys = (bi, pl.ds(j * _B, _B), hk)
            plgpu.copy_gmem_to_smem(k_g.at[keys], k_s.at[slot], bars.at[slot])
            plgpu.copy_gmem_to_smem(v_g.at[keys], v_s.at[slot], bars.at[_SLOTS + slot])

        pl.when(n_blocks > 0)(functools.partial(fetch, 0, 0))
        for n in range(4):
            plgpu.barrier_wait(q_bar.at[n])
        lse = _row_vector(lse_s, compiled, 1)
        dl = _row_vector(dl_s, compiled, 1)
        rows = lax.broadcasted_iota(jnp.int32, (_B, _B), 0) + r0 + spec.offset
        cols0 = lax.broadcasted_iota(jnp.int32, (_B, _B), 1)

        def step(j, dq):
            slot = lax.rem(j, _SLOTS)
            pl.when(j + 1 < n_blocks)(lambda: fetch(j + 1, 1 - slot))
            plgpu.barrier_wait(bars.at[slot])
            plgpu.barrier_wait(bars.at[_SLOTS + slot])
            s = _matmul((_B, _B), q_s, k_s.at[slot].T, compiled)
            p = jnp.exp2(s * c - lax.broadcast_in_dim(lse, (_B, _B), [0]))
            cols = cols0 + j * _B
            ok = cols < s_len
            if spec.causal:
                ok = ok & (cols <= rows)
            p = jnp.where(ok, p, 0.0)
            dp = _matmul((_B, _B), do_s, v_s.at[slot].T, compiled)
            ds = (p * (dp - lax.broadcast_in_dim(dl, (_B, _B), [0]))).astype(dtype)
            return dq + _matmul((_B, d), ds, k_s.at[slot], compiled,
                                a_smem[0] if a_smem else None)

        zero = jnp.zeros((_B, d), jnp.float32)
        if compiled:
            zero = plgpu.layout_cast(zero, plgpu.Layout.WGMMA)
        dq = lax.fori_loop(0, n_blocks, step, zero)
        q_s[...] = (dq * spec.scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_s, dq_g.at[rows_ref])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((b, tp, h, d), dtype),
        scratch_types=[
            plgpu.SMEM((_B, d), dtype, transforms=tr),
            plgpu.SMEM((_B, d), dtype, transforms=tr),
            plgpu.SMEM((_B,), jnp.float32),
            plgpu.SMEM((_B,), jnp.float32),
            plgpu.SMEM((_SLOTS, _B, d), dtype, transforms=tr),
            plgpu.SMEM((_SLOTS, _B, d), dtype, transforms=tr),
            plgpu.Barrier(num_barriers=4),
            plgpu.Barrier(num_barriers=2 * _SLOTS),
            *([plgpu.SMEM((_B, _B), dtype, transforms=_transforms(_B, dtype))]
              if interpret else []),
        ],
        grid=(b * h, nq),
        grid_names=("bh", "q"),
        compiler_params=plgpu.CompilerParams(approx_math=True) if compiled else None,
        interpret=_interpret_params(interpret),
    )(q, k, v, do, lse2, delta)


def backward(q, k, v, out, lse, d_out, d_lse, spec: common.MaskSpec, interpret):
    """q/out/d_out [B, T, H, D], k/v [B, S, K, D], lse/d_lse [B, H, T] -> (dq, dk, dv)."""
    t, s = q.shape[1], k.shape[1]
    tp, sp = common.round_up(t, _B), common.round_up(s, _B)
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))
    if d_lse is not None:
        delta = delta - d_lse
    # padded query rows, and rows that see no key (lse = -inf), get lse = +inf: their P (and
    # every gradient they feed) is zero
    lse2 = jnp.where(jnp.isfinite(lse), lse * _LOG2E, jnp.inf)
    lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, tp - t)), constant_values=jnp.inf)
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, tp - t)))
    q_p, do_p = common.pad_seq(q, tp), common.pad_seq(d_out.astype(q.dtype), tp)
    k_p, v_p = common.pad_seq(k, sp), common.pad_seq(v, sp)
    dk, dv = _dkdv(q_p, k_p, v_p, do_p, lse2, delta, spec, interpret)
    dq = _dq(q_p, k_p, v_p, do_p, lse2, delta, spec, s, interpret)
    return dq[:, :t], dk[:, :s], dv[:, :s]
