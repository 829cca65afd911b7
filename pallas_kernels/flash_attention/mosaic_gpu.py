"""Flash attention forward for Hopper through Mosaic GPU (`jax.experimental.pallas.mosaic_gpu`).

Measured on an H100 at or above cuDNN's forward (experiments/attention/RESULTS.md).  One program
computes 128 query rows of one (batch, head) with three warpgroups:

- a producer warpgroup (40 registers per thread) only issues TMA copies of K/V blocks into a
  shared-memory ring (`Config.slots` deep), refilling a slot once both consumers released it;
- two consumer warpgroups (232 registers) own 64 rows each: S = Q K^T and P V are warpgroup
  matmuls (wgmma) with float32 accumulators, P fed from registers; the online softmax works
  in log2 units (exp2, the scale folded into the max subtraction);
- `Config.overlap` (default) software-pipelines each consumer by one block, as FlashAttention-3
  does inside a warpgroup: step j issues S_j and then P_{j-1} V_{j-1} and runs block j's
  softmax while the P V matmul is in flight; O lives in the wgmma accumulator all along;
  without it, `Config.pingpong` makes the two consumers alternate on the tensor cores instead;
- causal attention loops only over the key blocks a program can see, masks only the diagonal
  blocks (an unmasked and a masked loop), and launches the longest programs first;
- GQA reads the shared K/V head without repeating it; sequences that are not a multiple of the
  blocks are padded here and padded keys masked; the log-sum-exp is an output.

CPU checks: GPU interpret mode (`plgpu.InterpretGPUParams`, with its race detector) runs the
same schedule with P and O staged in shared memory (it runs no wgmma inside `pl.run_state`
and reads wgmma operands from refs), and a lowering test compiles to Mosaic GPU for a CUDA
target; the GPU-only tests run the compiled kernel.

Segment ids, sliding window and soft-cap are not in this kernel (`refuses`: the registry names
the implementations that have them).  `jax.grad` goes, by default, through cuDNN's flash backward
fed this forward's output and log-sum-exp where cuDNN covers the call on a GPU, else through the
Pallas-Triton backward; `Config(backward="mosaic_gpu")` / `"mosaic_gpu_fused"` pick our own
Hopper backward kernels (`mosaic_gpu_bwd.py`; on an H100 within 3% of cuDNN's backward either
way, experiments/attention/RESULTS.md).  `flash_attention_backward` runs ours from a saved
output and lse.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import common, pallas_triton

NEG_INF = common.NEG_INF


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes and schedule (static).

    Each program computes 128 query rows of one (batch, head) with three warpgroups: two
    consumers (64 rows each, one wgmma M) and one producer that only issues TMA copies.
    block_k: keys per K/V block (64 or 128); slots: depth of the shared-memory K/V ring;
    overlap: within a consumer, block j's softmax runs while block j-1's P V matmul is in
    flight (software pipelining by one block; the default and fastest measured);
    pingpong (only without overlap): the two consumers take turns on the tensor cores, so one's
    softmax runs while the other's matmuls do.
    backward: "cudnn" (on a GPU, cuDNN's backward where it covers the call, the Pallas-Triton
    one elsewhere), "mosaic_gpu" (`mosaic_gpu_bwd`: our Hopper dK/dV and dQ kernels),
    "mosaic_gpu_fused" (one kernel, dQ by TMA reduce-adds) or "pallas_triton"; bwd: the
    Pallas-Triton backward's tiles.  cuDNN stays the default: on an H100 its backward and
    ours were within 3% of each other, cuDNN ahead on full and GQA attention."""

    block_k: int = 128
    slots: int = 2
    overlap: bool = True
    pingpong: bool = False
    backward: str = "cudnn"
    bwd: pallas_triton.Config = pallas_triton.Config()


BACKWARDS = ("cudnn", "mosaic_gpu", "mosaic_gpu_fused", "pallas_triton")
_BQ = 64  # rows per consumer warpgroup: the wgmma M
_CONSUMERS = 2
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per block (opt-in maximum)
_LOG2E = 1.4426950408889634


