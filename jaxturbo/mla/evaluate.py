"""Perplexity of an MLA model, on the same window plan as `jaxturbo.evaluate.perplexity`."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxturbo.evaluate.perplexity import PerplexityResult, window_plan
from jaxturbo.models.mla import MLAConfig, mla_forward
from jaxturbo.models.transformer import Params


@functools.partial(jax.jit, static_argnames=("cfg",))
def _window_nll(params: Params, cfg: MLAConfig, tokens: jax.Array, weights: jax.Array) -> jax.Array:
    logits, _ = mla_forward(params, cfg, tokens, attn_impl="xla")
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * weights[:, 1:])


def mla_perplexity(params: Params, cfg: MLAConfig, token_ids: np.ndarray, *, window: int = 1024,
                   batch_size: int = 4,
                   progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """Perplexity of a 1-D token array in disjoint windows of `window` tokens."""
    plan = window_plan(len(token_ids), window, window)
    total, count = 0.0, 0
    for i in range(0, len(plan), batch_size):
        chunk = plan[i:i + batch_size]
        toks = np.zeros((batch_size, window), np.int32)
        wts = np.zeros((batch_size, window), np.float32)
        for r, (b, e, first) in enumerate(chunk):
            toks[r, :e - b] = token_ids[b:e]
            wts[r, first:e - b] = 1.0
        total += float(_window_nll(params, cfg, jnp.asarray(toks), jnp.asarray(wts)))
        count += int(wts[:, 1:].sum())
        if progress is not None:
            progress(len(chunk))
    return PerplexityResult(math.exp(total / count), total / count, count, len(plan))
