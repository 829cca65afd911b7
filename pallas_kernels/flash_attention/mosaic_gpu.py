"""Flash attention forward for Hopper through Mosaic GPU (`jax.experimental.pallas.mosaic_gpu`).

Version 1, written to the Mosaic GPU programming model, checked on CPU in GPU interpret mode
(`plgpu.InterpretGPUParams`, with its race detector) and lowered for a CUDA target on CPU;
**not yet compiled to PTX, run or timed on a GPU** (experiments/attention/NOTES.md):

- one or two warpgroups per program (`Config.consumers`) each compute 64 query rows of one
  (batch, head);
- K/V blocks stream through a two-slot shared-memory ring filled by TMA copies that warpgroup 0
  issues: block j + 1 is in flight while block j is multiplied; with two warpgroups each block
  serves 128 rows and a "free" barrier tells warpgroup 0 when both have finished a slot;
- S = Q K^T and P V are warpgroup matmuls (wgmma) with float32 accumulators, P fed from
  registers (staged in shared memory in interpret mode); the online softmax keeps the running
  max and sum per row;
- causal attention loops only over the key blocks a query block can see (a dynamic trip count),
  and masks inside the diagonal block;
- GQA reads the shared K/V head (h // (H / K)) without repeating it; sequences that are not a
  multiple of the blocks are padded here and padded keys masked.

Segment ids, sliding window and soft-cap are not in this version (ValueError names the
implementations that have them).  There is no Mosaic GPU backward: `jax.grad` goes through
cuDNN's flash backward fed this forward's output and log-sum-exp where cuDNN covers the call on
a GPU, else through the Pallas-Triton backward (`_backward`, `common.flash_with_vjp`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import common
from pallas_kernels.flash_attention import pallas_triton

NEG_INF = common.NEG_INF
_SLOTS = 2  # K/V ring depth: one block computed while the next one loads


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes (static).

    block_q: rows per warpgroup (one wgmma M, 64); consumers: warpgroups per program sharing
    one K/V ring (a program computes block_q * consumers rows, so each K/V block loaded serves
    that many rows); block_k: a multiple of 64 keeps a K tile whole swizzled rows.
    cudnn_bwd: on a GPU, differentiate with cuDNN's backward where it covers the call;
    bwd: the Pallas-Triton backward's tiles (interpret mode, and what cuDNN does not cover)."""

    block_q: int = 64
    block_k: int = 64
    consumers: int = 1
    cudnn_bwd: bool = True
    bwd: pallas_triton.Config = pallas_triton.Config()


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
    bq, bk, nc = cfg.block_q, cfg.block_k, cfg.consumers
    tile = bq * nc  # query rows per program
    tp, sp = common.round_up(t, tile), common.round_up(s, bk)
    q_p, k_p, v_p = common.pad_seq(q, tp), common.pad_seq(k, sp), common.pad_seq(v, sp)
    nq, nk = tp // tile, sp // bk
    group = h // kh
    dtype = q.dtype
    tr = _smem_transforms(d, dtype)

    p_via_smem = bool(interpret)

    def kernel(q_gmem, k_gmem, v_gmem, o_gmem, lse_gmem, q_smem, k_smem, v_smem, *rest):
        if p_via_smem:
            p_smem, o_smem, lse_smem, q_bar, k_bars, v_bars, *free_bars = rest
        else:
            p_smem = None
            o_smem, lse_smem, q_bar, k_bars, v_bars, *free_bars = rest
        bh, qi = lax.axis_index("bh"), lax.axis_index("q")
        wg = lax.axis_index("wg") if nc > 1 else 0
        bi, hi = bh // h, bh % h
        ki = hi // group
        row0 = qi * tile + wg * bq  # this warpgroup's rows
        # key blocks the program's rows can see: all, or (causal) up to its last row.  Every
        # warpgroup runs the same count (they share the ring); the mask does the rest.
        n_blocks = nk
        if spec.causal:
            last = jnp.minimum(qi * tile + tile - 1 + spec.offset, s - 1)
            n_blocks = jnp.clip(last // bk + 1, 0, nk)

        def fetch(j, slot):
            plgpu.copy_gmem_to_smem(k_gmem.at[bi, pl.ds(j * bk, bk), ki], k_smem.at[slot],
                                    k_bars.at[slot])
            plgpu.copy_gmem_to_smem(v_gmem.at[bi, pl.ds(j * bk, bk), ki], v_smem.at[slot],
                                    v_bars.at[slot])

        plgpu.copy_gmem_to_smem(q_gmem.at[bi, pl.ds(row0, bq), hi], q_smem.at[wg],
                                q_bar.at[wg])

        @pl.when((n_blocks > 0) & (wg == 0))  # warpgroup 0 also issues the K/V copies
        def _():
            fetch(0, 0)

        plgpu.barrier_wait(q_bar.at[wg])

        rows = lax.broadcasted_iota(jnp.int32, (bq, bk), 0) + row0 + spec.offset
        cols0 = lax.broadcasted_iota(jnp.int32, (bq, bk), 1)

        def body(j, carry):
            m, l, o = carry
            slot = lax.rem(j, _SLOTS)

            @pl.when((j + 1 < n_blocks) & (wg == 0))
            def _():
                # the other slot was last read in iteration j - 1: by this warpgroup (its
                # wgmmas were waited for), and with several, by all of them (free barrier)
                if nc > 1:
                    @pl.when(j >= 1)
                    def _():
                        plgpu.barrier_wait(free_bars[0].at[1 - slot])
                fetch(j + 1, 1 - slot)

            plgpu.barrier_wait(k_bars.at[slot])

            def scores(acc):
                plgpu.wgmma(acc, q_smem.at[wg], k_smem.at[slot].T)
                plgpu.wgmma_wait(0)
                return acc[...]

            sc = pl.run_scoped(scores, plgpu.ACC((bq, bk), jnp.float32))
            sc = sc * spec.scale
            cols = cols0 + j * bk
            ok = cols < s
            if spec.causal:
                ok = ok & (cols <= rows)
            sc = jnp.where(ok, sc, NEG_INF)
            m_new = jnp.maximum(m, jnp.max(sc, axis=1))
            m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)  # rows with nothing visible yet
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(sc - m_safe[:, None])
            l = l * alpha + jnp.sum(p, axis=1)
            plgpu.barrier_wait(v_bars.at[slot])

            # On the GPU, wgmma takes P straight from registers.  GPU interpret mode's wgmma
            # reads its A operand from a ref, so there P goes through shared memory.
            if p_smem is None:
                p_op = p.astype(dtype)
            else:
                p_smem.at[wg][...] = p.astype(dtype)
                plgpu.commit_smem()
                p_op = p_smem.at[wg]

            def values(acc):
                plgpu.wgmma(acc, p_op, v_smem.at[slot])
                plgpu.wgmma_wait(0)
                return acc[...]

            # (a pre-initialised accumulator, o * alpha, would save this add; GPU interpret
            # mode does not run wgmma inside pl.run_state, so v1 adds in registers)
            pv = pl.run_scoped(values, plgpu.ACC((bq, d), jnp.float32))
            if nc > 1:
                plgpu.barrier_arrive(free_bars[0].at[slot])  # done reading this slot
            return m_new, l, o * alpha[:, None] + pv

        init = (jnp.full((bq,), NEG_INF, jnp.float32), jnp.zeros((bq,), jnp.float32),
                jnp.zeros((bq, d), jnp.float32))
        m, l, o = lax.fori_loop(0, n_blocks, body, init)
        if nc > 1:  # warpgroup 0 observes the slots' last releases too (barrier phases balance)
            for back in (1, 2):
                @pl.when((wg == 0) & (n_blocks >= back))
                def _():
                    plgpu.barrier_wait(free_bars[0].at[lax.rem(n_blocks - back, _SLOTS)])
        l_safe = jnp.where(l == 0.0, 1.0, l)
        o_smem.at[wg][...] = (o / l_safe[:, None]).astype(dtype)
        lse_smem.at[wg][...] = jnp.where(l == 0.0, NEG_INF, m + jnp.log(l_safe))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[bi, pl.ds(row0, bq), hi])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_gmem.at[bi, hi, pl.ds(row0, bq)])
        plgpu.wait_smem_to_gmem(0)

    call = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((b, tp, h, d), dtype),
                  jax.ShapeDtypeStruct((b, h, tp), jnp.float32)),
        scratch_types=[
            plgpu.SMEM((nc, bq, d), dtype, transforms=tr),
            plgpu.SMEM((_SLOTS, bk, d), dtype, transforms=tr),
            plgpu.SMEM((_SLOTS, bk, d), dtype, transforms=tr),
            *([plgpu.SMEM((nc, bq, bk), dtype, transforms=_smem_transforms(bk, dtype))]
              if p_via_smem else []),
            plgpu.SMEM((nc, bq, d), dtype, transforms=tr),
            plgpu.SMEM((nc, bq), jnp.float32),
            plgpu.Barrier(num_barriers=nc),
            plgpu.Barrier(num_barriers=_SLOTS),
            plgpu.Barrier(num_barriers=_SLOTS),
            *([plgpu.Barrier(num_arrivals=nc, num_barriers=_SLOTS)] if nc > 1 else []),
        ],
        grid=(b * h, nq),
        grid_names=("bh", "q"),
        num_threads=nc if nc > 1 else None,
        thread_name="wg" if nc > 1 else None,
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
    """cuDNN's flash backward from this forward's out/lse where it covers the call (compiled
    GPU, no lse cotangent, no bottom-right causal offset); the Pallas-Triton backward else."""
    def triton():
        return pallas_triton._backward(q, k, v, q_seg, k_seg, out, lse, d_out, d_lse, spec,
                                       cfg.bwd, bool(interpret))

    if interpret or not cfg.cudnn_bwd or (spec.causal and spec.q_len != spec.kv_len):
        return triton()
    from pallas_kernels.flash_attention import cudnn_lse

    def cudnn():
        return cudnn_lse.cudnn_attention_bwd(q, k, v, out, lse, d_out, causal=spec.causal,
                                             scale=spec.scale)

    # cuDNN takes no lse cotangent: a caller that differentiates through the lse (ring
    # attention merging blocks) gets the Triton backward, decided on device
    return lax.cond(jnp.any(d_lse != 0), triton, cudnn)


