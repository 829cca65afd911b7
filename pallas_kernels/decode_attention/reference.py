"""Pure-jnp decode attention over a KV cache: the reference for the decode kernels.

One new query per sequence attends to the first `lengths[b]` cache slots of sequence b.
`decode_append_reference` is one whole decode step's attention: the new token's key (rotated)
and value are written at slot `lengths[b]`, then the query attends to slots [0, lengths[b]].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention.reference import NEG_INF


def decode_attention_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """Attention of one query token per sequence over its cache.

    Args:
      q: [B, H, D]; k_cache, v_cache: [B, S, K, D]; lengths: [B] int, valid slots per sequence
        (the query itself sits at slot lengths[b] - 1 and is already in the cache).
      sliding_window: keep slots j >= lengths[b] - 1 - sliding_window.
    Returns:
      [B, H, D] in q.dtype.
    """
    b, h, d = q.shape
    s, kh = k_cache.shape[1], k_cache.shape[2]
    g = h // kh
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, kh, g, d)
    logits = jnp.einsum("bkgd,bskd->bkgs", qg, k_cache, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    j = jnp.arange(s)[None, :]
    valid = j < lengths[:, None]
    if sliding_window is not None:
        valid &= j >= lengths[:, None] - 1 - sliding_window
    logits = jnp.where(valid[:, None, None, :], logits, NEG_INF)
    p = jax.nn.softmax(logits, axis=-1)
    p = jnp.where(valid[:, None, None, :], p, 0.0)
    out = jnp.einsum("bkgs,bskd->bkgd", p, v_cache.astype(jnp.float32))
    return out.reshape(b, h, d).astype(q.dtype)


def mla_decode_reference(
    q_latent: jax.Array,
    q_rope: jax.Array,
    latent_cache: jax.Array,
    rope_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
) -> jax.Array:
    """Multi-head latent attention (DeepSeek-V2, 2024) decode with the queries absorbed.

    With W_UK absorbed into the query (q_latent = q_nope @ W_UK per head) and W_UV applied after
    (out = out_latent @ W_UV), every head attends over the one shared latent cache:
    score_hj = scale * (q_latent_h . c_j + q_rope_h . k_rope_j), out_latent_h = sum_j p_hj c_j.

    Args:
      q_latent: [B, H, R] (R = kv_lora_rank); q_rope: [B, H, Dr] (Dr = qk_rope_head_dim).
      latent_cache: [B, S, R] (normalised c_kv); rope_cache: [B, S, Dr] (roped shared key).
      lengths: [B] valid slots per sequence.
      scale: softmax scale, 1/sqrt(qk_nope_head_dim + qk_rope_head_dim) in DeepSeek models.
    Returns:
      out_latent [B, H, R] in q_latent.dtype.
    """
    s = latent_cache.shape[1]
    logits = (
        jnp.einsum("bhr,bsr->bhs", q_latent, latent_cache, preferred_element_type=jnp.float32)
        + jnp.einsum("bhr,bsr->bhs", q_rope, rope_cache, preferred_element_type=jnp.float32)
    ).astype(jnp.float32) * scale
    valid = jnp.arange(s)[None, None, :] < lengths[:, None, None]
    logits = jnp.where(valid, logits, NEG_INF)
    p = jnp.where(valid, jax.nn.softmax(logits, axis=-1), 0.0)
    out = jnp.einsum("bhs,bsr->bhr", p, latent_cache.astype(jnp.float32))
    return out.astype(q_latent.dtype)


def rope_rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding of x [..., D] by cos, sin (float32, broadcastable to x), in the HF
    half-split layout (`rotate_half`: the two halves of a head rotate together); float32 math,
    result in x.dtype."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rot * sin).astype(x.dtype)


def append_to_cache(
    k_new: jax.Array,
    v_new: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    layer: jax.Array | int | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Write each row's new key (rotated by rope = (cos, sin) [B, D] if given) and value
    [B, K, D] at slot lengths[b] of caches [B, S, K, D] (or layer `layer` of [L, B, S, K, D]).
    A slot past the cache is dropped."""
    if rope is not None:
        k_new = rope_rotate(k_new, rope[0][:, None, :], rope[1][:, None, :])
    rows = jnp.arange(k_new.shape[0])
    at = (rows, lengths) if layer is None else (layer, rows, lengths)
    return (
        k_cache.at[at].set(k_new.astype(k_cache.dtype)),
        v_cache.at[at].set(v_new.astype(v_cache.dtype)),
    )


def decode_append_reference(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    rope: tuple[jax.Array, jax.Array] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step's attention: append, then attend.

    Args:
      q: [B, H, D], already rotated; k_new, v_new: [B, K, D], the new token's key (rotated here
        by rope = (cos, sin), each [B, D] float32, when given) and value.
      k_cache, v_cache: [B, S, K, D]; lengths: [B] slots already filled (the new token's slot).
    Returns:
      out [B, H, D] over slots [0, lengths[b]], and the caches with slot lengths[b] written.
    """
    k_cache, v_cache = append_to_cache(k_new, v_new, k_cache, v_cache, lengths, rope=rope)
    out = decode_attention_reference(
        q,
        k_cache,
        v_cache,
        lengths + 1,
        scale=scale,
        softcap=softcap,
        sliding_window=sliding_window,
    )
    return out, k_cache, v_cache
