"""Ring attention: K/V blocks rotate around a mesh axis, partial results merge by log-sum-exp.

Per-device code, called inside `jax.shard_map` (Liu, Zaharia & Abbeel 2023, "Ring Attention with
Blockwise Transformers").  Each of the P devices on `axis_name` holds T/P query rows and the K/V
of the same rows.  For P steps a device attends its queries to the K/V block it holds, merges the
block's (output, lse) into a running result, and passes the block to its right neighbour; the
`ppermute` of the next block is issued before the current block's attention so the transfer can
hide behind it.

Causal load balancing, layout "zigzag": the sequence is cut into 2P chunks and device i holds
chunks i and 2P-1-i (apply `sequence.zigzag` once to the batch, undo on the output).  Every step
after the first then costs exactly half a block on every device: for the block of device j,
j < i means all local queries see the first half of the block; j > i means only the second half
of the local queries see the whole block.  Layout "contiguous" keeps the natural order; blocks
from devices to the right are fully masked and skipped with `lax.cond`, so device P-1 computes
P blocks while device 0 computes one (kept for comparison and for non-causal use).  With segment
ids, a block in which no query shares a segment with any key is skipped too.

The backward is a custom VJP that rotates the blocks again (no gather of the sequence): the
K/V block travels with its dK/dV accumulators, each device adds its contribution, and after P
steps the accumulators are back at their owner.  Per block it is the FlashAttention-2 backward
using the global output and lse saved by the forward (`pallas_kernels.attention_backward`).

Per-block kernels: "auto" on GPU with bf16/fp16 inputs and no segment ids or softcap runs both
halves through cuDNN (`flash_attention/cudnn_lse.py`: forward with lse, backward from the
saved lse); otherwise the Pallas kernel's forward and backward on GPU, XLA on CPU.

Communication per device and layer (K KV heads of dim D, local rows t = T/P, b = bytes/elem):
  forward:  (P-1) sends of K and V:        2 (P-1) B t K D b bytes
  backward: (P-1) sends of K, V + P sends of dK, dV (float32)
Compute per step is ~4 B t^2 H D FLOPs (half that for zigzag causal), so the transfer hides once
t is large enough: the FLOP/byte ratio grows linearly with t and with H/K.
Constraints: T divisible by P (by 2P for causal zigzag); no sliding window (use Ulysses).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from jaxturbo.errors import UserError
from pallas_kernels import attention, attention_backward
from pallas_kernels.api import cudnn_lse_supported

Layout = Literal["zigzag", "contiguous"]
LAYOUTS = ("zigzag", "contiguous")

# Block kinds: what a query block does with the K/V block it holds at one step.
_SKIP, _FULL, _CAUSAL, _ZZ_LOWER, _ZZ_UPPER = range(5)


def check_ring(
    *, seq_len: int, ring_size: int, causal: bool, layout: str, sliding_window: int | None = None
) -> None:
    """Raise UserError unless ring attention supports this case (global `seq_len`)."""
    if layout not in LAYOUTS:
        raise UserError(f"ring layout {layout!r} is unknown; choose one of {', '.join(LAYOUTS)}")
    if sliding_window is not None:
        raise UserError(
            "ring attention does not support sliding_window; use mode 'ulysses' "
            "(or 'none') for sliding-window attention"
        )
    chunks = 2 * ring_size if (causal and layout == "zigzag") else ring_size
    if seq_len % chunks:
        why = (
            f"2 x ring size {ring_size} (zigzag causal)"
            if chunks != ring_size
            else f"ring size {ring_size}"
        )
        raise UserError(
            f"sequence length {seq_len} is not divisible by {chunks} = {why}; pad the sequence "
            f"to a multiple of {chunks} (e.g. {-(-seq_len // chunks) * chunks})"
        )


@dataclasses.dataclass(frozen=True)
class _Cfg:
    axis: str
    size: int
    causal: bool
    layout: str
    scale: float | None
    softcap: float | None
    implementation: str


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    axis_name: str,
    causal: bool = False,
    layout: Layout = "zigzag",
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """Ring attention of this device's rows; call inside `shard_map` over `axis_name`.

    Args:
      q: [batch, seq/P, heads, head_dim]; k, v: [batch, seq/P, kv_heads, head_dim], the rows of
        this device in `layout` order (for causal "zigzag": chunks i and 2P-1-i).
      segment_ids: [batch, seq/P] int, same rows as q (packed sequences); keys carry their own.
    Returns:
      [batch, seq/P, heads, head_dim] in q.dtype, the same rows as q.
    """
    size = lax.axis_size(axis_name)
    check_ring(seq_len=q.shape[1] * size, ring_size=size, causal=causal, layout=layout)
    if (
        implementation == "auto"
        and jax.devices()[0].platform == "gpu"
        and cudnn_lse_supported(q, k, causal=causal, segment_ids=segment_ids, softcap=softcap)
    ):
        # The ring owns its backward, so cuDNN's lse forward (whose lse is not differentiable)
        # is safe here, unlike in `attention(..., return_lse=True)`'s "auto".
        implementation = "cudnn"
    cfg = _Cfg(axis_name, size, causal, layout, scale, softcap, implementation)
    return _ring(cfg, q, k, v, segment_ids)


# ---------------------------------------------------------------------------------- schedule


def _step_kind(cfg: _Cfg, step: int, q_seg, kv_seg) -> int | jax.Array:
    """Block kind at `step` on this device (static int when known at trace time)."""
    if step == 0:  # own block: the diagonal
        return _CAUSAL if cfg.causal else _FULL
    me = lax.axis_index(cfg.axis)
    if not cfg.causal:
        kind = jnp.int32(_FULL)
    elif cfg.layout == "contiguous":  # the block comes from device me - step
        kind = jnp.where(step <= me, _FULL, _SKIP)
    else:
        kind = jnp.where(step <= me, _ZZ_LOWER, _ZZ_UPPER)
    if q_seg is None:
        return kind
    # Skip blocks where no query shares a segment with any key (common with packed documents).
    t = q_seg.shape[1]
    eq = q_seg[:, :, None] == kv_seg[:, None, :]
    seen = jnp.select(
        [kind == _FULL, kind == _ZZ_LOWER, kind == _ZZ_UPPER],
        [jnp.any(eq), jnp.any(eq[:, :, : t // 2]), jnp.any(eq[:, t // 2 :, :])],
        False,
    )
    return jnp.where(seen, kind, _SKIP)


def _dispatch(kind, branches: dict, *operands):
    """Run branches[kind]; `lax.switch` when the kind is only known at run time."""
    if isinstance(kind, int):
        return branches[kind](*operands)
    if len(branches) == 1:
        return next(iter(branches.values()))(*operands)
    order = sorted(branches)
    index = jnp.searchsorted(jnp.asarray(order), kind)
    return lax.switch(index, [branches[o] for o in order], *operands)


def _reachable(cfg: _Cfg, kind, has_seg: bool, branches: dict) -> dict:
    """The branches a run-time `kind` can take in this configuration (only those compile)."""
    if isinstance(kind, int):
        return branches
    if not cfg.causal:
        keep = {_FULL}
    elif cfg.layout == "contiguous":
        keep = {_FULL, _SKIP}
    else:
        keep = {_ZZ_LOWER, _ZZ_UPPER}
    if has_seg:
        keep.add(_SKIP)
    return {kk: f for kk, f in branches.items() if kk in keep}


def _rows_like(x: jax.Array, value: float) -> jax.Array:
    """float32 [B, H, T] filled with `value`, for x [B, T, H, D]; `full_like` keeps x's
    varying-axes type, so switch branches agree under shard_map's check_vma."""
    return jnp.swapaxes(jnp.full_like(x[..., 0], value, dtype=jnp.float32), 1, 2)


