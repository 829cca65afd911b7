"""Tiny random models and helpers for the engine's device-side tests (float32, CPU)."""

from __future__ import annotations

import jax
import numpy as np

from jaxturbo.inference.engine.config import EngineConfig
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.init import init_params

# 8 query heads / 2 KV heads: tensor sizes 2, 4 (KV replicated) and 8 (4 copies) all apply
TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
)


def tiny_model(seed: int = 0, **overrides):
    """(ModelConfig, float32 params) of a tiny random decoder.  std 0.3 keeps the greedy
    argmax well away from ties, so two correct implementations agree token for token."""
    cfg = ModelConfig(**{**TINY, **overrides})
    return cfg, init_params(cfg, jax.random.key(seed), std=0.3)


def engine_config(**kw) -> EngineConfig:
    """One step shape (T=32, S=4) unless overridden: one compilation per engine."""
    base = dict(
        page_size=16,
        num_pages=64,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        max_model_len=128,
        token_buckets=(32,),
        seq_buckets=(4,),
    )
    return EngineConfig(**{**base, **kw})


def random_prompts(lengths, vocab: int = 128, seed: int = 0) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [[int(t) for t in rng.randint(0, vocab, n)] for n in lengths]


class AsciiTokenizer:
    """Token id i <-> the printable ASCII character 32 + i % 95 (decode only needs ids)."""

    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 32 for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + int(i) % 95) for i in ids)


class ByteTokenizer:
    """Token id = one UTF-8 byte: a multi-byte character spans several tokens, and decoding a
    prefix of them gives U+FFFD (as byte-level BPE tokenizers do)."""

    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
