"""Building blocks shared by every model family: RMSNorm, SwiGLU MLP, linear layers.

Weights keep the HF orientation [out_features, in_features]; `linear` contracts the last axis
of x with the last axis of W, which is what the name map to HF checkpoints needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, statistics in float32 (as HF Llama/Qwen do)."""
    return weight * (x.astype(jnp.float32) * rms_scale(x, eps)).astype(x.dtype)


def sum_squares(x: jax.Array) -> jax.Array:
    """sum(x^2) over the last axis, float32, kept as [..., 1]."""
    xf = x.astype(jnp.float32)
    return jnp.sum(xf * xf, axis=-1, keepdims=True)


def rms_scale(x: jax.Array, eps: float, ss: jax.Array | None = None) -> jax.Array:
    """RMSNorm's per-row factor rsqrt(mean(x^2) + eps) [..., 1], float32 (ss: x's
    `sum_squares`, if already computed).  With the norm's gain folded into the next projection
    (`jaxturbo.models.fused.fold_norms`), that projection's output times this factor is the
    projection of the normed input."""
    ss = sum_squares(x) if ss is None else ss
    return jax.lax.rsqrt(ss / x.shape[-1] + eps)


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """x [..., in] @ w[out, in]^T (+ b [out]) -> [..., out] in x's dtype.

    No `preferred_element_type=float32`: the GPU/TPU matrix units accumulate bf16 products in
    float32 anyway, and on an H100 asking for a float32 result turns a batch-1 decode GEMV into a
    4x slower kernel (553 vs 2257 GB/s; experiments/generate/NOTES.md).
    """
    y = jnp.einsum("...i,oi->...o", x, w)
    return y if b is None else y + b.astype(y.dtype)


def swiglu_mlp(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """Llama MLP: down(silu(gate(x)) * up(x)).  Column-parallel gate/up, row-parallel down."""
    return swiglu_down(linear(x, gate), linear(x, up), down)


def swiglu_down(gate_out: jax.Array, up_out: jax.Array, down: jax.Array) -> jax.Array:
    """The MLP after its gate and up projections: down(silu(gate_out) * up_out)."""
    return linear(jax.nn.silu(gate_out) * up_out, down)
