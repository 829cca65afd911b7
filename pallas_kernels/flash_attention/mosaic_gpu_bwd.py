"""Flash attention backward for Hopper through Mosaic GPU: a dK/dV kernel and a dQ kernel.

Checked on CPU in GPU interpret mode (with its race detector) and lowered for a CUDA target;
**not yet compiled, run or timed on a GPU**, so it is used only when asked for
(`mosaic_gpu.Config(backward="mosaic_gpu")`; experiments/attention/NOTES.md).

Both kernels follow FlashAttention-2's split (no atomics): with delta = rowsum(dO * O) - dlse
(the lse cotangent enters here, as in the Pallas-Triton backward) and P recomputed from the
saved lse, in log2 units,

- dK/dV: a program owns 128 keys of one (batch, KV head) and loops over every query head of its
  GQA group and every 64-row query block that can see them (causal: from the diagonal on):
  S^T = K Q^T, P^T = exp2(S^T - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta),
  dK += dS^T Q;
- dQ: a program owns 128 query rows of one (batch, head) and loops over the 64-key blocks they
  can see: S = Q K^T and dP = dO V^T (issued together), P = exp2(S - lse),
  dS = P (dP - delta), dQ += dS K.

The skeleton is the forward's (`mosaic_gpu.py`, measured there): three warpgroups per program,
a producer that only issues TMA copies into a shared-memory ring and two consumers with 64
rows each that share every block it loads; accumulators that run across the loop are
pre-initialised (`plgpu.ACC.init`), so each step adds in the tensor cores; P^T and dS feed
wgmma from registers; barrier waits stay outside accumulator scopes.  In GPU interpret mode
(which runs no wgmma inside `pl.run_state` and reads A operands from refs) the same schedule
adds in registers and stages those operands in shared memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import common
from pallas_kernels.flash_attention import mosaic_gpu

_B = 64  # rows per consumer warpgroup and per streamed block: one wgmma M
_CONSUMERS = 2
_TILE = _B * _CONSUMERS  # rows (dQ) or keys (dK/dV) per program
_SLOTS = 2
_LOG2E = mosaic_gpu._LOG2E
_transforms = mosaic_gpu._smem_transforms
_interpret_params = mosaic_gpu._interpret_params


class _Ops:
    """The matmul forms both kernels use, compiled or in GPU interpret mode."""

    def __init__(self, compiled: bool, a_ref):
        self.compiled, self.a_ref = compiled, a_ref

    def operand(self, a):
        """A register operand for wgmma (staged in shared memory in interpret mode)."""
        if self.compiled:
            return a
        self.a_ref[...] = a
        plgpu.commit_smem()
        return self.a_ref

    def add(self, acc, a, b):
        """acc + a @ b: in the tensor cores into the pre-initialised accumulator."""
        if self.compiled:
            return pl.run_state(lambda ref: plgpu.wgmma(ref, a, b))(plgpu.ACC.init(acc))
        a = self.operand(a)

        def run(ref):
            plgpu.wgmma(ref, a, b)
            return ref[...]
        return acc + pl.run_scoped(run, plgpu.ACC(acc.shape, jnp.float32))

    @staticmethod
    def two(shape, a0, b0, a1, b1):
        """a0 @ b0 and a1 @ b1 (shared-memory operands), issued together, one wait."""
        def run(r0, r1):
            plgpu.wgmma(r0, a0, b0)
            plgpu.wgmma(r1, a1, b1)
            return r0[...], r1[...]
        return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))

    @staticmethod
    def vector(ref, compiled: bool, axis: int):
        """A [64] float32 vector from shared memory, laid out to broadcast along `axis` of a
        wgmma accumulator (1: one value per row; 0: one per column)."""
        if compiled:
            return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(axis))
        return ref[...]

    def zeros(self, shape):
        z = jnp.zeros(shape, jnp.float32)
        return plgpu.layout_cast(z, plgpu.Layout.WGMMA) if self.compiled else z


def _producer(n_steps, copies, ready, free, compiled: bool):
    """The producer warpgroup: step i's copies (`copies(i)` -> [(src, dst ring ref)]) into slot
    i % _SLOTS, refilled once both consumers released it (`free`); `ready[n * _SLOTS + slot]`
    is buffer n's barrier."""
    if compiled:
        plgpu.set_max_registers(40, action="decrease")

    def fill(i):
        slot = lax.rem(i, _SLOTS)
        for n, (src, dst) in enumerate(copies(i)):
            plgpu.copy_gmem_to_smem(src, dst.at[slot], ready.at[n * _SLOTS + slot])

    for i in range(_SLOTS):
        pl.when(i < n_steps)(functools.partial(fill, i))

    def refill(i, _):
        plgpu.barrier_wait(free.at[lax.rem(i, _SLOTS)])  # released in step i - _SLOTS
        fill(i)

    lax.fori_loop(_SLOTS, n_steps, refill, None)
    for back in range(1, _SLOTS + 1):  # observe the last releases (barrier phases balance)
        pl.when(n_steps >= back)(lambda: plgpu.barrier_wait(free.at[lax.rem(n_steps - back,
                                                                              _SLOTS)]))


