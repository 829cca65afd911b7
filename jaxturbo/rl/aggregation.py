"""Loss aggregation: per-token losses [B, T] -> one `Weighted(total, count)`, named as verl names them.

Shapes: B rows, T tokens per row; `mask` [B, T] is 1 on trained (policy) tokens.  A sequence is a
row, or a (row, segment id) pair when rows are packed (`segment_ids` [B, T], 0 = padding).
Returning numerator and denominator (not their quotient) keeps gradient accumulation and data
parallelism exact: sum totals and counts over micro-batches and devices, then divide.

With l_{i,t} the loss of token t of sequence i, m the mask, N the number of sequences that have
at least one trained token:
  token-mean               sum_{i,t} m l / sum_{i,t} m             (DAPO, Yu et al. 2025)
  seq-mean-token-sum       (1/N) sum_i sum_t m l
  seq-mean-token-mean      (1/N) sum_i (sum_t m l / sum_t m)       (GRPO, Shao et al. 2024)
  seq-mean-token-sum-norm  (1/N) sum_i sum_t m l / L, L a constant (Dr. GRPO, Liu et al. 2025:
                           no length normaliser, so long and short answers weigh per token alike)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxturbo.train.losses import Weighted

LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


def sequence_ids(mask: jax.Array, segment_ids: jax.Array | None) -> tuple[jax.Array, int]:
    """One flat id per (row, segment) for every token [B, T], and how many ids there are.

    Without segment ids each row is one sequence.  Segment ids lie in [0, T], so T + 1 slots
    per row never collide.
    """
    b, t = mask.shape
    if segment_ids is None:
        return jnp.broadcast_to(jnp.arange(b)[:, None], (b, t)), b
    return jnp.arange(b)[:, None] * (t + 1) + jnp.clip(segment_ids, 0, t), b * (t + 1)


def sequence_sums(
    x: jax.Array, mask: jax.Array, segment_ids: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-sequence sums of m * x and of m: two arrays [S] (S slots, unused ones 0)."""
    ids, n = sequence_ids(mask, segment_ids)
    m = mask.astype(jnp.float32)
    flat = ids.reshape(-1)
    return (
        jax.ops.segment_sum((x.astype(jnp.float32) * m).reshape(-1), flat, num_segments=n),
        jax.ops.segment_sum(m.reshape(-1), flat, num_segments=n),
    )


def aggregate(
    loss: jax.Array,
    mask: jax.Array,
    mode: str = "token-mean",
    *,
    segment_ids: jax.Array | None = None,
    norm_length: float | None = None,
) -> Weighted:
    """Aggregate a per-token loss [B, T] over trained tokens (see the module docstring).

    norm_length: the constant L of seq-mean-token-sum-norm (default T, the row length; pass the
    maximum response length to match a rollout budget).
    """
    m = mask.astype(jnp.float32)
    if mode == "token-mean":
        return Weighted(jnp.sum(loss.astype(jnp.float32) * m), jnp.sum(m))
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; choose one of {LOSS_AGG_MODES}")
    sums, counts = sequence_sums(loss, mask, segment_ids)
    has = counts > 0
    n_seq = jnp.sum(has.astype(jnp.float32))
    if mode == "seq-mean-token-sum":
        return Weighted(jnp.sum(sums), n_seq)
    if mode == "seq-mean-token-mean":
        return Weighted(jnp.sum(jnp.where(has, sums / jnp.where(has, counts, 1.0), 0.0)), n_seq)
    length = float(mask.shape[1] if norm_length is None else norm_length)
    return Weighted(jnp.sum(sums) / length, n_seq)
