"""Log-probabilities of given tokens under the JAX policy: the one place RL turns logits into
the per-token log pi(y_t) that losses, KL terms and rollout-engine checks compare."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxturbo.models.config import ModelConfig
from jaxturbo.models.transformer import Params, forward


def logprobs_from_logits(
    logits: jax.Array, targets: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """log softmax(logits / temperature)[target]: logits [B, T, V], targets [B, T] -> [B, T].

    The temperature matches the sampler's (`jaxturbo.inference.sampling.sample`): rollouts drawn
    at temperature tau are scored under the same tau-scaled, unfiltered distribution.
    """
    z = logits.astype(jnp.float32) / temperature
    picked = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(z, axis=-1)


def token_logprobs(
    params: Params,
    cfg: ModelConfig,
    batch: dict[str, jax.Array],
    *,
    temperature: float = 1.0,
    attn_impl: str = "auto",
) -> jax.Array:
    """Per-target log-probabilities [B, T] of a packed batch (tokens, targets, positions,
    segment_ids [B, T]; see `jaxturbo.rl.batch`)."""
    logits, _ = forward(
        params,
        cfg,
        batch["tokens"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        attn_impl=attn_impl,
    )
    return logprobs_from_logits(logits, batch["targets"], temperature)


def padded_sequences(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
) -> dict[str, np.ndarray]:
    """One right-padded row per prompt + completion, in the packed-batch layout ([N, L - 1] with
    L the longest sequence): tokens, targets, positions, segment_ids (1 on tokens, 0 padding)."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs) - 1
    out = {
        k: np.zeros((len(seqs), width), np.int32)
        for k in ("tokens", "targets", "positions", "segment_ids")
    }
    for i, s in enumerate(seqs):
        n = len(s) - 1
        out["tokens"][i, :n] = s[:-1]
        out["targets"][i, :n] = s[1:]
        out["positions"][i, :n] = np.arange(n)
        out["segment_ids"][i, :n] = 1
    return out


def cut_completions(
    per_target: np.ndarray, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
) -> list[np.ndarray]:
    """Cut each row of a per-target array [N, L - 1] (logprobs, values; from `padded_sequences`
    rows) down to its completion tokens: completion token k is target len(prompt) + k - 1."""
    return [
        np.asarray(per_target[i, len(p) - 1 : len(p) - 1 + len(c)], np.float32)
        for i, (p, c) in enumerate(zip(prompts, completions))
    ]