def smem_bytes(d: int, cfg: Config, itemsize: int = 2) -> int:
    """Shared memory one program asks for: Q/O tiles, the K/V ring and the lse rows."""
    return (
        _CONSUMERS * _BQ * d + 2 * cfg.slots * cfg.block_k * d
    ) * itemsize + _CONSUMERS * _BQ * 4


def _smem_transforms(d: int, dtype) -> tuple:
    """Tiling + swizzle of a [rows, d] shared-memory tile, as wgmma wants its operands."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(d * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _forward(q, k, v, q_seg, k_seg, spec: common.MaskSpec, cfg: Config, interpret):
    """q [B, T, H, D], k/v [B, S, K, D] (bf16/fp16) -> out [B, T, H, D], lse [B, H, T] f32."""
    del q_seg, k_seg  # refused in flash_attention
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    bq, bk, slots = _BQ, cfg.block_k, cfg.slots
    tile = bq * _CONSUMERS  # query rows per program
    tp, sp = common.round_up(t, tile), common.round_up(s, bk)
    q_p, k_p, v_p = common.pad_seq(q, tp), common.pad_seq(k, sp), common.pad_seq(v, sp)
    nq, nk = tp // tile, sp // bk
    group = h // kh
    dtype = q.dtype
    tr = _smem_transforms(d, dtype)
    compiled = not interpret
    # Scores are kept in log2 units (exp2 is the native instruction); with a positive scale the
    # scaling folds into the subtraction of the running max (one FMA per score).
    c = spec.scale * _LOG2E
    # Blocks needing no mask: all but a padded last block (causal: also those left of the
    # program's first row, worked out in the kernel).
    n_unmasked_max = nk if s % bk == 0 else nk - 1

    def flash_fwd(
        q_gmem,
        k_gmem,
        v_gmem,
        o_gmem,
        lse_gmem,
        qo_smem,
        k_smem,
        v_smem,
        lse_smem,
        q_bar,
        k_bar,
        v_bar,
        k_free,
        v_free,
        turn,
        *p_smem,
    ):
        # Causal programs with the most key blocks start first (the launch order follows the
        # grid's "bh"-fastest linear index), so the short ones fill the tail of the wave.
        qi = nq - 1 - lax.axis_index("q") if spec.causal else lax.axis_index("q")
        bh, wg = lax.axis_index("bh"), lax.axis_index("wg")
        bi, hi = bh // h, bh % h
        ki = hi // group
        n_blocks, n_unmasked = nk, n_unmasked_max
        if spec.causal:
            first = qi * tile + spec.offset  # absolute position of the program's first row
            last = jnp.minimum(first + tile - 1, s - 1)
            # at least block 0, even where every row of the program sees no key (q longer
            # than kv): it is fully masked, so l = 0 gives out 0 and lse -inf
            n_blocks = jnp.clip(last // bk + 1, 1, nk)
            n_unmasked = jnp.clip((first + 1) // bk, 0, n_unmasked_max)
        n_unmasked = jnp.minimum(n_unmasked, n_blocks)

        def fetch(j, slot, after_release: bool = False):
            # a refill waits for both consumers to release the slot's K, then its V
            rows = (bi, pl.ds(j * bk, bk), ki)
            for src, dst, ready, free in (
                (k_gmem, k_smem, k_bar, k_free),
                (v_gmem, v_smem, v_bar, v_free),
            ):
                if after_release:
                    plgpu.barrier_wait(free.at[slot])
                plgpu.copy_gmem_to_smem(src.at[rows], dst.at[slot], ready.at[slot])

        @pl.when(wg == _CONSUMERS)
        def _producer():
            if compiled:
                plgpu.set_max_registers(40, action="decrease")
            for j in range(min(slots, nk)):
                pl.when(j < n_blocks)(functools.partial(fetch, j, j))

            def refill(j, _):  # slot j % slots was last read in step j - slots
                fetch(j, lax.rem(j, slots), after_release=True)

            lax.fori_loop(slots, n_blocks, refill, None)
            for back in range(1, min(slots, nk) + 1):  # observe the last releases (phases balance)

                @pl.when(n_blocks >= back)
                def _():
                    slot = lax.rem(n_blocks - back, slots)
                    plgpu.barrier_wait(k_free.at[slot])
                    plgpu.barrier_wait(v_free.at[slot])

        def serial_loop(
            issue_qk, softmax, p_operand, take_turn, finish, m, l, acc, n_blocks, n_unmasked
        ):
            """Each step: S = Q K_j^T, softmax, O = O * alpha + P V_j, in that order (the
            consumers' ping-pong is what overlaps softmax with matmuls)."""

            def step(j, carry, masked: bool):
                m, l, acc = carry
                slot = lax.rem(j, slots)

                plgpu.barrier_wait(k_bar.at[slot])  # outside the accumulator's scope (below)

                def scores(ref):
                    issue_qk(ref, slot)
                    take_turn()  # the other consumer issues its matmul behind this one
                    return ref[...]

                sc = pl.run_scoped(scores, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                m, l, alpha, p = softmax(sc, j, m, l, masked)
                p16 = p.astype(dtype)
                acc = acc * alpha[:, None]
                if cfg.pingpong:
                    plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_bar.at[slot])
                if cfg.pingpong:
                    plgpu.barrier_wait(turn)  # the tensor cores are this consumer's now
                if compiled:  # P V into an accumulator that already holds O * alpha

                    def values(ref):
                        plgpu.wgmma(ref, p16, v_smem.at[slot])

                    acc = pl.run_state(values)(plgpu.ACC.init(acc))
                else:  # interpret mode runs no wgmma inside pl.run_state: add here
                    p_op = p_operand(p16)

                    def values(ref):
                        plgpu.wgmma(ref, p_op, v_smem.at[slot])
                        return ref[...]

                    acc = acc + pl.run_scoped(values, plgpu.ACC((bq, d), jnp.float32))
                plgpu.barrier_arrive(v_free.at[slot])
                return m, l, acc

            carry = lax.fori_loop(0, n_unmasked, functools.partial(step, masked=False), (m, l, acc))
            finish(
                *lax.fori_loop(n_unmasked, n_blocks, functools.partial(step, masked=True), carry)
            )

        def overlapped_loop(
            issue_qk, softmax, p_operand, take_turn, finish, m, l, acc, n_blocks, n_unmasked
        ):
            """Software-pipelined by one block (FA3's intra-warpgroup overlap): step j issues
            S_j = Q K_j^T and then P_{j-1} V_{j-1}, and runs block j's softmax while the second
            matmul is still in flight; O is rescaled by alpha_j once it lands.  Needs
            n_blocks >= 1 (block 0's softmax is the prologue)."""
            del take_turn  # (no ping-pong: measured slower on top of this overlap)

            def run(acc_ref):
                if compiled:  # O lives in the wgmma accumulator for the whole loop

                    def issue_pv(p16, slot):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                    def read_acc():
                        return acc_ref[...]  # waits for every wgmma in flight
                else:  # interpret mode: O in shared memory, P V computed on the spot

                    def issue_pv(p_op, slot):
                        def values(ref):
                            plgpu.wgmma(ref, p_op, v_smem.at[slot])
                            return ref[...]

                        acc_ref[...] += pl.run_scoped(values, plgpu.ACC((bq, d), jnp.float32))

                    def read_acc():
                        return acc_ref[...]

                plgpu.barrier_wait(k_bar.at[0])

                def scores(ref):
                    issue_qk(ref, 0)
                    return ref[...]

                sc = pl.run_scoped(scores, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[0])
                m1, l1, _, p = softmax(sc, 0, m, l, masked=True)  # O is still zero
                p16 = p.astype(dtype)

                def step(j, carry, masked: bool):
                    m, l, p_prev = carry
                    slot, prev = lax.rem(j, slots), lax.rem(j - 1, slots)
                    p_op = p_operand(p_prev)

                    # (barrier waits stay outside the accumulator's scope: inside it they cost
                    # a third of the causal forward's speed on an H100)
                    plgpu.barrier_wait(k_bar.at[slot])
                    plgpu.barrier_wait(v_bar.at[prev])

                    def both(ref):
                        issue_qk(ref, slot)
                        issue_pv(p_op, prev)
                        if compiled:  # S_j is the older of the two wgmma groups in flight
                            return plgpu.wgmma_accumulator_load(ref, wait_n=1)
                        return ref[...]

                    sc = pl.run_scoped(both, plgpu.ACC((bq, bk), jnp.float32))
                    plgpu.barrier_arrive(k_free.at[slot])
                    m, l, alpha, p = softmax(sc, j, m, l, masked)
                    o = read_acc()
                    plgpu.barrier_arrive(v_free.at[prev])
                    # P_j becomes a wgmma operand only now: registers a pending wgmma reads
                    # must not be written while it runs (ptxas would serialise every wgmma)
                    acc_ref[...] = o * alpha[:, None]
                    return m, l, p.astype(dtype)

                carry = lax.fori_loop(
                    1,
                    jnp.maximum(n_unmasked, 1),
                    functools.partial(step, masked=False),
                    (m1, l1, p16),
                )
                m_f, l_f, p_last = lax.fori_loop(
                    jnp.maximum(n_unmasked, 1),
                    n_blocks,
                    functools.partial(step, masked=True),
                    carry,
                )
                last = lax.rem(n_blocks - 1, slots)
                plgpu.barrier_wait(v_bar.at[last])
                issue_pv(p_operand(p_last), last)
                o = read_acc()
                plgpu.barrier_arrive(v_free.at[last])
                finish(m_f, l_f, o)

            if compiled:
                pl.run_state(run)(plgpu.ACC.init(acc))
            else:
                acc_smem = p_smem[1].at[wg]
                acc_smem[...] = acc
                run(acc_smem)

        @pl.when(wg < _CONSUMERS)
        def _consumer():
            if compiled:
                plgpu.set_max_registers(232, action="increase")
            row0 = qi * tile + wg * bq  # this warpgroup's rows
            q_tile = qo_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_gmem.at[bi, pl.ds(row0, bq), hi], q_tile, q_bar.at[wg])
            rows = lax.broadcasted_iota(jnp.int32, (bq, bk), 0) + row0 + spec.offset
            cols0 = lax.broadcasted_iota(jnp.int32, (bq, bk), 1)

            def take_turn():  # both consumers meet here; pairs alternate their matmuls
                if cfg.pingpong:
                    plgpu.barrier_arrive(turn)
                    plgpu.barrier_wait(turn)

            def softmax(sc, j, m, l, masked: bool):
                """Scores [bq, bk] of key block j -> (m, l, alpha, P float32) of the online
                softmax."""
                if c <= 0:  # (a non-positive scale flips the max: scale first)
                    sc = sc * c
                if masked:
                    cols = cols0 + j * bk
                    ok = cols < s
                    if spec.causal:
                        ok = ok & (cols <= rows)
                    sc = jnp.where(ok, sc, NEG_INF)
                s_max = jnp.max(sc, axis=1)
                m_new = jnp.maximum(m, s_max * c if c > 0 else s_max)
                # a row with nothing visible yet keeps m = -inf; exp2 must see a finite max
                m_use = jnp.where(m_new == NEG_INF, 0.0, m_new) if masked else m_new
                alpha = jnp.exp2(m - m_use)
                p = jnp.exp2((sc * c if c > 0 else sc) - m_use[:, None])
                return m_new, l * alpha + jnp.sum(p, axis=1), alpha, p

            def p_operand(p16):
                """wgmma takes P from registers on the GPU; GPU interpret mode reads its A
                operand from a ref, so there P goes through shared memory."""
                if compiled:
                    return p16
                p_smem[0].at[wg][...] = p16
                plgpu.commit_smem()
                return p_smem[0].at[wg]

            def issue_qk(ref, slot):
                plgpu.wgmma(ref, q_tile, k_smem.at[slot].T)

            m0 = jnp.full((bq,), NEG_INF, jnp.float32)
            l0 = jnp.zeros((bq,), jnp.float32)
            acc0 = jnp.zeros((bq, d), jnp.float32)
            if compiled:
                m0 = plgpu.layout_cast(m0, plgpu.Layout.WGMMA.reduce(1))
                l0 = plgpu.layout_cast(l0, plgpu.Layout.WGMMA.reduce(1))
                acc0 = plgpu.layout_cast(acc0, plgpu.Layout.WGMMA)
            plgpu.barrier_wait(q_bar.at[wg])
            if cfg.pingpong:
                pl.when(wg == 1)(take_turn)  # consumer 1 starts one turn behind consumer 0

            def finish(m, l, acc):
                if cfg.pingpong:
                    pl.when(wg == 0)(take_turn)  # consumer 0 ends one turn behind (phases balance)
                l_safe = jnp.where(l == 0.0, 1.0, l)
                q_tile[...] = (acc * (1.0 / l_safe)[:, None]).astype(dtype)  # Q is not read now
                lse_smem.at[wg][...] = jnp.where(l == 0.0, NEG_INF, (m + jnp.log2(l_safe)) / _LOG2E)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(q_tile, o_gmem.at[bi, pl.ds(row0, bq), hi])
                plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_gmem.at[bi, hi, pl.ds(row0, bq)])
                plgpu.wait_smem_to_gmem(0)

            loop = overlapped_loop if cfg.overlap else serial_loop
            loop(
                issue_qk, softmax, p_operand, take_turn, finish, m0, l0, acc0, n_blocks, n_unmasked
            )

    call = plgpu.kernel(
        flash_fwd,
        out_type=(
            jax.ShapeDtypeStruct((b, tp, h, d), dtype),
            jax.ShapeDtypeStruct((b, h, tp), jnp.float32),
        ),
        scratch_types=[
            plgpu.SMEM((_CONSUMERS, bq, d), dtype, transforms=tr),
            plgpu.SMEM((slots, bk, d), dtype, transforms=tr),
            plgpu.SMEM((slots, bk, d), dtype, transforms=tr),
            plgpu.SMEM((_CONSUMERS, bq), jnp.float32),
            plgpu.Barrier(num_barriers=_CONSUMERS),
            plgpu.Barrier(num_barriers=slots),
            plgpu.Barrier(num_barriers=slots),
            plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=slots),
            plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=slots),
            plgpu.Barrier(num_arrivals=_CONSUMERS),
            *(
                [
                    plgpu.SMEM((_CONSUMERS, bq, bk), dtype, transforms=_smem_transforms(bk, dtype)),
                    plgpu.SMEM((_CONSUMERS, bq, d), jnp.float32),
                ]
                if interpret
                else []
            ),
        ],
        grid=(b * h, nq),
        grid_names=("bh", "q"),
        num_threads=_CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True) if compiled else None,
        interpret=_interpret_params(interpret),
    )
    out, lse = call(q_p, k_p, v_p)
    return out[:, :t], lse[:, :, :t]


