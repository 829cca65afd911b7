"""Perplexity of an MLA model: `jaxturbo.evaluate.perplexity` with the MLA forward."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from jaxturbo.evaluate.perplexity import PerplexityResult, perplexity
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.mla import MLAConfig, mla_forward
from jaxturbo.models.transformer import Params


@dataclasses.dataclass(frozen=True)
class _MLAForward:
    """`forward`'s signature for an MLA model (hashable: a static argument of the jitted window
    loss); the GQA config `perplexity` passes is replaced by this MLA config."""

    cfg: MLAConfig

    def __call__(self, params: Params, _cfg: ModelConfig, tokens: jax.Array, *,
                 attn_impl: str = "auto") -> tuple[jax.Array, None]:
        return mla_forward(params, self.cfg, tokens, attn_impl=attn_impl)


def mla_perplexity(params: Params, cfg: MLAConfig, token_ids: np.ndarray, *, window: int = 1024,
                   batch_size: int = 4,
                   progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """Perplexity of a 1-D token array in disjoint windows of `window` tokens."""
    return perplexity(params, cfg.base, token_ids, window=window, batch_size=batch_size,
                      attn_impl="xla", progress=progress, model_fn=_MLAForward(cfg))
