"""Named model shapes: the configurations benchmarks, tests and examples draw random weights
for, in one table (HF's published configs for these models; no weights).

    cfg = shape("llama3-8b")                    # a ModelConfig
    cfg = shape("llama3-8b", num_hidden_layers=4)  # with fields replaced
"""

from __future__ import annotations

from typing import Any

from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig, MoEConfig

SHAPES: dict[str, ModelConfig] = {
    # Meta Llama-3-8B (the Ladder-Residual paper's decode shape)
    "llama3-8b": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
    ),
    # Meta Llama-3-70B
    "llama3-70b": ModelConfig(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
    ),
    # Meta Llama-3.2-1B (tied embeddings)
    "llama3.2-1b": ModelConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    # SmolLM2-135M's shape, for machines where the real model (a PyPI GGUF) is not at hand
    "smollm2-135m": ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    # Qwen3-30B-A3B: 128 experts of width 768, 8 routed per token, every layer sparse
    "qwen3-30b-a3b": ModelConfig(
        model_type="qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        qk_norm=True,
        max_position_embeddings=40960,
        moe=MoEConfig(
            num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True
        ),
    ),
    # seconds on a CPU: smoke presets of the benchmarks
    "tiny": ModelConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
    ),
    "tiny-moe": ModelConfig(
        model_type="qwen3_moe",
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        qk_norm=True,
        max_position_embeddings=2048,
        moe=MoEConfig(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True
        ),
    ),
}


def shape(name: str, **replace: Any) -> ModelConfig:
    """The named shape's ModelConfig, with `replace`'s fields changed."""
    if name not in SHAPES:
        raise UserError(f"unknown model shape {name!r}; shapes: {', '.join(SHAPES)}")
    return SHAPES[name].replace(**replace) if replace else SHAPES[name]