def _interpret_params(interpret) -> plgpu.InterpretGPUParams | bool:
    """True -> default GPU interpret mode on CPU; an InterpretGPUParams (e.g. with
    detect_races=True) is used as given; False compiles for the GPU."""
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return interpret
    return plgpu.InterpretGPUParams() if interpret else False


def _backward(q, k, v, q_seg, k_seg, out, lse, d_out, d_lse, spec, cfg: Config, interpret):
    """By `cfg.backward`: our Mosaic GPU kernels; or cuDNN's flash backward from this
    forward's out/lse where it covers the call (compiled GPU, no lse cotangent, no bottom-right
    causal offset) and the Pallas-Triton backward else."""

    def triton():
        return pallas_triton._backward(
            q, k, v, q_seg, k_seg, out, lse, d_out, d_lse, spec, cfg.bwd, bool(interpret)
        )

    if cfg.backward in ("mosaic_gpu", "mosaic_gpu_fused"):
        from pallas_kernels.flash_attention import mosaic_gpu_bwd

        return mosaic_gpu_bwd.backward(
            q,
            k,
            v,
            out,
            lse,
            d_out,
            d_lse,
            spec,
            _interpret_params(interpret),
            fused=cfg.backward == "mosaic_gpu_fused",
        )
    if interpret or cfg.backward == "pallas_triton" or (spec.causal and spec.q_len != spec.kv_len):
        return triton()
    from pallas_kernels.flash_attention import cudnn_lse

    def cudnn():
        return cudnn_lse.cudnn_attention_bwd(
            q, k, v, out, lse, d_out, causal=spec.causal, scale=spec.scale
        )

    # cuDNN takes no lse cotangent: a caller that differentiates through the lse (ring
    # attention merging blocks) gets the Triton backward, decided on device
    return lax.cond(jnp.any(d_lse != 0), triton, cudnn)


