"""Which functions run a config: the one place that tells a GQA model from an MLA one.

    fns = model_functions(cfg)                  # cfg: ModelConfig (GQA) or MLAConfig (MLA)
    cache = fns.init_cache(cfg, batch, max_len, dtype)
    logits, cache = fns.forward(params, cfg, tokens, cache=cache, lengths=..., attn_impl=...)

Generation and perplexity call it at trace time (cfg is a static argument of their jitted
functions), so the choice costs nothing in the compiled step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.mla import MLAConfig, init_mla_cache, mla_forward
from jaxturbo.models.transformer import Cache, forward, init_cache

AnyConfig = ModelConfig | MLAConfig


@dataclasses.dataclass(frozen=True)
class ModelFunctions:
    """forward(params, cfg, tokens, *, positions, segment_ids, cache, lengths, attn_impl,
    return_hidden) -> (logits [B, T, V] float32 or hidden [B, T, D], cache);
    init_cache(cfg, batch, max_len, dtype) -> empty cache;
    tensor_parallel: whether `jaxturbo.parallel.tensor` can split the model over a mesh."""

    name: str
    forward: Callable[..., tuple[jax.Array, Cache | None]]
    init_cache: Callable[..., Cache]
    tensor_parallel: bool


_GQA = ModelFunctions("GQA", forward, init_cache, tensor_parallel=True)
_MLA = ModelFunctions("MLA", mla_forward, init_mla_cache, tensor_parallel=False)


def model_functions(cfg: AnyConfig) -> ModelFunctions:
    """The forward and cache constructor of cfg's architecture."""
    if isinstance(cfg, MLAConfig):
        return _MLA
    if isinstance(cfg, ModelConfig):
        return _GQA
    raise TypeError(
        f"no model for a config of type {type(cfg).__name__}; expected ModelConfig or MLAConfig"
    )


def check_mesh_supported(cfg: AnyConfig, mesh_spec: str | None) -> None:
    """UserError when a mesh is asked for a model that tensor parallelism does not cover."""
    fns = model_functions(cfg)
    if mesh_spec and not fns.tensor_parallel:
        raise UserError(
            f"mesh {mesh_spec}: tensor-parallel {fns.name} models are not "
            "implemented; run this model on one device (no mesh)"
        )
