"""Calibration statistics: per-layer second moment of the attention input.

C_l = E[x xᵀ] over calibration tokens, x = input_layernorm(hidden) of layer l (what q/k/v_proj
read).  For any replacement W' of a projection W, the expected activation error is
E|(W - W')x|² = tr((W - W') C (W - W')ᵀ), which CARE's whitened SVD minimises.  Products are
accumulated in float64 so that long calibration runs do not lose the small eigenvalues.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxturbo.models.config import ModelConfig
from jaxturbo.models.layers import rms_norm
from jaxturbo.models.rope import rope_cos_sin
from jaxturbo.models.transformer import Params, attention_block, embed, mlp_block


@jax.jit
def _embed(params: Params, tokens: jax.Array) -> jax.Array:
    return embed(params, tokens)


def _layer_fn(cfg: ModelConfig) -> Callable:
    @jax.jit
    def layer(lp: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One standard-residual layer: (normed attention input [B,T,D], next hidden [B,T,D])."""
        b, t, _ = x.shape
        cos, sin = rope_cos_sin(cfg, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
        h = rms_norm(x, lp["input_layernorm.weight"], cfg.rms_norm_eps)
        a, _ = attention_block(
            lp,
            cfg,
            h,
            cos,
            sin,
            jnp.int32(0),
            segment_ids=None,
            cache=None,
            attn_impl="xla",
            attn_fn=None,
        )
        x = x + a
        x = x + mlp_block(lp, rms_norm(x, lp["post_attention_layernorm.weight"], cfg.rms_norm_eps))
        return h, x

    return layer


def attention_input_covariance(
    params: Params,
    cfg: ModelConfig,
    batches: Iterable[np.ndarray],
    *,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """C [L, D, D] float64: mean of x xᵀ over every token of `batches` ([B, T] int arrays).

    Streams batch by batch (memory: one batch of hidden states plus L*D*D float64).
    """
    L, D = cfg.num_hidden_layers, cfg.hidden_size
    acc = np.zeros((L, D, D), np.float64)
    n = 0
    layer = _layer_fn(cfg)
    lps = [jax.tree.map(lambda a: a[i], params["layers"]) for i in range(L)]
    for toks in batches:
        x = _embed(params, jnp.asarray(toks, jnp.int32))
        for i in range(L):
            h, x = layer(lps[i], x)
            h64 = np.asarray(h, np.float64).reshape(-1, D)
            acc[i] += h64.T @ h64
        n += toks.size
        if progress is not None:
            progress(int(toks.shape[0]))
    return acc / max(n, 1)


def shrink(c: np.ndarray, alpha: float) -> np.ndarray:
    """(1-α)C + α·(tr C / D)·I: keeps C well conditioned (and invertible) on few samples."""
    d = c.shape[-1]
    return (1 - alpha) * c + alpha * (np.trace(c) / d) * np.eye(d)


def split_held_out(token_ids: np.ndarray, held_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(training tokens, held-out tokens) of a 1-D token array: the last `held_out` tokens are
    kept for scoring (perplexity); calibration and healing read only the first part, so no
    scored token is ever trained or calibrated on."""
    if not 0 <= held_out <= len(token_ids):
        from jaxturbo.errors import UserError

        raise UserError(f"cannot hold out {held_out} of {len(token_ids)} tokens for evaluation")
    cut = len(token_ids) - held_out
    return token_ids[:cut], token_ids[cut:]


def calibration_batches(
    token_ids: np.ndarray, samples: int, length: int, batch_size: int = 8
) -> list[np.ndarray]:
    """`samples` disjoint windows of `length` tokens from the start of `token_ids`, batched."""
    need = samples * length
    if len(token_ids) < need:
        from jaxturbo.errors import UserError

        raise UserError(
            f"calibration needs {samples} x {length} = {need} tokens, the text has "
            f"{len(token_ids)}; use fewer calibration samples or shorter ones"
        )
    windows = np.asarray(token_ids[:need], np.int32).reshape(samples, length)
    return [windows[i : i + batch_size] for i in range(0, samples, batch_size)]