_flash = common.flash_with_vjp(_forward, _backward)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    config: Config | None = None,
    interpret: bool | plgpu.InterpretGPUParams = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Flash attention, q [B, T, H, D], k/v [B, S, K, D] (bf16/fp16) -> out [B, T, H, D]
    (, lse [B, H, T] float32).  Same semantics as `attention_reference` for what it covers.
    interpret: run in GPU interpret mode on CPU (True, or InterpretGPUParams)."""
    common.check_inputs(q, k, v)
    if segment_ids is not None or sliding_window is not None or softcap is not None:
        raise ValueError("the Mosaic GPU kernel has no segment ids, sliding window or softcap "
                         "yet; use implementation='pallas_triton', 'cudnn' or 'xla'")
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"the Mosaic GPU kernel takes bfloat16 or float16 q/k/v, got "
                         f"{q.dtype}/{k.dtype}/{v.dtype}")
    cfg = config or Config()
    if cfg.block_q != 64 or cfg.block_k % 64 or cfg.consumers not in (1, 2):
        raise ValueError(f"block_q must be 64, block_k a multiple of 64 and consumers 1 or 2, "
                         f"got {cfg}")
    if q.shape[-1] % 16:
        raise ValueError(f"head_dim {q.shape[-1]} must be a multiple of 16")
    spec, kv_seg = common.mask_spec(q, k, causal=causal, sliding_window=None, scale=scale,
                                    softcap=None, segment_ids=None, kv_segment_ids=None)
    out, lse = _flash(q, k, v, None, kv_seg, spec, cfg, interpret)
    return (out, lse) if return_lse else out
