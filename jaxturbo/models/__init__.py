"""Functional transformer models (Llama, Qwen2, Qwen3) on plain parameter dicts."""

from jaxturbo.models.config import ModelConfig
from jaxturbo.models.transformer import forward, init_cache

__all__ = ["ModelConfig", "forward", "init_cache"]
