"""Tiny random DeepSeek-V3 models (transformers, PyTorch) and a character tokenizer, for parity
and round-trip tests of MLA models."""

from __future__ import annotations

from pathlib import Path

import numpy as np

V = 97  # covers the character tokenizer's 96 ids

TINY_DEEPSEEK = dict(
    vocab_size=V,
    hidden_size=48,
    intermediate_size=64,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=3,
    num_key_value_heads=3,
    q_lora_rank=None,
    kv_lora_rank=24,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=12,
    first_k_dense_replace=2,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
)


def tiny_deepseek_torch(seed: int = 0, **overrides):
    """A torch DeepseekV3ForCausalLM (eval mode) of TINY_DEEPSEEK + overrides, norms randomised
    so that tests see them."""
    import torch
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        DeepseekV3Config(**{**TINY_DEEPSEEK, **overrides})
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def tiny_deepseek(seed: int = 0, **overrides):
    """(torch model, MLAConfig, jax params) of a tiny dense DeepSeek-V3."""
    import jax
    import jax.numpy as jnp

    from jaxturbo.bridge.deepseek import mla_config_from_hf, mla_params_from_hf

    model = tiny_deepseek_torch(seed, **overrides)
    cfg = mla_config_from_hf(model.config.to_dict())
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    return model, cfg, jax.tree.map(jnp.asarray, mla_params_from_hf(sd, cfg))


def char_tokenizer():
    """Character-level tokenizer (BPE without merges): printable ASCII c -> c - 31, <unk> 0."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        unk_token="<unk>",
    )


def save_with_tokenizer(model, path: Path, dtype=None) -> Path:
    """model.save_pretrained(path) (cast to the torch dtype if given) plus the character
    tokenizer: a directory `jaxturbo.bridge.load_model` reads."""
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    """transformers' float32 logits [B, T, V] of int tokens [B, T]."""
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of one prompt: n new tokens, no stop token."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out[0, len(prompt) :].tolist()
