"""`decode_attention`, `decode_attention_append` (a whole decode step's attention: the cache
write included) and `mla_decode_attention` (generation), dispatched by `registry`.

Backends, in "auto"'s order: "pallas_triton" (any GPU; interpret mode on CPU), "mosaic_tpu"
(TPU; TPU interpret mode on CPU), "xla" (the pure-jnp reference).  Every one takes every call
(any R and Dr for MLA: CARE conversions give ranks like 160 or 187).  The decode step:
Pallas-Triton writes the new key and value in its attention kernel where head_dim is a power of
two (and logs a warning where it is not: the cache is then written by XLA, four more small
kernels per layer); the other backends write the cache with XLA, then attend.
"""

from __future__ import annotations

import dataclasses
import logging

import jax

from pallas_kernels import registry
from pallas_kernels.decode_attention.common import DecodeCall, MLADecodeCall, NewToken
from pallas_kernels.decode_attention.reference import (
    append_to_cache,
    decode_attention_reference,
    mla_decode_reference,
)


def _kernel(name: str, fn: str):
    return registry.kernel(f"pallas_kernels.decode_attention.{name}", fn)


def _xla_decode(call: DecodeCall, *, config, interpret):
    k_cache, v_cache = call.layer_caches()
    return decode_attention_reference(call.q, k_cache, v_cache, call.lengths, **call.options())


DECODE = registry.register(
    registry.Op(
        "decode_attention",
        (
            registry.Backend(
                "pallas_triton",
                _kernel("pallas_triton", "decode_attention"),
                platform="gpu",
                pallas=True,
            ),
            registry.Backend(
                "mosaic_tpu", _kernel("mosaic_tpu", "decode_attention"), platform="tpu", pallas=True
            ),
            registry.Backend("xla", _xla_decode),
        ),
    )
)


def _write_then_attend(decode: registry.Backend):
    """A decode step on `decode`'s attention with the cache written by XLA first."""

    def run(call: DecodeCall, *, config, interpret):
        k_new, v_new = call.new.heads(call.k_cache.shape[-2])
        k_cache, v_cache = append_to_cache(
            k_new,
            v_new,
            call.k_cache,
            call.v_cache,
            call.lengths,
            layer=call.layer,
            rope=call.new.rope,
        )
        attend = dataclasses.replace(
            call, k_cache=k_cache, v_cache=v_cache, lengths=call.lengths + 1, new=None
        )
        return decode.run(attend, config=config, interpret=interpret), k_cache, v_cache

    return run


def _fused_append(call: DecodeCall, *, config, interpret):
    """Pallas-Triton's one-kernel step where head_dim is a power of two, else (logged) the
    cache written by XLA before its decode kernel."""
    d = call.head_dim
    if d % 2 == 0 and d & (d - 1) == 0:
        return _fused(call, config=config, interpret=interpret)
    registry.log_choice(
        "decode_attention_append",
        "pallas_triton, cache written by XLA",
        f"head_dim {d} is not a power of two",
        logging.WARNING,
    )
    return _unfused_pallas_triton(call, config=config, interpret=interpret)


_fused = _kernel("pallas_triton", "decode_attention_append")
_unfused_pallas_triton = _write_then_attend(DECODE.backend("pallas_triton"))

DECODE_APPEND = registry.register(
    registry.Op(
        "decode_attention_append",
        tuple(
            dataclasses.replace(
                b, run=_fused_append if b.name == "pallas_triton" else _write_then_attend(b)
            )
            for b in DECODE.backends
        ),
    )
)


def _xla_mla(call: MLADecodeCall, *, config, interpret):
    latent_cache, rope_cache = call.layer_caches()
    return mla_decode_reference(
        call.q_latent, call.q_rope, latent_cache, rope_cache, call.lengths, scale=call.scale
    )


MLA_DECODE = registry.register(
    registry.Op(
        "mla_decode_attention",
        (
            registry.Backend(
                "pallas_triton",
                _kernel("pallas_triton", "mla_decode_attention"),
                platform="gpu",
                pallas=True,
            ),
            registry.Backend(
                "mosaic_tpu",
                _kernel("mosaic_tpu", "mla_decode_attention"),
                platform="tpu",
                pallas=True,
            ),
            registry.Backend("xla", _xla_mla),
        ),
    )
)


# ---- public entry points -----------------------------------------------------------------------


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    layer: jax.Array | int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    implementation: str = "auto",
    interpret: bool | None = None,
    config=None,
) -> jax.Array:
    """One query per sequence over its cache: q [B, H, D], caches [B, S, K, D], lengths [B].

    layer: the caches hold every layer, [L, B, S, K, D], and this layer's is attended to.  The
    kernels read it in place; `cache[layer]` as a kernel argument would cost a copy of the
    layer's cache per call.  See `reference.decode_attention_reference`."""
    call = DecodeCall(
        q,
        k_cache,
        v_cache,
        lengths,
        layer=layer,
        scale=scale,
        softcap=softcap,
        sliding_window=sliding_window,
    )
    return DECODE(call, implementation=implementation, config=config, interpret=interpret)


def decode_attention_append(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    layer: jax.Array | int | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    implementation: str = "auto",
    interpret: bool | None = None,
    config=None,
    k_head_offset: int = 0,
    v_head_offset: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step's attention: the new token's key k_new [B, K, D] (rotated by
    rope = (cos, sin), each [B, D], when given) and value v_new are written at slot lengths[b]
    of the caches ([B, S, K, D], or layer `layer` of [L, B, S, K, D]), then q [B, H, D]
    (already rotated) attends to slots [0, lengths[b]].  Returns (out [B, H, D], k_cache,
    v_cache).  See `reference.decode_append_reference`.

    k_head_offset, v_head_offset: the new keys (values) are heads [off, off + K) of k_new
    (v_new), K the caches' head count: both may be one fused q/k/v projection's output, which
    Pallas-Triton reads in place."""
    new = NewToken(
        k_new, v_new, rope=rope, k_head_offset=k_head_offset, v_head_offset=v_head_offset
    )
    new.check(k_cache.shape[-2])
    call = DecodeCall(
        q,
        k_cache,
        v_cache,
        lengths,
        layer=layer,
        scale=scale,
        softcap=softcap,
        sliding_window=sliding_window,
        new=new,
    )
    return DECODE_APPEND(call, implementation=implementation, config=config, interpret=interpret)


def mla_decode_attention(
    q_latent: jax.Array,
    q_rope: jax.Array,
    latent_cache: jax.Array,
    rope_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    layer: jax.Array | int | None = None,
    implementation: str = "auto",
    interpret: bool | None = None,
    config=None,
) -> jax.Array:
    """MLA decode with absorbed queries: q_latent [B, H, R], q_rope [B, H, Dr],
    latent_cache [B, S, R], rope_cache [B, S, Dr], lengths [B] -> latent output [B, H, R].

    layer: the caches hold every layer ([L, B, S, R], [L, B, S, Dr]); read in place as in
    `decode_attention`.  See `reference.mla_decode_reference`."""
    call = MLADecodeCall(
        q_latent, q_rope, latent_cache, rope_cache, lengths, scale=scale, layer=layer
    )
    return MLA_DECODE(call, implementation=implementation, config=config, interpret=interpret)
