"""Pieces every flash-attention implementation shares: the call description (`AttentionCall`)
and its static mask description, the in-block mask, block skipping, and padding to whole blocks.

Kernels work on whole blocks; sequences that are not a multiple of the block are padded here and
the padded keys masked in the kernel (the padded query rows are computed and dropped).  Which
key blocks a query block can see (causal, sliding window, segment ids) is worked out once in
plain jnp before the kernel, as a [lo, hi) block range per query block (and per key block for
the dK/dV pass), so the kernels loop only over blocks that hold at least one visible key.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static description of one attention call (hashable: it is a jit/custom_vjp static arg).

    Positions: query row i sits at absolute position i + offset, offset = kv_len - q_len
    (bottom-right causal alignment, as in `attention_reference`).
    """

    q_len: int
    kv_len: int
    causal: bool
    sliding_window: int | None
    scale: float
    softcap: float | None
    has_segments: bool

    @property
    def offset(self) -> int:
        return self.kv_len - self.q_len


def visible(
    spec: MaskSpec,
    q_pos: jax.Array,
    k_pos: jax.Array,
    q_seg: jax.Array | None,
    k_seg: jax.Array | None,
) -> jax.Array:
    """In-block mask [bq, bk] from query rows q_pos [bq, 1] and key positions k_pos [1, bk].

    Arguments are 2D so that TPU kernels (which want 2D iotas) can share this.  q_pos are query
    *rows*; the causal offset is added here.  Padded keys (k_pos >= kv_len) are always masked.
    Segment ids: q_seg [bq, 1], k_seg [1, bk].
    """
    qp = q_pos + spec.offset
    kp = k_pos
    mask = kp < spec.kv_len
    if spec.causal:
        mask = mask & (kp <= qp)
    if spec.sliding_window is not None:
        mask = mask & (kp >= qp - spec.sliding_window)
    if spec.has_segments:
        mask = mask & (q_seg == k_seg)
    return mask


def apply_softcap(spec: MaskSpec, s: jax.Array) -> jax.Array:
    """Scaled logits -> soft-capped logits (identity without softcap)."""
    if spec.softcap is None:
        return s
    return spec.softcap * jnp.tanh(s / spec.softcap)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pad_seq(x: jax.Array, length: int, axis: int = 1, mode: str = "constant") -> jax.Array:
    """Pads axis `axis` of x up to `length` (no copy when already that long)."""
    if x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)


