"""Building blocks shared by every model family: RMSNorm, SwiGLU MLP, linear layers.

Weights keep the HF orientation [out_features, in_features]; `linear` contracts the last axis
of x with the last axis of W, which is what the name map to HF checkpoints needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Parameter names of the fused projection layout (q/k/v as one matrix, gate/up as one), which
# the model reads as well as the HF one; `jaxturbo.inference.fused` makes it.
QKV_W, QKV_B = "self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias"
GATE_UP_W = "mlp.gate_up_proj.weight"


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, statistics in float32 (as HF Llama/Qwen do)."""
    xf = x.astype(jnp.float32)
    scale = jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) / x.shape[-1] + eps)
    return weight * (xf * scale).astype(x.dtype)


def split_qkv(qkv: jax.Array, q_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A fused projection's local output [..., Hl + 2 Kl, hd] -> q, k, v (split on the heads)."""
    kv_heads = (qkv.shape[-2] - q_heads) // 2
    return (
        qkv[..., :q_heads, :],
        qkv[..., q_heads : q_heads + kv_heads, :],
        qkv[..., q_heads + kv_heads :, :],
    )


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """x [..., in] @ w[out, in]^T (+ b [out]) -> [..., out] in x's dtype.

    No `preferred_element_type=float32`: the GPU/TPU matrix units accumulate bf16 products in
    float32 anyway, and on an H100 asking for a float32 result turns a batch-1 decode GEMV into a
    4x slower kernel (553 vs 2257 GB/s; experiments/generate/RESULTS.md).
    """
    y = jnp.einsum("...i,oi->...o", x, w)
    return y if b is None else y + b.astype(y.dtype)


def swiglu_mlp(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """Llama MLP: down(silu(gate(x)) * up(x)).  Column-parallel gate/up, row-parallel down."""
    return swiglu_down(linear(x, gate), linear(x, up), down)


def swiglu_down(gate_out: jax.Array, up_out: jax.Array, down: jax.Array) -> jax.Array:
    """The MLP after its gate and up projections: down(silu(gate_out) * up_out)."""
    return linear(jax.nn.silu(gate_out) * up_out, down)
