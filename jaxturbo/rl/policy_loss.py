"""Policy and value losses of PPO-style post-training, per token, masked, then aggregated.

Shapes: B rows, T tokens, V vocabulary.  logp/old_logp [B, T] are the log-probabilities of the
tokens actually taken (targets) under the current and the rollout (behaviour) policy; mask [B, T]
is 1 on policy tokens (0 on prompts, tool/env output, padding); segment_ids [B, T] for packed rows.
Every function returns `Weighted` (see `jaxturbo.rl.aggregation`) plus float metrics.

Policy losses (`PolicyLossConfig.policy_loss`, verl's names):
  vanilla  PPO clip (Schulman et al. 2017, eq. 7) with separate lower/upper clip ranges
           ("clip-higher", DAPO, Yu et al. 2025):
               r = pi/pi_old,  L = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
           and dual-clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games", eq. 4): for
           A < 0 the loss is further capped at -c A (c > 1), so a huge r on a bad token cannot
           blow up the step.
  gspo     GSPO (Zheng et al. 2025): the clipped objective on the sequence-level ratio
           s_i = exp(mean_{t in i} (log pi - log pi_old)), clipped per sequence, averaged over
           sequences (eq. 5-7).  Computed in the token form of eq. 9: per token
           s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)], equal to s_i in value and carrying each
           token's own gradient; with one advantage per sequence and seq-mean-token-mean
           aggregation its value and gradient are the sequence objective's.  Its defaults are
           the paper's: clip range [1 - 3e-4, 1 + 4e-4], seq-mean-token-mean, no dual clip.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxturbo.rl.aggregation import LOSS_AGG_MODES, aggregate, sequence_ids, sequence_sums
from jaxturbo.train.losses import Weighted

POLICY_LOSSES = ("vanilla", "gspo")


# per policy loss: (clip_ratio_low, clip_ratio_high, clip_ratio_c, loss_agg_mode) when not given.
# vanilla: PPO's 0.2 / 0.2 and verl's dual clip 3.0; gspo: the GSPO paper's objective (sec. 5.1
# ranges, sequence mean, no dual clip)
POLICY_LOSS_DEFAULTS = {
    "vanilla": (0.2, 0.2, 3.0, "token-mean"),
    "gspo": (3e-4, 4e-4, None, "seq-mean-token-mean"),
}
# clip_ratio_c's "not given" (None already means "no dual clip")
DEFAULT = "default"


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """How the policy-gradient loss is formed.  Fields left unset take the policy loss's
    defaults (`POLICY_LOSS_DEFAULTS`), filled in at construction (so `dataclasses.replace` of
    the policy loss keeps the other fields' filled values: build a new config instead).

    policy_loss: "vanilla" (PPO token ratio) or "gspo" (sequence ratio, Zheng et al. 2025).
    clip_ratio_low / clip_ratio_high: eps_low, eps_high of the ratio clip [1 - eps_low,
      1 + eps_high] (PPO uses 0.2 / 0.2; DAPO raises eps_high to 0.28; GSPO uses 3e-4 / 4e-4).
    clip_ratio_c: dual-clip constant c > 1 for negative advantages (Ye et al. 2020; verl's default
      3.0 for vanilla); None turns dual-clip off (gspo's default).
    loss_agg_mode: one of LOSS_AGG_MODES (see `jaxturbo.rl.aggregation`).
    norm_length: the constant L of "seq-mean-token-sum-norm" (None: the row length T).
    """

    policy_loss: str = "vanilla"
    clip_ratio_low: float | None = None
    clip_ratio_high: float | None = None
    clip_ratio_c: float | None | str = DEFAULT
    loss_agg_mode: str | None = None
    norm_length: float | None = None

    def __post_init__(self) -> None:
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"policy_loss {self.policy_loss!r}; choose one of {POLICY_LOSSES}")
        low, high, dual, mode = POLICY_LOSS_DEFAULTS[self.policy_loss]
        # frozen: fill the unset fields once, so the stored config says what runs
        if self.clip_ratio_low is None:
            object.__setattr__(self, "clip_ratio_low", low)
        if self.clip_ratio_high is None:
            object.__setattr__(self, "clip_ratio_high", high)
        if self.clip_ratio_c == DEFAULT:
            object.__setattr__(self, "clip_ratio_c", dual)
        if self.loss_agg_mode is None:
            object.__setattr__(self, "loss_agg_mode", mode)
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(
                f"loss_agg_mode {self.loss_agg_mode!r}; choose one of {LOSS_AGG_MODES}"
            )
        if not (0.0 <= self.clip_ratio_low < 1.0 and self.clip_ratio_high >= 0.0):
            raise ValueError(
                f"clip ranges need 0 <= clip_ratio_low < 1 and clip_ratio_high >= 0 "
                f"(got {self.clip_ratio_low}, {self.clip_ratio_high})"
            )
        if self.clip_ratio_c is not None and not (
            isinstance(self.clip_ratio_c, (int, float)) and self.clip_ratio_c > 1.0
        ):
            raise ValueError(
                f"clip_ratio_c={self.clip_ratio_c} must be > 1 (or None for no dual-clip)"
            )


def sequence_log_ratio(
    log_ratio: jax.Array, mask: jax.Array, segment_ids: jax.Array | None = None
) -> jax.Array:
    """GSPO's per-token log-ratio [B, T]: value mean_{t in seq}(log_ratio), gradient per token.

    log s_{i,t} = sg[mean_i] + log_ratio_t - sg[log_ratio_t].
    """
    sums, counts = sequence_sums(log_ratio, mask, segment_ids)
    ids, _ = sequence_ids(mask, segment_ids)
    mean = (sums / jnp.maximum(counts, 1.0))[ids]
    return jax.lax.stop_gradient(mean) + log_ratio - jax.lax.stop_gradient(log_ratio)


def truncated_is_weights(
    old_logp: jax.Array, rollout_logp: jax.Array, cap: float = 2.0
) -> jax.Array:
    """Truncated importance weights [B, T] for rollouts drawn by a different engine or an older
    policy: w = min(pi_old / pi_rollout, cap), with pi_old the trainer's own logprobs of the
    behaviour weights (truncated IS, Ionides 2008; applied to RL rollout/trainer mismatch by
    Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training").
    No gradient flows through w."""
    w = jnp.exp(
        jnp.clip(
            old_logp.astype(jnp.float32) - rollout_logp.astype(jnp.float32), -20.0, jnp.log(cap)
        )
    )
    return jax.lax.stop_gradient(w)


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    cfg: PolicyLossConfig = PolicyLossConfig(),
    *,
    segment_ids: jax.Array | None = None,
    is_weights: jax.Array | None = None,
) -> tuple[Weighted, dict[str, jax.Array]]:
    """Clipped policy-gradient loss (see the module docstring).  All inputs [B, T].

    is_weights: optional per-token weights multiplying the clipped loss (e.g.
    `truncated_is_weights` when rollouts came from another engine or a stale policy).

    Metrics (token means over the mask): clipfrac (ratio outside the clip range, the clipped
    term chosen), dual_clipfrac (the dual cap active), ratio_mean, approx_kl (k1 of the old vs
    current policy on these tokens).
    """
    m = mask.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)
    log_ratio = logp.astype(jnp.float32) - old_logp.astype(jnp.float32)
    if cfg.policy_loss == "gspo":
        log_ratio = sequence_log_ratio(log_ratio, mask, segment_ids)
    # clamp before exp: masked or wildly off-policy tokens must not turn the sum into inf/nan
    ratio = jnp.exp(jnp.clip(log_ratio, -20.0, 20.0))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    loss = jnp.maximum(unclipped, clipped)
    clip_hit = (clipped > unclipped).astype(jnp.float32)
    dual_hit = jnp.zeros_like(loss)
    if cfg.clip_ratio_c is not None:
        cap = -adv * cfg.clip_ratio_c
        dual_hit = ((adv < 0) & (loss > cap)).astype(jnp.float32)
        loss = jnp.where(adv < 0, jnp.minimum(loss, cap), loss)
    if is_weights is not None:
        loss = loss * is_weights
    n = jnp.maximum(jnp.sum(m), 1.0)
    metrics = {
        "clipfrac": jnp.sum(clip_hit * m) / n,
        "dual_clipfrac": jnp.sum(dual_hit * m) / n,
        "ratio_mean": jnp.sum(ratio * m) / n,
        "approx_kl": jnp.sum(-log_ratio * m) / n,
    }
    return aggregate(
        loss, mask, cfg.loss_agg_mode, segment_ids=segment_ids, norm_length=cfg.norm_length
    ), metrics


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Entropy [B, T] of softmax(logits) over V: H = logsumexp(z) - sum_v p_v z_v."""
    z = logits.astype(jnp.float32)
    p = jax.nn.softmax(z, axis=-1)
    return jax.nn.logsumexp(z, axis=-1) - jnp.sum(p * z, axis=-1)


def entropy_bonus(
    logits: jax.Array,
    mask: jax.Array,
    mode: str = "token-mean",
    *,
    segment_ids: jax.Array | None = None,
    norm_length: float | None = None,
) -> Weighted:
    """Aggregated policy entropy (Williams & Peng 1991; PPO eq. 9's c2 S term).

    The learner *subtracts* entropy_coeff * value() from the loss to keep exploring.
    logits [B, T, V], mask [B, T].
    """
    return aggregate(
        entropy_from_logits(logits), mask, mode, segment_ids=segment_ids, norm_length=norm_length
    )


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    *,
    cliprange_value: float | None = 0.5,
    mode: str = "token-mean",
    segment_ids: jax.Array | None = None,
) -> tuple[Weighted, dict[str, jax.Array]]:
    """Clipped value loss (PPO2 baselines; Engstrom et al. 2020 discuss it), all inputs [B, T]:

        v_clip = clip(v, v_old - eps_v, v_old + eps_v)
        L = 0.5 * max((v - R)**2, (v_clip - R)**2)

    cliprange_value None gives the plain 0.5 (v - R)**2.  Metric vf_clipfrac: the clipped term
    is the larger one.  v is clipped to the range itself (not v_old + clip(v - v_old)), so a v
    inside the range is v_clip exactly and never counts as clipped through rounding.
    """
    v = values.astype(jnp.float32)
    r = returns.astype(jnp.float32)
    plain = (v - r) ** 2
    if cliprange_value is None:
        loss, hit = plain, jnp.zeros_like(plain)
    else:
        v_old = old_values.astype(jnp.float32)
        v_clip = jnp.clip(v, v_old - cliprange_value, v_old + cliprange_value)
        clipped = (v_clip - r) ** 2
        loss, hit = jnp.maximum(plain, clipped), (clipped > plain).astype(jnp.float32)
    m = mask.astype(jnp.float32)
    metrics = {"vf_clipfrac": jnp.sum(hit * m) / jnp.maximum(jnp.sum(m), 1.0)}
    return aggregate(0.5 * loss, mask, mode, segment_ids=segment_ids), metrics