_flash = common.flash_with_vjp(_forward, _backward)


def refuses(call: common.AttentionCall, cfg: Config | None = None) -> str | None:
    """Why the Mosaic GPU kernels cannot take `call` with `cfg` (default Config; platform
    aside), or None."""
    q, k, v = call.q, call.k, call.v
    if (
        call.segment_ids is not None
        or call.kv_segment_ids is not None
        or call.sliding_window is not None
        or call.softcap is not None
    ):
        return "the Mosaic GPU kernels have no segment ids, sliding window or softcap"
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return (
            f"the Mosaic GPU kernels take bfloat16 or float16 q/k/v, got "
            f"{q.dtype}/{k.dtype}/{v.dtype}"
        )
    d, cfg = q.shape[-1], cfg or Config()
    if d % 16:
        return f"head_dim {d} must be a multiple of 16"
    if smem_bytes(d, cfg) > SMEM_BYTES:
        return (
            f"head_dim {d} with {cfg} needs {smem_bytes(d, cfg)} bytes of shared memory "
            f"(at most {SMEM_BYTES}): lower block_k or slots"
        )
    return None


def _check(call: common.AttentionCall, cfg: Config) -> None:
    call.check()
    why = refuses(call, cfg)
    if why is not None:
        raise ValueError(f"{why}; use implementation='pallas_triton', 'cudnn' or 'xla'")
    _check_fused(call.q.shape[-1], cfg)


