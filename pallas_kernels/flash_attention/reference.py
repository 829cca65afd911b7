"""Pure-jnp attention: the reference every attention kernel is tested against.

Shapes: q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads, head_dim].  GQA/MQA
groups the query heads per KV head instead of repeating K/V (the memory the kernels save).
Scores and softmax run in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool = False,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """Boolean mask [batch or 1, q_len, kv_len], True where query i may attend key j.

    Causal alignment is bottom-right: query i sits at absolute position i + (kv_len - q_len).
    `sliding_window=w` keeps keys with pos_q - w <= pos_k (w keys to the left plus itself).
    Segment ids (packed sequences) restrict attention to keys of the same segment.
    """
    qi = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    kj = jnp.arange(kv_len)[None, :]
    mask = jnp.ones((q_len, kv_len), dtype=bool)
    if causal:
        mask &= kj <= qi
    if sliding_window is not None:
        mask &= kj >= qi - sliding_window
    mask = mask[None]
    if q_segment_ids is not None:
        kv_seg = q_segment_ids if kv_segment_ids is None else kv_segment_ids
        mask = mask & (q_segment_ids[:, :, None] == kv_seg[:, None, :])
    return mask


def attention_reference(
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
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Softmax attention.

    Args:
      q: [B, T, H, D]; k, v: [B, S, K, D] with H % K == 0.
      segment_ids: [B, T] query segment ids (and key ids too unless `kv_segment_ids` [B, S]).
      softcap: logits become softcap * tanh(logits / softcap) (Gemma-2 style).
    Returns:
      out [B, T, H, D] in q.dtype; with `return_lse`, also lse [B, H, T] float32 (the natural
      log-sum-exp of the scaled, masked logits; -inf for rows with no visible key, whose output
      is 0).
    """
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    if h % kh:
        raise ValueError(f"kv heads {kh} must divide query heads {h}")
    g = h // kh
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, t, kh, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    mask = attention_mask(
        t,
        s,
        causal=causal,
        q_segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        sliding_window=sliding_window,
    )
    logits = jnp.where(mask[:, None, None], logits, NEG_INF)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m_safe)
    l = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bskd->btkgd", p / jnp.where(l == 0, 1.0, l), v.astype(jnp.float32))
    out = out.reshape(b, t, h, d).astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.where(l[..., 0] > 0, jnp.log(l[..., 0]) + m_safe[..., 0], NEG_INF)  # [B,K,G,T]
    return out, lse.reshape(b, h, t)


def attention_backward_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    dout: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """FlashAttention-2 backward from a saved output and log-sum-exp (no lse cotangent).

    Args:
      q, out, dout: [B, T, H, D]; k, v: [B, S, K, D]; lse: [B, H, T] float32 as returned by
        `attention_reference(..., return_lse=True)`.
    Returns:
      float32 (dq [B, T, H, D], dk [B, S, K, D], dv [B, S, K, D]).

    `out` and `lse` need not come from this (q, k, v): given the output and lse of attention
    over a *longer* key sequence of which k/v is one block (ring attention), P = exp(S - lse) is
    this block's share of the full softmax and delta = rowsum(dout * out) is the full row's, so
    the per-block gradients sum to the gradient of the whole attention.  Rows with lse = -inf
    (no visible key anywhere) get zero gradient.
    """
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = h // kh
    scale = d**-0.5 if scale is None else scale
    f32 = lambda x: x.astype(jnp.float32)
    qg = f32(q).reshape(b, t, kh, g, d)
    dog = f32(dout).reshape(b, t, kh, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, f32(k)) * scale
    if softcap is not None:
        th = jnp.tanh(logits / softcap)
        logits = softcap * th
    mask = attention_mask(
        t,
        s,
        causal=causal,
        q_segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        sliding_window=sliding_window,
    )
    lse_g = lse.reshape(b, kh, g, t)[..., None]
    ok = mask[:, None, None] & jnp.isfinite(lse_g)
    p = jnp.where(ok, jnp.exp(logits - jnp.where(jnp.isfinite(lse_g), lse_g, 0.0)), 0.0)
    dv = jnp.einsum("bkgts,btkgd->bskd", p, dog)
    dp = jnp.einsum("btkgd,bskd->bkgts", dog, f32(v))
    delta = jnp.einsum("btkgd,btkgd->bkgt", dog, f32(out).reshape(b, t, kh, g, d))[..., None]
    ds = p * (dp - delta)
    if softcap is not None:
        ds = ds * (1.0 - th * th)
    ds = ds * scale
    dq = jnp.einsum("bkgts,bskd->btkgd", ds, f32(k)).reshape(b, t, h, d)
    dk = jnp.einsum("bkgts,btkgd->bskd", ds, qg)
    return dq, dk, dv
