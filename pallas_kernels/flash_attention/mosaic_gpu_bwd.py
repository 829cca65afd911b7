"""Flash attention backward for Hopper through Mosaic GPU: a dK/dV kernel and a dQ kernel,
or one fused kernel.

Checked on CPU in GPU interpret mode (with its race detector), lowered for a CUDA target and
compiled by ptxas for sm_90a without a GPU (`experiments/attention/ptxas_report.py`); on an
H100 within 3% of cuDNN's backward (experiments/attention/RESULTS.md), which stays the
default, so used only when asked for (`mosaic_gpu.Config(backward="mosaic_gpu")` or
`"mosaic_gpu_fused"`).

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

Fused (FlashAttention-3's form, 5 matmuls per block pair instead of the split's 7): the dK/dV
kernel also computes dQ = dS K for each query block it visits.  dS^T goes to shared memory,
the two consumers meet, each multiplies both consumers' dS^T (transposed) by its half of K's
columns, and sends that float32 [64, D/2] slice to a zeroed dQ buffer in global memory by a TMA
reduce-add (`copy_smem_to_gmem(..., reduction_op="add")`), which overlaps the next step.

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

from pallas_kernels.flash_attention import common, mosaic_gpu

_B = 64  # rows per consumer warpgroup and per streamed block: one wgmma M
_CONSUMERS = 2
_TILE = _B * _CONSUMERS  # rows (dQ) or keys (dK/dV) per program
_SLOTS = 2
_FUSED_REGS = (24, 240)  # producer, consumers (per thread) in the fused kernel
# head dims the fused kernel compiles for: each consumer's half of K's columns is a wgmma
# operand, whose shared-memory rows must be 32, 64 or 128 bytes (swizzle); 160 and up exceed
# shared memory (found by lowering every multiple of 16 for a CUDA target)
FUSED_HEAD_DIMS = (32, 64, 96, 128)
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

    @staticmethod
    def positions(start, compiled: bool, axis: int, shape=(_B, _B)):
        """start + 0..63 along `axis` of a [64, 64] accumulator, as a broadcast of a vector
        laid out for it: a thread holds a few distinct values instead of a [64, 64] array
        (the fused backward runs short of registers)."""
        vec = lax.iota(jnp.int32, shape[axis])
        if compiled:
            vec = plgpu.layout_cast(vec, plgpu.Layout.WGMMA.reduce(1 - axis))
        return lax.broadcast_in_dim(vec + start, shape, [axis])

    def zeros(self, shape):
        z = jnp.zeros(shape, jnp.float32)
        return plgpu.layout_cast(z, plgpu.Layout.WGMMA) if self.compiled else z


def _producer(n_steps, copies, ready, free, compiled: bool, registers: int = 40):
    """The producer warpgroup: step i's copies (`copies(i)` -> [(src, dst ring ref)]) into slot
    i % _SLOTS, refilled once both consumers released it (`free`); `ready[n * _SLOTS + slot]`
    is buffer n's barrier."""
    if compiled:
        plgpu.set_max_registers(registers, action="decrease")

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
        pl.when(n_steps >= back)(
            lambda: plgpu.barrier_wait(free.at[lax.rem(n_steps - back, _SLOTS)])
        )


def _wait_ready(ready, slot, n_buffers: int):
    for n in range(n_buffers):
        plgpu.barrier_wait(ready.at[n * _SLOTS + slot])


def _launch(interpret) -> dict:
    """`plgpu.kernel` arguments both kernels share: producer + consumers, fast math."""
    return dict(
        num_threads=_CONSUMERS + 1,
        thread_name="wg",
        compiler_params=None if interpret else plgpu.CompilerParams(approx_math=True),
        interpret=_interpret_params(interpret),
    )


def _smem(shape, dtype, d):
    return plgpu.SMEM(shape, dtype, transforms=_transforms(d, dtype))


def _dims(q, k, spec: common.MaskSpec):
    """(B, Tp, H, D, Sp, K, GQA group, softmax scale in log2 units) of padded q [B, Tp, H, D]
    and k [B, Sp, K, D]: what both kernels are shaped by."""
    b, tp, h, d = q.shape
    sp, kh = k.shape[1], k.shape[2]
    return b, tp, h, d, sp, kh, h // kh, spec.scale * _LOG2E