def _wait_ready(ready, slot, n_buffers: int):
    for n in range(n_buffers):
        plgpu.barrier_wait(ready.at[n * _SLOTS + slot])


def _launch(interpret) -> dict:
    """`plgpu.kernel` arguments both kernels share: producer + consumers, fast math."""
    return dict(num_threads=_CONSUMERS + 1, thread_name="wg",
                compiler_params=None if interpret else plgpu.CompilerParams(approx_math=True),
                interpret=_interpret_params(interpret))


def _smem(shape, dtype, d):
    return plgpu.SMEM(shape, dtype, transforms=_transforms(d, dtype))


def _dkdv(q, k, v, do, lse2, delta, spec: common.MaskSpec, interpret):
    """q/do [B, Tp, H, D], k/v [B, Sp, K, D] (Tp a multiple of 64, Sp of 128), lse2/delta
    [B, H, Tp] (lse in log2 units, +inf for rows without keys) -> dk, dv [B, Sp, K, D]."""
    b, tp, h, d = q.shape
    sp, kh = k.shape[1], k.shape[2]
    group = h // kh
    nq = tp // _B
    dtype = q.dtype
    compiled = not interpret
    c = spec.scale * _LOG2E

    def kernel(q_g, k_g, v_g, do_g, lse_g, dl_g, dk_g, dv_g, k_s, v_s, q_s, do_s, lse_s, dl_s,
               kv_bar, ready, free, *a_smem):
        bk, kt, wg = lax.axis_index("bk"), lax.axis_index("k"), lax.axis_index("wg")
        bi, hk = bk // kh, bk % kh
        # query blocks that see any of the program's keys: causal, from the one holding the
        # first key's position on (both consumers walk the same blocks: they share the ring)
        j0 = 0
        if spec.causal:
            j0 = jnp.clip((kt * _TILE - spec.offset) // _B, 0, nq - 1)
        per_head = nq - j0
        n_steps = group * per_head

        def copies(i):
            hq = hk * group + i // per_head
            j = j0 + i % per_head
            rows = (bi, pl.ds(j * _B, _B), hq)
            vec = (bi, hq, pl.ds(j * _B, _B))
            return [(q_g.at[rows], q_s), (do_g.at[rows], do_s), (lse_g.at[vec], lse_s),
                    (dl_g.at[vec], dl_s)]

        @pl.when(wg == _CONSUMERS)
        def _():
            _producer(n_steps, copies, ready, free, compiled)

        @pl.when(wg < _CONSUMERS)
        def _():
            if compiled:
                plgpu.set_max_registers(232, action="increase")
            ops = _Ops(compiled, a_smem[0].at[wg] if a_smem else None)
            k0 = kt * _TILE + wg * _B  # this consumer's keys
            k_w, v_w = k_s.at[wg], v_s.at[wg]
            plgpu.copy_gmem_to_smem(k_g.at[bi, pl.ds(k0, _B), hk], k_w, kv_bar.at[2 * wg])
            plgpu.copy_gmem_to_smem(v_g.at[bi, pl.ds(k0, _B), hk], v_w, kv_bar.at[2 * wg + 1])
            plgpu.barrier_wait(kv_bar.at[2 * wg])
            plgpu.barrier_wait(kv_bar.at[2 * wg + 1])
            keys = lax.broadcasted_iota(jnp.int32, (_B, _B), 0) + k0
            cols0 = lax.broadcasted_iota(jnp.int32, (_B, _B), 1) + spec.offset

            def step(i, carry):
                dk, dv = carry
                slot = lax.rem(i, _SLOTS)
                _wait_ready(ready, slot, 4)
                q_i, do_i = q_s.at[slot], do_s.at[slot]

                def scores(ref):
                    plgpu.wgmma(ref, k_w, q_i.T)
                    return ref[...]

                st = pl.run_scoped(scores, plgpu.ACC((_B, _B), jnp.float32))
                lse = _Ops.vector(lse_s.at[slot], compiled, 0)
                pt = jnp.exp2(st * c - lax.broadcast_in_dim(lse, (_B, _B), [1]))
                if spec.causal:
                    j = j0 + i % per_head
                    pt = jnp.where(keys <= cols0 + j * _B, pt, 0.0)
                pt16 = pt.astype(dtype)
                if compiled:  # dV += P^T dO and dP^T = V dO^T issued together, one wait
                    def both(refs):
                        plgpu.wgmma(refs[0], pt16, do_i)
                        plgpu.wgmma(refs[1], v_w, do_i.T)
                    dv, dpt = pl.run_state(both)((plgpu.ACC.init(dv),
                                                  plgpu.ACC.init(ops.zeros((_B, _B)))))
                else:
                    dv = ops.add(dv, pt16, do_i)

                    def dp(ref):
                        plgpu.wgmma(ref, v_w, do_i.T)
                        return ref[...]
                    dpt = pl.run_scoped(dp, plgpu.ACC((_B, _B), jnp.float32))
                dl = _Ops.vector(dl_s.at[slot], compiled, 0)
                dst = (pt * (dpt - lax.broadcast_in_dim(dl, (_B, _B), [1]))).astype(dtype)
                dk = ops.add(dk, dst, q_i)
                plgpu.barrier_arrive(free.at[slot])
                return dk, dv

            zero = ops.zeros((_B, d))
            dk, dv = lax.fori_loop(0, n_steps, step, (zero, zero))
            k_w[...] = (dk * spec.scale).astype(dtype)  # this consumer's K/V are not read now
            v_w[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_w, dk_g.at[bi, pl.ds(k0, _B), hk])
            plgpu.copy_smem_to_gmem(v_w, dv_g.at[bi, pl.ds(k0, _B), hk])
            plgpu.wait_smem_to_gmem(0)

    kv = jax.ShapeDtypeStruct((b, sp, kh, d), dtype)
    return plgpu.kernel(
        kernel,
        out_type=(kv, kv),
        scratch_types=[
            _smem((_CONSUMERS, _B, d), dtype, d),
            _smem((_CONSUMERS, _B, d), dtype, d),
            _smem((_SLOTS, _B, d), dtype, d),
            _smem((_SLOTS, _B, d), dtype, d),
            plgpu.SMEM((_SLOTS, _B), jnp.float32),
            plgpu.SMEM((_SLOTS, _B), jnp.float32),
            plgpu.Barrier(num_barriers=2 * _CONSUMERS),
            plgpu.Barrier(num_barriers=4 * _SLOTS),
            plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=_SLOTS),
            *([_smem((_CONSUMERS, _B, _B), dtype, _B)] if interpret else []),
        ],
        grid=(b * kh, sp // _TILE),
        grid_names=("bk", "k"),
        **_launch(interpret),
    )(q, k, v, do, lse2, delta)


def _dq(q, k, v, do, lse2, delta, spec: common.MaskSpec, s_len: int, interpret):
    """q/do [B, Tp, H, D] (Tp a multiple of 128), k/v [B, Sp, K, D] (Sp a multiple of 64),
    lse2/delta as for `_dkdv` -> dq [B, Tp, H, D]."""
    b, tp, h, d = q.shape
    sp, kh = k.shape[1], k.shape[2]
    group = h // kh
    nk = sp // _B
    dtype = q.dtype
    compiled = not interpret
    c = spec.scale * _LOG2E

    def kernel(q_g, k_g, v_g, do_g, lse_g, dl_g, dq_g, q_s, do_s, lse_s, dl_s, k_s, v_s,
               q_bar, ready, free, *a_smem):
        bh, qt, wg = lax.axis_index("bh"), lax.axis_index("q"), lax.axis_index("wg")
        bi, hi = bh // h, bh % h
        hk = hi // group
        n_blocks = nk
        if spec.causal:  # key blocks up to the program's last row (at least one)
            last = jnp.minimum(qt * _TILE + _TILE - 1 + spec.offset, s_len - 1)
            n_blocks = jnp.clip(last // _B + 1, 1, nk)

        def copies(j):
            keys = (bi, pl.ds(j * _B, _B), hk)
            return [(k_g.at[keys], k_s), (v_g.at[keys], v_s)]

        @pl.when(wg == _CONSUMERS)
        def _():
            _producer(n_blocks, copies, ready, free, compiled)

        @pl.when(wg < _CONSUMERS)
        def _():
            if compiled:
                plgpu.set_max_registers(232, action="increase")
            ops = _Ops(compiled, a_smem[0].at[wg] if a_smem else None)
            r0 = qt * _TILE + wg * _B  # this consumer's rows
            rows_ref = (bi, pl.ds(r0, _B), hi)
            q_w, do_w = q_s.at[wg], do_s.at[wg]
            for n, (src, dst) in enumerate([(q_g.at[rows_ref], q_w), (do_g.at[rows_ref], do_w),
                                            (lse_g.at[bi, hi, pl.ds(r0, _B)], lse_s.at[wg]),
                                            (dl_g.at[bi, hi, pl.ds(r0, _B)], dl_s.at[wg])]):
                plgpu.copy_gmem_to_smem(src, dst, q_bar.at[4 * wg + n])
            for n in range(4):
                plgpu.barrier_wait(q_bar.at[4 * wg + n])
            lse = _Ops.vector(lse_s.at[wg], compiled, 1)
            dl = _Ops.vector(dl_s.at[wg], compiled, 1)
            rows = lax.broadcasted_iota(jnp.int32, (_B, _B), 0) + r0 + spec.offset
            cols0 = lax.broadcasted_iota(jnp.int32, (_B, _B), 1)

            def step(j, dq):
                slot = lax.rem(j, _SLOTS)
                _wait_ready(ready, slot, 2)
                k_j, v_j = k_s.at[slot], v_s.at[slot]
                sc, dp = _Ops.two((_B, _B), q_w, k_j.T, do_w, v_j.T)
                p = jnp.exp2(sc * c - lax.broadcast_in_dim(lse, (_B, _B), [0]))
                cols = cols0 + j * _B
                ok = cols < s_len
                if spec.causal:
                    ok = ok & (cols <= rows)
                p = jnp.where(ok, p, 0.0)
                ds = (p * (dp - lax.broadcast_in_dim(dl, (_B, _B), [0]))).astype(dtype)
                dq = ops.add(dq, ds, k_j)
                plgpu.barrier_arrive(free.at[slot])
                return dq

            dq = lax.fori_loop(0, n_blocks, step, ops.zeros((_B, d)))
            q_w[...] = (dq * spec.scale).astype(dtype)  # Q is not read now
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_w, dq_g.at[rows_ref])
            plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((b, tp, h, d), dtype),
        scratch_types=[
            _smem((_CONSUMERS, _B, d), dtype, d),
            _smem((_CONSUMERS, _B, d), dtype, d),
            plgpu.SMEM((_CONSUMERS, _B), jnp.float32),
            plgpu.SMEM((_CONSUMERS, _B), jnp.float32),
            _smem((_SLOTS, _B, d), dtype, d),
            _smem((_SLOTS, _B, d), dtype, d),
            plgpu.Barrier(num_barriers=4 * _CONSUMERS),
            plgpu.Barrier(num_barriers=2 * _SLOTS),
            plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=_SLOTS),
            *([_smem((_CONSUMERS, _B, _B), dtype, _B)] if interpret else []),
        ],
        grid=(b * h, tp // _TILE),
        grid_names=("bh", "q"),
        **_launch(interpret),
    )(q, k, v, do, lse2, delta)


def backward(q, k, v, out, lse, d_out, d_lse, spec: common.MaskSpec, interpret):
    """q/out/d_out [B, T, H, D], k/v [B, S, K, D], lse/d_lse [B, H, T] -> (dq, dk, dv)."""
    t, s = q.shape[1], k.shape[1]
    tp, sp = common.round_up(t, _TILE), common.round_up(s, _TILE)
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
