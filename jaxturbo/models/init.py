"""Random parameters for any `ModelConfig`, in the layout `jaxturbo.models.transformer` reads.

HF names, layers stacked on a leading axis [L, ...]; weights [out, in] as in HF checkpoints.
Used for tests, benchmarks and training from scratch.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp

from jaxturbo.models.config import ModelConfig
from jaxturbo.models.moe import moe_layer_shapes
from jaxturbo.models.transformer import Params


def param_shapes(cfg: ModelConfig) -> Params:
    """The parameter tree of `cfg` as shapes: {name: shape}, with "layers" stacked on [L]."""
    d, f, v, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    hq, hk, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    layers: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (L, d),
        "post_attention_layernorm.weight": (L, d),
        "self_attn.q_proj.weight": (L, hq * hd, d),
        "self_attn.k_proj.weight": (L, hk * hd, d),
        "self_attn.v_proj.weight": (L, hk * hd, d),
        "self_attn.o_proj.weight": (L, d, hq * hd),
        "mlp.gate_proj.weight": (L, f, d),
        "mlp.up_proj.weight": (L, f, d),
        "mlp.down_proj.weight": (L, d, f),
    }
    if cfg.attention_bias:
        layers.update(
            {
                "self_attn.q_proj.bias": (L, hq * hd),
                "self_attn.k_proj.bias": (L, hk * hd),
                "self_attn.v_proj.bias": (L, hk * hd),
            }
        )
    if cfg.qk_norm:
        layers.update({"self_attn.q_norm.weight": (L, hd), "self_attn.k_norm.weight": (L, hd)})
    if cfg.moe is not None:  # router and expert stacks instead of the dense MLP
        for n in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
            del layers[n]
        layers.update({n: (L, *s) for n, s in moe_layer_shapes(cfg.moe, d).items()})
    tree: Params = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
        "layers": layers,
    }
    if not cfg.tie_word_embeddings:
        tree["lm_head.weight"] = (v, d)
    return tree


def init_params(
    cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32, std: float = 0.02
) -> Params:
    """Random parameters: normal(0, std) weights, zero biases, unit norm scales.

    Every leaf gets its own key folded from its name, so adding a leaf changes no other leaf.
    """

    def make(name: str, shape: tuple[int, ...]) -> jax.Array:
        if "norm" in name:
            return jnp.ones(shape, dtype)
        if name.endswith(".bias"):
            return jnp.zeros(shape, dtype)
        # zlib.crc32, not hash(): str hashes are salted per process
        k = jax.random.fold_in(key, zlib.crc32(name.encode()) % (2**31))
        return (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

    shapes = param_shapes(cfg)
    out: Params = {n: make(n, s) for n, s in shapes.items() if n != "layers"}
    out["layers"] = {n: make(n, s) for n, s in shapes["layers"].items()}
    return out
