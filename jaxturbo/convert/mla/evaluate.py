"""Perplexity of an MLA model: `jaxturbo.inference.scoring`, which takes an `MLAConfig`
itself (`jaxturbo.models.model_functions`), in disjoint windows with the XLA attention."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jaxturbo.inference.scoring import PerplexityResult, perplexity
from jaxturbo.models.mla import MLAConfig
from jaxturbo.models.transformer import Params


def mla_perplexity(
    params: Params,
    cfg: MLAConfig,
    token_ids: np.ndarray,
    *,
    window: int = 1024,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of a 1-D token array in disjoint windows of `window` tokens."""
    return perplexity(
        params,
        cfg,
        token_ids,
        window=window,
        batch_size=batch_size,
        attn_impl="xla",
        progress=progress,
    )
