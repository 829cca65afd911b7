"""Rotary position embeddings (RoFormer), with the default, linear and llama3 frequency rules.

HF layout: the head is split in two halves that rotate together (`rotate_half`), not
interleaved pairs; GGUF import undoes llama.cpp's interleaving so this one form serves all.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxturbo.models.config import ModelConfig
from pallas_kernels.decode_attention.reference import rope_rotate


def inv_frequencies(cfg: ModelConfig, rotary_dim: int | None = None) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2] (float64 numpy; constant-folded into the graph)."""
    d = cfg.head_dim if rotary_dim is None else rotary_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    sc = cfg.rope_scaling_dict
    kind = sc.get("rope_type", "default")
    if kind == "linear":
        inv = inv / float(sc["factor"])
    elif kind == "llama3":
        # Llama 3.1: long wavelengths divided by `factor`, short kept, a smooth ramp between.
        factor = float(sc["factor"])
        low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old_ctx = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.astype(np.float32)


def rope_cos_sin(
    cfg: ModelConfig, positions: jax.Array, rotary_dim: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """cos, sin [batch, seq, rotary_dim] float32 for integer positions [batch, seq]."""
    inv = jnp.asarray(inv_frequencies(cfg, rotary_dim))
    ang = positions.astype(jnp.float32)[..., None] * inv
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [batch, seq, heads, rotary_dim] by cos/sin [batch, seq, rotary_dim]."""
    # the one rotation, shared with the decode kernels' reference (which rotate a key in-kernel)
    return rope_rotate(x, cos[:, :, None, :], sin[:, :, None, :])