def _halves(x, axis=1):
    n = x.shape[axis] // 2
    return lax.slice_in_dim(x, 0, n, axis=axis), lax.slice_in_dim(x, n, 2 * n, axis=axis)


def _seg_half(seg, which):
    return None if seg is None else _halves(seg)[which]


# ----------------------------------------------------------------------------------- forward


def _block_fwd(cfg: _Cfg, kind, q, k, v, q_seg, kv_seg):
    """(out float32 [B,T,H,D], lse [B,H,T]) of q against one K/V block; skipped rows get -inf."""
    b, t, h, d = q.shape
    attn = functools.partial(
        attention,
        scale=cfg.scale,
        softcap=cfg.softcap,
        return_lse=True,
        implementation=cfg.implementation,
    )

    def run(qq, kk, vv, qs, ks, causal):
        o, l = attn(
            qq, kk, vv, causal=causal, segment_ids=qs, kv_segment_ids=None if qs is None else ks
        )
        return o.astype(jnp.float32), l

    def skip(q, k, v, qs, ks):
        return jnp.zeros_like(q, jnp.float32), _rows_like(q, -jnp.inf)

    def lower(q, k, v, qs, ks):  # all queries, first half of the keys
        k0, v0 = _halves(k)[0], _halves(v)[0]
        return run(q, k0, v0, qs, _seg_half(ks, 0), False)

    def upper(q, k, v, qs, ks):  # second half of the queries, all keys
        o, l = run(_halves(q)[1], k, v, _seg_half(qs, 1), ks, False)
        o = jnp.concatenate([jnp.zeros_like(o), o], axis=1)
        l = jnp.concatenate([jnp.full_like(l, -jnp.inf), l], axis=2)
        return o, l

    branches = {
        _SKIP: skip,
        _FULL: lambda q, k, v, qs, ks: run(q, k, v, qs, ks, False),
        _CAUSAL: lambda q, k, v, qs, ks: run(q, k, v, qs, ks, True),
        _ZZ_LOWER: lower,
        _ZZ_UPPER: upper,
    }
    return _dispatch(
        kind, _reachable(cfg, kind, q_seg is not None, branches), q, k, v, q_seg, kv_seg
    )


