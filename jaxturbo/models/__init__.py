"""Functional transformer models (Llama, Qwen2, Qwen3; MLA / DeepSeek-V3) on plain parameter dicts."""

from jaxturbo.models.config import ModelConfig
from jaxturbo.models.dispatch import AnyConfig, ModelFunctions, model_functions
from jaxturbo.models.mla import MLAConfig, init_mla_cache, mla_forward
from jaxturbo.models.transformer import forward, init_cache

__all__ = [
    "AnyConfig",
    "MLAConfig",
    "ModelConfig",
    "ModelFunctions",
    "forward",
    "init_cache",
    "init_mla_cache",
    "mla_forward",
    "model_functions",
]