def _first_q_block(kt, spec: common.MaskSpec, nq: int):
    """The first 64-row query block that sees any key of key tile kt: causal, the one holding
    the tile's first key position (both consumers walk the same blocks: they share the ring)."""
    if not spec.causal:
        return 0
    return jnp.clip((kt * _TILE - spec.offset) // _B, 0, nq - 1)


def _dkdv(
    q, k, v, do, lse2, delta, spec: common.MaskSpec, interpret, *, s_len: int, fused: bool = False
):
    """q/do [B, Tp, H, D], k/v [B, Sp, K, D] (Tp a multiple of 64, Sp of 128), lse2/delta
    [B, H, Tp] (lse in log2 units, +inf for rows without keys) -> dk, dv [B, Sp, K, D].

    fused: also dQ / scale, float32 [B, Tp, H, D] (compiled: TMA reduce-adds into one zeroed
    buffer; interpret mode, which has no reduce stores: one slice per key tile, summed here)."""
    b, tp, h, d, sp, kh, group, c = _dims(q, k, spec)
    nq = tp // _B
    dtype = q.dtype
    compiled = not interpret
    half = d // _CONSUMERS  # dQ columns per consumer
    tile_d = half if fused else d  # shared-memory tile width of the [rows, d] operands

    def flash_bwd_dkdv(q_g, k_g, v_g, do_g, lse_g, dl_g, *refs):
        if fused:
            (
                dq_g,
                dk_g,
                dv_g,
                k_s,
                v_s,
                q_s,
                do_s,
                lse_s,
                dl_s,
                kv_bar,
                ready,
                free,
                ds_s,
                dq_s,
                ds_bar,
                *a_smem,
            ) = refs
        else:
            dk_g, dv_g, k_s, v_s, q_s, do_s, lse_s, dl_s, kv_bar, ready, free, *a_smem = refs
        bk, kt, wg = lax.axis_index("bk"), lax.axis_index("k"), lax.axis_index("wg")
        bi, hk = bk // kh, bk % kh
        j0 = _first_q_block(kt, spec, nq)
        per_head = nq - j0
        n_steps = group * per_head

        def copies(i):
            hq = hk * group + i // per_head
            j = j0 + i % per_head
            rows = (bi, pl.ds(j * _B, _B), hq)
            vec = (bi, hq, pl.ds(j * _B, _B))
            return [
                (q_g.at[rows], q_s),
                (do_g.at[rows], do_s),
                (lse_g.at[vec], lse_s),
                (dl_g.at[vec], dl_s),
            ]

        # fused: dK, dV and a dQ slice live at once in the consumers (FA3's 24/240 split)
        @pl.when(wg == _CONSUMERS)
        def _():
            _producer(n_steps, copies, ready, free, compiled, _FUSED_REGS[0] if fused else 40)

        @pl.when(wg < _CONSUMERS)
        def _():
            if compiled:
                plgpu.set_max_registers(_FUSED_REGS[1] if fused else 232, action="increase")
            ops = _Ops(compiled, a_smem[0].at[wg] if a_smem else None)
            k0 = kt * _TILE + wg * _B  # this consumer's keys
            k_w, v_w = k_s.at[wg], v_s.at[wg]
            plgpu.copy_gmem_to_smem(k_g.at[bi, pl.ds(k0, _B), hk], k_w, kv_bar.at[2 * wg])
            plgpu.copy_gmem_to_smem(v_g.at[bi, pl.ds(k0, _B), hk], v_w, kv_bar.at[2 * wg + 1])
            plgpu.barrier_wait(kv_bar.at[2 * wg])
            plgpu.barrier_wait(kv_bar.at[2 * wg + 1])

            def step(i, carry, masked=spec.causal):
                # masked: a query block on the tile's diagonal.  The position iotas are made
                # here, so they need no registers in the steps that do not mask.
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
                j = j0 + i % per_head
                if masked:
                    pt = jnp.where(
                        _Ops.positions(k0, compiled, 0)
                        <= _Ops.positions(j * _B + spec.offset, compiled, 1),
                        pt,
                        0.0,
                    )
                if fused and sp != s_len:  # padded keys: K = V = 0 there, but P is not
                    pt = jnp.where(_Ops.positions(k0, compiled, 0) < s_len, pt, 0.0)
                pt16 = pt.astype(dtype)
                if compiled:  # dV += P^T dO and dP^T = V dO^T issued together, one wait

                    def both(refs):
                        plgpu.wgmma(refs[0], pt16, do_i)
                        plgpu.wgmma(refs[1], v_w, do_i.T)

                    dv, dpt = pl.run_state(both)(
                        (plgpu.ACC.init(dv), plgpu.ACC.init(ops.zeros((_B, _B))))
                    )
                else:
                    dv = ops.add(dv, pt16, do_i)

                    def dp(ref):
                        plgpu.wgmma(ref, v_w, do_i.T)
                        return ref[...]

                    dpt = pl.run_scoped(dp, plgpu.ACC((_B, _B), jnp.float32))
                dl = _Ops.vector(dl_s.at[slot], compiled, 0)
                dst = (pt * (dpt - lax.broadcast_in_dim(dl, (_B, _B), [1]))).astype(dtype)
                if fused:
                    dk = dk_and_dq(i, j, slot, dk, dst)
                else:
                    dk = ops.add(dk, dst, q_i)
                    plgpu.barrier_arrive(free.at[slot])
                return dk, dv

            def dk_and_dq(i, j, slot, dk, dst):
                """dK += dS^T Q, and dQ[block j, this consumer's columns] += dS K over both
                consumers' keys.  dS^T goes to shared memory first (two buffers, by step
                parity), which frees its registers and makes it the A operand of both: the
                consumers meet, each issues its dK and its dQ slice (both halves of dS^T,
                transposed, times its columns of K) together, and the float32 slice leaves by
                a TMA reduce-add while the next step computes."""
                par = lax.rem(i, 2)
                ds_w = ds_s.at[par, wg]
                ds_w[...] = dst
                plgpu.commit_smem()
                plgpu.barrier_arrive(ds_bar.at[par])
                plgpu.barrier_wait(ds_bar.at[par])
                q_i = q_s.at[slot]

                def both(dk_ref, dq_ref):
                    plgpu.wgmma(dk_ref, ds_w, q_i)
                    for cc in range(_CONSUMERS):
                        plgpu.wgmma(
                            dq_ref, ds_s.at[par, cc].T, k_s.at[cc, :, pl.ds(wg * half, half)]
                        )

                if compiled:
                    dk, dqh = pl.run_state(lambda r: both(*r))(
                        (plgpu.ACC.init(dk), plgpu.ACC.init(ops.zeros((_B, half))))
                    )
                else:  # interpret mode: fresh accumulators, added here

                    def run(dk_ref, dq_ref):
                        both(dk_ref, dq_ref)
                        return dk_ref[...], dq_ref[...]

                    dk_add, dqh = pl.run_scoped(
                        run, plgpu.ACC((_B, d), jnp.float32), plgpu.ACC((_B, half), jnp.float32)
                    )
                    dk = dk + dk_add
                plgpu.barrier_arrive(free.at[slot])
                hq = hk * group + i // per_head
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last slice has left
                dq_s.at[wg][...] = dqh
                plgpu.commit_smem()
                cols = pl.ds(wg * half, half)
                if compiled:
                    plgpu.copy_smem_to_gmem(
                        dq_s.at[wg], dq_g.at[bi, pl.ds(j * _B, _B), hq, cols], reduction_op="add"
                    )
                else:
                    plgpu.copy_smem_to_gmem(
                        dq_s.at[wg], dq_g.at[kt, bi, pl.ds(j * _B, _B), hq, cols]
                    )
                return dk

            zero = ops.zeros((_B, d))
            dk, dv = lax.fori_loop(0, n_steps, step, (zero, zero))
            if fused:  # the other consumer's last dQ matmul reads this consumer's K tile
                plgpu.barrier_arrive(ds_bar.at[lax.rem(n_steps, 2)])
                plgpu.barrier_wait(ds_bar.at[lax.rem(n_steps, 2)])
            k_w[...] = (dk * spec.scale).astype(dtype)  # this consumer's K/V are not read now
            v_w[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_w, dk_g.at[bi, pl.ds(k0, _B), hk])
            plgpu.copy_smem_to_gmem(v_w, dv_g.at[bi, pl.ds(k0, _B), hk])
            plgpu.wait_smem_to_gmem(0)

    kv = jax.ShapeDtypeStruct((b, sp, kh, d), dtype)
    fused_scratch = (
        [
            _smem((2, _CONSUMERS, _B, _B), dtype, tile_d),  # dS^T, by step parity
            plgpu.SMEM((_CONSUMERS, _B, half), jnp.float32),  # each consumer's dQ slice
            plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=2),
        ]
        if fused
        else []
    )
    call = plgpu.kernel(
        flash_bwd_dkdv,
        out_type=(kv, kv)
        if not fused or compiled
        else (jax.ShapeDtypeStruct((sp // _TILE, b, tp, h, d), jnp.float32), kv, kv),
        scratch_types=[
            # fused, each consumer reads half of K's columns as a wgmma operand, so K's
            # tiles, and those of what meets K in a wgmma, are made that wide (head_dim 128
            # and up: the same tiles as unfused)
            _smem((_CONSUMERS, _B, d), dtype, tile_d),
            _smem((_CONSUMERS, _B, d), dtype, tile_d),
            _smem((_SLOTS, _B, d), dtype, tile_d),
            _smem((_SLOTS, _B, d), dtype, tile_d),
            plgpu.SMEM((_SLOTS, _B), jnp.float32),
            plgpu.SMEM((_SLOTS, _B), jnp.float32),
            plgpu.Barrier(num_barriers=2 * _CONSUMERS),
            plgpu.Barrier(num_barriers=4 * _SLOTS),
            plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=_SLOTS),
            *fused_scratch,
            *([_smem((_CONSUMERS, _B, _B), dtype, _B)] if interpret else []),
        ],
        grid=(b * kh, sp // _TILE),
        grid_names=("bk", "k"),
        kernel_name="flash_bwd_fused" if fused else None,  # (profiles, ptxas reports)
        **_launch(interpret),
    )
    if not fused:
        return call(q, k, v, do, lse2, delta)
    if not compiled:
        parts, dk, dv = call(q, k, v, do, lse2, delta)
        # a key tile writes only the query blocks it visits; the rest of its slice is unset
        kt = jnp.arange(sp // _TILE)[:, None]
        seen = jnp.arange(nq)[None, :] >= _first_q_block(kt, spec, nq)
        seen = jnp.repeat(seen, _B, axis=1)[:, None, :, None, None]
        return dk, dv, jnp.where(seen, parts, 0.0).sum(0)
    # a zeroed float32 accumulator the kernel reduce-adds into (a Ref operand is aliased to
    # the kernel's output, so no copy)
    acc = jax.new_ref(jnp.zeros((b, tp, h, d), jnp.float32))
    dk, dv = call(q, k, v, do, lse2, delta, acc)
    return dk, dv, acc[...]


def _dq(q, k, v, do, lse2, delta, spec: common.MaskSpec, s_len: int, interpret):
    """q/do [B, Tp, H, D] (Tp a multiple of 128), k/v [B, Sp, K, D] (Sp a multiple of 64),
    lse2/delta as for `_dkdv` -> dq [B, Tp, H, D]."""
    b, tp, h, d, sp, kh, group, c = _dims(q, k, spec)
    nk = sp // _B
    dtype = q.dtype
    compiled = not interpret

    def flash_bwd_dq(
        q_g,
        k_g,
        v_g,
        do_g,
        lse_g,
        dl_g,
        dq_g,
        q_s,
        do_s,
        lse_s,
        dl_s,
        k_s,
        v_s,
        q_bar,
        ready,
        free,
        *a_smem,
    ):
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
            for n, (src, dst) in enumerate(
                [
                    (q_g.at[rows_ref], q_w),
                    (do_g.at[rows_ref], do_w),
                    (lse_g.at[bi, hi, pl.ds(r0, _B)], lse_s.at[wg]),
                    (dl_g.at[bi, hi, pl.ds(r0, _B)], dl_s.at[wg]),
                ]
            ):
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
        flash_bwd_dq,
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


def backward(
    q, k, v, out, lse, d_out, d_lse, spec: common.MaskSpec, interpret, fused: bool = False
):
    """q/out/d_out [B, T, H, D], k/v [B, S, K, D], lse/d_lse [B, H, T] -> (dq, dk, dv).

    fused: one kernel (dQ by reduce-adds) instead of the dK/dV + dQ pair."""
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
    if fused:
        dk, dv, dq = _dkdv(q_p, k_p, v_p, do_p, lse2, delta, spec, interpret, s_len=s, fused=True)
        dq = (dq[:, :t] * spec.scale).astype(q.dtype)
        return dq, dk[:, :s], dv[:, :s]
    dk, dv = _dkdv(q_p, k_p, v_p, do_p, lse2, delta, spec, interpret, s_len=s)
    dq = _dq(q_p, k_p, v_p, do_p, lse2, delta, spec, s, interpret)
    return dq[:, :t], dk[:, :s], dv[:, :s]
