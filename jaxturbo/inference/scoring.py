"""Sliding-window perplexity over a token stream.

Windows of `window` tokens start every `stride` tokens (default stride = window: disjoint
windows).  In each window the first `window - stride` tokens are context only (already scored
by the previous window), as in the usual HF recipe; the first window scores all but its first
token.  Perplexity = exp(total NLL / scored tokens).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxturbo.errors import UserError
from jaxturbo.models.dispatch import AnyConfig, model_functions
from jaxturbo.models.transformer import Params


@dataclasses.dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens_scored: int
    windows: int


def window_plan(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored target index within the window) for each window."""
    plan, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        if end - begin < 2:
            break
        first = max(prev_end - begin, 1)  # targets [first, end-begin) are new
        plan.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return plan


@functools.partial(jax.jit, static_argnames=("cfg", "attn_impl", "model_fn"))
def _window_nll(
    params: Params,
    cfg: AnyConfig,
    tokens: jax.Array,
    weights: jax.Array,
    attn_impl: str,
    model_fn: Callable | None = None,
) -> jax.Array:
    """Sum of NLL of tokens[:, 1:] weighted by weights[:, 1:] (tokens [B, W]).

    model_fn: a hashable stand-in for the config's forward (e.g. `parallel.tensor.TensorParallel`)."""
    fwd = model_functions(cfg).forward if model_fn is None else model_fn  # chosen while tracing
    logits, _ = fwd(params, cfg, tokens, attn_impl=attn_impl)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * weights[:, 1:])


def perplexity(
    params: Params,
    cfg: AnyConfig,
    token_ids: np.ndarray,
    *,
    window: int = 1024,
    stride: int | None = None,
    batch_size: int = 4,
    attn_impl: str = "auto",
    progress: Callable[[int], None] | None = None,
    model_fn: Callable | None = None,
) -> PerplexityResult:
    """Perplexity of a 1-D token array, evaluated in batches of windows.

    cfg: a `ModelConfig` (GQA) or an `MLAConfig` (`jaxturbo.models.model_functions` picks the
    forward); model_fn: see `_window_nll` (tensor parallel scoring passes `TensorParallel(mesh)`)."""
    stride = window if stride is None else stride
    if window > cfg.max_position_embeddings:
        raise UserError(
            f"window={window} is larger than the model's context of "
            f"{cfg.max_position_embeddings} tokens; choose a window <= "
            f"{cfg.max_position_embeddings}"
        )
    if window < 2 or not 1 <= stride <= window:
        raise UserError(f"need window >= 2 and 1 <= stride <= window (got {window}, {stride})")
    if len(token_ids) < 2:
        raise UserError(f"need at least 2 tokens to score, got {len(token_ids)}")
    plan = window_plan(len(token_ids), window, stride)
    total, count = 0.0, 0
    for i in range(0, len(plan), batch_size):
        chunk = plan[i : i + batch_size]
        toks = np.zeros((batch_size, window), np.int32)
        wts = np.zeros((batch_size, window), np.float32)
        for r, (b, e, first) in enumerate(chunk):
            toks[r, : e - b] = token_ids[b:e]
            wts[r, first : e - b] = 1.0
        total += float(
            _window_nll(params, cfg, jnp.asarray(toks), jnp.asarray(wts), attn_impl, model_fn)
        )
        count += int(wts[:, 1:].sum())
        if progress is not None:
            progress(len(chunk))
    return PerplexityResult(math.exp(total / count), total / count, count, len(plan))