def flash_attention(
    call: common.AttentionCall,
    *,
    config: Config | None = None,
    interpret: bool | plgpu.InterpretGPUParams = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Flash attention of `call` (q [B, T, H, D], k/v [B, S, K, D], bf16/fp16) -> out
    [B, T, H, D] (, lse [B, H, T] float32).  Same semantics as `attention_reference` for what
    it covers (`refuses`).  interpret: run in GPU interpret mode on CPU (True, or
    InterpretGPUParams)."""
    cfg = config or Config()
    if cfg.block_k not in (64, 128) or cfg.slots < 2 or (cfg.overlap and cfg.pingpong):
        raise ValueError(
            f"block_k must be 64 or 128, slots at least 2 and pingpong only "
            f"without overlap, got {cfg}"
        )
    if cfg.backward not in BACKWARDS:
        raise ValueError(f"backward={cfg.backward!r}: choose one of {BACKWARDS}")
    _check(call, cfg)
    return common.run_forward(_flash, call, cfg, interpret)


OUR_BACKWARDS = ("mosaic_gpu", "mosaic_gpu_fused")


def _check_fused(d: int, cfg: Config) -> None:
    from pallas_kernels.flash_attention.mosaic_gpu_bwd import FUSED_HEAD_DIMS

    if cfg.backward == "mosaic_gpu_fused" and d not in FUSED_HEAD_DIMS:
        raise ValueError(
            f"backward='mosaic_gpu_fused' takes head_dim in {FUSED_HEAD_DIMS}, got "
            f"{d}; backward='mosaic_gpu' takes any multiple of 16"
        )


def flash_attention_backward(
    call: common.AttentionCall,
    out: jax.Array,
    lse: jax.Array,
    dout: jax.Array,
    *,
    config: Config | None = None,
    interpret: bool | plgpu.InterpretGPUParams = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Our Hopper backward kernels from a saved out [B, T, H, D] (bf16/fp16) and lse [B, H, T]
    -> (dq [B, T, H, D], dk, dv [B, S, K, D]) in the inputs' dtype (see
    `reference.attention_backward_reference`; ring attention calls it per key block).

    config.backward picks "mosaic_gpu" (the dK/dV + dQ pair, the default here: the faster on
    full and GQA attention, what ring attention's off-diagonal blocks are) or
    "mosaic_gpu_fused"."""
    cfg = config or Config(backward="mosaic_gpu")
    if cfg.backward not in OUR_BACKWARDS:
        raise ValueError(
            f"flash_attention_backward runs our kernels: config.backward must be "
            f"one of {OUR_BACKWARDS}, got {cfg.backward!r}"
        )
    _check(call, cfg)
    return common.run_backward(_backward, call, out, lse, dout, cfg, interpret)
