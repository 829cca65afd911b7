"""Building blocks shared by every model family: RMSNorm, SwiGLU MLP, linear layers.

Weights keep the HF orientation [out_features, in_features]; `linear` contracts the last axis
of x with the last axis of W, which is what the name map to HF checkpoints needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, statistics in float32 (as HF Llama/Qwen do)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


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