def _block_bounds(spec: MaskSpec, block_q: int, block_k: int):
    """Per query block [lo, hi] absolute positions and per key block first index and the
    block's unclamped last index (past kv_len when the last block is padded)."""
    nq = -(-spec.q_len // block_q)
    nk = -(-spec.kv_len // block_k)
    qi = jnp.arange(nq)
    kj = jnp.arange(nk)
    q_lo = qi * block_q + spec.offset
    q_hi = jnp.minimum((qi + 1) * block_q, spec.q_len) - 1 + spec.offset
    return q_lo, q_hi, kj * block_k, (kj + 1) * block_k - 1


def _segment_block_minmax(seg: jax.Array, length: int, block: int):
    """Smallest and largest segment id of each block, [B, n_blocks] each (edge-padded)."""
    n = -(-length // block)
    s = pad_seq(seg, n * block, axis=1, mode="edge").reshape(seg.shape[0], n, block)
    return s.min(-1), s.max(-1)


def block_visibility(
    spec: MaskSpec,
    block_q: int,
    block_k: int,
    q_seg: jax.Array | None,
    k_seg: jax.Array | None,
    full: bool = False,
) -> jax.Array:
    """Conservative block mask [B or 1, nq, nk]: True where the block pair may hold a visible key.

    Segment ids enter through each block's [min, max] id interval, so packed (sorted) documents
    skip every block pair that straddles no common document.  With `full=True` it is instead
    True where *every* (query, key) pair of the block is visible, so the kernel can skip the
    in-block mask there.
    """
    if full:
        return _block_full(spec, block_q, block_k, q_seg, k_seg)
    q_lo, q_hi, k_lo, k_end = _block_bounds(spec, block_q, block_k)
    k_hi = jnp.minimum(k_end, spec.kv_len - 1)
    vis = jnp.ones((q_lo.shape[0], k_lo.shape[0]), dtype=bool)
    if spec.causal:
        vis &= k_lo[None, :] <= q_hi[:, None]
    if spec.sliding_window is not None:
        vis &= k_hi[None, :] >= q_lo[:, None] - spec.sliding_window
    vis = vis[None]
    if spec.has_segments:
        qmin, qmax = _segment_block_minmax(q_seg, spec.q_len, block_q)
        kmin, kmax = _segment_block_minmax(k_seg, spec.kv_len, block_k)
        vis = vis & (kmin[:, None, :] <= qmax[:, :, None]) & (kmax[:, None, :] >= qmin[:, :, None])
    return vis


def _block_full(spec, block_q, block_k, q_seg, k_seg):
    q_lo, q_hi, k_lo, k_hi = _block_bounds(spec, block_q, block_k)
    full = jnp.broadcast_to(
        k_hi[None, :] < spec.kv_len, (q_lo.shape[0], k_lo.shape[0])
    )  # no padded keys
    if spec.causal:
        full &= k_hi[None, :] <= q_lo[:, None]
    if spec.sliding_window is not None:
        full &= k_lo[None, :] >= q_hi[:, None] - spec.sliding_window
    full = full[None]
    if spec.has_segments:
        qmin, qmax = _segment_block_minmax(q_seg, spec.q_len, block_q)
        kmin, kmax = _segment_block_minmax(k_seg, spec.kv_len, block_k)
        same = (
            (qmin == qmax)[:, :, None]
            & (kmin == kmax)[:, None, :]
            & (qmin[:, :, None] == kmin[:, None, :])
        )
        full = full & same
    return full


def split_ranges(vis: jax.Array, full: jax.Array, axis: int):
    """(lo, flo, fhi, hi) along `axis`: [lo, hi) holds every visible block and [flo, fhi) a run
    of fully visible ones inside it, so kernels mask only [lo, flo) and [fhi, hi)."""
    lo, hi = block_ranges(vis, axis)
    n = vis.shape[axis]
    full = jnp.broadcast_to(full, vis.shape)
    idx = jnp.arange(n, dtype=jnp.int32).reshape([n if a == axis else 1 for a in range(vis.ndim)])
    flo = jnp.min(jnp.where(full, idx, n), axis=axis).astype(jnp.int32)
    run = jnp.where(idx >= jnp.expand_dims(flo, axis), full, True)
    fhi = jnp.sum(jnp.cumprod(run.astype(jnp.int32), axis=axis), axis=axis).astype(jnp.int32)
    flo = jnp.clip(flo, lo, hi)
    fhi = jnp.clip(fhi, flo, hi)
    return lo, flo, fhi, hi


def block_ranges(vis: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """[lo, hi) of the True entries of `vis` along `axis` (int32; lo == hi when none)."""
    n = vis.shape[axis]
    idx = jnp.arange(n, dtype=jnp.int32)
    shape = [1] * vis.ndim
    shape[axis] = n
    idx = idx.reshape(shape)
    lo = jnp.min(jnp.where(vis, idx, n), axis=axis)
    hi = jnp.max(jnp.where(vis, idx + 1, 0), axis=axis)
    return lo.astype(jnp.int32), jnp.maximum(hi, lo).astype(jnp.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionCall:
    """One attention call as the public function received it; every backend takes this.

    q [B, T, H, D], k/v [B, S, K, D] (H % K == 0); segment_ids [B, T] (the keys' too unless
    kv_segment_ids [B, S]); the options as in `reference.attention_reference`."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    causal: bool = False
    segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None
    sliding_window: int | None = None
    scale: float | None = None
    softcap: float | None = None
    return_lse: bool = False

    def options(self) -> dict:
        """The keyword options of `reference.attention_reference` (return_lse aside)."""
        return dict(
            causal=self.causal,
            segment_ids=self.segment_ids,
            kv_segment_ids=self.kv_segment_ids,
            sliding_window=self.sliding_window,
            scale=self.scale,
            softcap=self.softcap,
        )

    def check(self) -> None:
        """Clear errors before tracing a kernel."""
        q, k, v = self.q, self.k, self.v
        if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
            raise ValueError(
                f"expected q, k, v of rank 4 [batch, seq, heads, head_dim]; got "
                f"{q.shape}, {k.shape}, {v.shape}"
            )
        if k.shape != v.shape:
            raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape")
        if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
            raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch and head_dim")
        if q.shape[2] % k.shape[2]:
            raise ValueError(
                f"kv heads {k.shape[2]} must divide query heads {q.shape[2]}; "
                f"choose kv heads from the divisors of {q.shape[2]}"
            )

    def spec(self) -> MaskSpec:
        """The static mask description of the call."""
        return MaskSpec(
            q_len=self.q.shape[1],
            kv_len=self.k.shape[1],
            causal=self.causal,
            sliding_window=self.sliding_window,
            scale=float(self.q.shape[-1] ** -0.5 if self.scale is None else self.scale),
            softcap=self.softcap,
            has_segments=self.segment_ids is not None,
        )

    @property
    def kv_seg(self) -> jax.Array | None:
        """The keys' segment ids (the queries' by default)."""
        if self.segment_ids is None:
            return None
        return self.segment_ids if self.kv_segment_ids is None else self.kv_segment_ids


def flash_with_vjp(forward, backward):
    """A differentiable flash attention from one backend's kernels.

    forward(q, k, v, q_seg, k_seg, spec, cfg, interpret) -> (out, lse);
    backward(q, k, v, q_seg, k_seg, out, lse, d_out, d_lse, spec, cfg, interpret) -> (dq, dk, dv).
    The returned function has forward's signature; spec, cfg and interpret are static.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
    def flash(q, k, v, q_seg, k_seg, spec, cfg, interpret):
        return forward(q, k, v, q_seg, k_seg, spec, cfg, interpret)

    def flash_fwd(q, k, v, q_seg, k_seg, spec, cfg, interpret):
        o, lse = forward(q, k, v, q_seg, k_seg, spec, cfg, interpret)
        return (o, lse), (q, k, v, q_seg, k_seg, o, lse)

    def flash_bwd(spec, cfg, interpret, res, cts):
        q, k, v, q_seg, k_seg, o, lse = res
        do, dlse = cts
        dq, dk, dv = backward(q, k, v, q_seg, k_seg, o, lse, do, dlse, spec, cfg, interpret)
        return dq, dk, dv, None, None

    flash.defvjp(flash_fwd, flash_bwd)
    return flash


def run_forward(flash, call: AttentionCall, cfg, interpret):
    """One backend's differentiable `flash` (from `flash_with_vjp`) on `call`: out, and lse
    [B, H, T] with `call.return_lse`."""
    call.check()
    out, lse = flash(
        call.q, call.k, call.v, call.segment_ids, call.kv_seg, call.spec(), cfg, interpret
    )
    return (out, lse) if call.return_lse else out


def run_backward(backward, call: AttentionCall, out, lse, dout, cfg, interpret):
    """One backend's `backward` called directly from a saved (out, lse), no lse cotangent.

    For callers that own the forward (ring attention: out/lse are those of the whole row, k/v
    one block of it); `backward` has the signature documented in `flash_with_vjp`.
    """
    call.check()
    q = call.q
    return backward(
        q,
        call.k,
        call.v,
        call.segment_ids,
        call.kv_seg,
        out.astype(q.dtype),
        lse,
        dout.astype(q.dtype),
        None,
        call.spec(),
        cfg,
        interpret,
    )
