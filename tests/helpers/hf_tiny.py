"""Tiny random HF models (transformers, PyTorch) and their jaxturbo parameters, for parity tests."""

from __future__ import annotations

import numpy as np

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=211,
    max_position_embeddings=256,
)

# mixture-of-experts sizes on top of TINY: 8 experts of width 32, 2 per token
TINY_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def tiny_hf_model(family: str, seed: int = 0, **overrides):
    """(torch model in eval mode, ModelConfig, jaxturbo params) for llama/qwen2/qwen3 and the
    mixture-of-experts qwen3_moe (normalised top-k) / qwen2_moe (shared expert, raw top-k)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    from jaxturbo.bridge.hf import params_from_hf
    from jaxturbo.models.config import ModelConfig

    kw = dict(TINY)
    if family == "llama":
        cls = LlamaConfig
        kw.update(rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True)
    elif family == "qwen2":
        cls = Qwen2Config
    elif family == "qwen3":
        cls = Qwen3Config
        kw.update(head_dim=16)
    elif family == "qwen3_moe":
        cls = Qwen3MoeConfig
        kw.update(TINY_MOE, head_dim=16, norm_topk_prob=True)
    elif family == "qwen2_moe":
        cls = Qwen2MoeConfig
        kw.update(TINY_MOE, shared_expert_intermediate_size=48, norm_topk_prob=False)
    else:
        raise ValueError(family)
    kw.update(overrides)
    torch.manual_seed(seed)
    hc = cls(**kw)
    model = AutoModelForCausalLM.from_config(hc).eval()
    # HF initialises norms to 1; randomise them so the test sees their effect.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight") or "shared_expert_gate" in name:
                # routers drawn at std 0.02 give near-uniform probabilities: make routing decisive
                p.copy_(0.3 * torch.randn_like(p))
    cfg = ModelConfig.from_hf_dict(hc.to_dict())
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    params = params_from_hf(sd, cfg)
    return model, cfg, params


def random_tokens(shape, vocab: int = 211, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)