def _merge(o, lse, ob, lb):
    """Combine two normalised partial results by their log-sum-exp (safe for -inf rows)."""
    new = jnp.logaddexp(lse, lb)
    ref = jnp.where(jnp.isfinite(new), new, 0.0)
    w_old = jnp.exp(lse - ref)  # [B,H,T]; exp(-inf) = 0 for empty rows
    w_new = jnp.exp(lb - ref)
    tr = lambda w: jnp.swapaxes(w, 1, 2)[..., None]  # -> [B,T,H,1]
    return o * tr(w_old) + ob * tr(w_new), new


def _rotate(tree, cfg: _Cfg):
    """Send to the right neighbour on the ring (device i -> i+1)."""
    perm = [(d, (d + 1) % cfg.size) for d in range(cfg.size)]
    return jax.tree.map(lambda x: lax.ppermute(x, cfg.axis, perm), tree)


def _ring_fwd_impl(cfg: _Cfg, q, k, v, seg):
    b, t, h, d = q.shape
    o = jnp.zeros_like(q, jnp.float32)
    lse = _rows_like(q, -jnp.inf)
    block = (k, v, seg)
    for step in range(cfg.size):
        # Issue the next block's transfer first: it only depends on the block we hold, so XLA
        # can run it while this step's attention computes.
        nxt = _rotate(block, cfg) if step + 1 < cfg.size else None
        kb, vb, kv_seg = block
        kind = _step_kind(cfg, step, seg, kv_seg)
        ob, lb = _block_fwd(cfg, kind, q, kb, vb, seg, kv_seg)
        o, lse = _merge(o, lse, ob, lb)
        block = nxt
    return o.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg: _Cfg, q, k, v, seg):
    return _ring_fwd_impl(cfg, q, k, v, seg)[0]


def _ring_fwd(cfg: _Cfg, q, k, v, seg):
    out, lse = _ring_fwd_impl(cfg, q, k, v, seg)
    return out, (q, k, v, seg, out, lse)


# ---------------------------------------------------------------------------------- backward


def _block_bwd(cfg: _Cfg, kind, q, k, v, q_seg, kv_seg, do, o, lse):
    """(dq [B,T,H,D], dk, dv [B,S,K,D]) float32 of one block; zeros where the block is unused."""

    def bwd(q, k, v, do, o, lse, *, causal, q_seg, kv_seg):
        grads = attention_backward(
            q,
            k,
            v,
            o,
            lse,
            do,
            causal=causal,
            scale=cfg.scale,
            segment_ids=q_seg,
            kv_segment_ids=kv_seg,
            softcap=cfg.softcap,
            implementation=cfg.implementation,
        )
        # Kernels return the inputs' dtype; switch branches and accumulators are float32.
        return tuple(g.astype(jnp.float32) for g in grads)

    zq = lambda: jnp.zeros_like(q, jnp.float32)
    zk = lambda: jnp.zeros_like(k, jnp.float32)

    def full(causal):
        def f(q, k, v, qs, ks, do, o, lse):
            return bwd(
                q, k, v, do, o, lse, causal=causal, q_seg=qs, kv_seg=None if qs is None else ks
            )

        return f

    def skip(q, k, v, qs, ks, do, o, lse):
        return zq(), zk(), zk()

    def lower(q, k, v, qs, ks, do, o, lse):
        dq, dk, dv = bwd(
            q,
            _halves(k)[0],
            _halves(v)[0],
            do,
            o,
            lse,
            causal=False,
            q_seg=qs,
            kv_seg=_seg_half(ks, 0),
        )
        pad = lambda x: jnp.concatenate([x, jnp.zeros_like(x)], axis=1)
        return dq, pad(dk), pad(dv)

    def upper(q, k, v, qs, ks, do, o, lse):
        h2 = lambda x: _halves(x)[1]
        dq, dk, dv = bwd(
            h2(q),
            k,
            v,
            h2(do),
            h2(o),
            _halves(lse, axis=2)[1],
            causal=False,
            q_seg=_seg_half(qs, 1),
            kv_seg=ks,
        )
        return jnp.concatenate([jnp.zeros_like(dq), dq], axis=1), dk, dv

    branches = {
        _SKIP: skip,
        _FULL: full(False),
        _CAUSAL: full(True),
        _ZZ_LOWER: lower,
        _ZZ_UPPER: upper,
    }
    return _dispatch(
        kind, _reachable(cfg, kind, q_seg is not None, branches), q, k, v, q_seg, kv_seg, do, o, lse
    )


def _ring_bwd(cfg: _Cfg, res, do):
    q, k, v, seg, o, lse = res
    dq = jnp.zeros_like(q, jnp.float32)
    dk = jnp.zeros_like(k, jnp.float32)
    dv = jnp.zeros_like(v, jnp.float32)
    block = (k, v, seg)
    for step in range(cfg.size):
        nxt = _rotate(block, cfg) if step + 1 < cfg.size else None
        kb, vb, kv_seg = block
        kind = _step_kind(cfg, step, seg, kv_seg)
        bq, bk, bv = _block_bwd(cfg, kind, q, kb, vb, seg, kv_seg, do, o, lse)
        dq = dq + bq
        # dK/dV accumulators travel with their block; the P-th send brings them home.
        dk, dv = _rotate((dk + bk, dv + bv), cfg)
        block = nxt
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)
