"""Public entry points: `attention` (prefill/training) and `decode_attention` (generation).

`implementation` picks the backend; "auto" chooses the fastest correct one for the platform and
case.  Only "xla" (the pure-jnp reference, which XLA compiles) exists so far; kernels register
themselves here as they land.
"""

from __future__ import annotations

from typing import Literal

import jax

from pallas_kernels.decode_attention.reference import decode_attention_reference
from pallas_kernels.flash_attention.reference import attention_reference

Implementation = Literal["auto", "pallas", "cudnn", "xla"]


def attention(
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
    implementation: Implementation = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Softmax attention, q [B, T, H, D], k/v [B, S, K, D] -> [B, T, H, D] (and lse [B, H, T]).

    See `flash_attention.reference.attention_reference` for the exact semantics every
    implementation must reproduce.
    """
    if implementation in ("auto", "xla"):
        return attention_reference(
            q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
            sliding_window=sliding_window, scale=scale, softcap=softcap, return_lse=return_lse)
    raise ValueError(f"attention implementation {implementation!r} is not available; use 'xla' or 'auto'")


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    implementation: Implementation = "auto",
) -> jax.Array:
    """One query per sequence over its cache: q [B, H, D], caches [B, S, K, D], lengths [B]."""
    if implementation in ("auto", "xla"):
        return decode_attention_reference(q, k_cache, v_cache, lengths, scale=scale,
                                          softcap=softcap, sliding_window=sliding_window)
    raise ValueError(f"decode attention implementation {implementation!r} is not available; use 'xla' or 'auto'")
