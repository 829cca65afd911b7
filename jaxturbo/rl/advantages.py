"""Advantage estimators behind one registry, named as verl names them (`ADVANTAGE_ESTIMATORS`).

Every estimator has the signature

    advantages, returns = estimator(token_rewards, mask, group_ids=..., values=..., cfg=...)

on unpacked rollouts (one row per response): token_rewards/mask/values [B, T], group_ids [B]
int in [0, B) (the rollouts of one prompt share an id).  mask is 1 on policy tokens; tool/env
tokens inside a multi-turn response are 0 and are skipped by the recursions (time flows over
policy tokens only).  Outcome-reward estimators score a response by sum_t r_t (the reward sits
on its last token) and give every policy token that score's advantage; returns are what a
critic would regress to (for outcome estimators, the advantage itself, as in verl).

  gae                   Generalized Advantage Estimation (Schulman et al. 2016, eq. 16):
                        delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1};
                        returns R_t = A_t + V_t; optionally whitened over the batch.
  grpo                  group-normalised outcome (Shao et al. 2024, DeepSeekMath, sec. 4.1.2):
                        A_i = (r_i - mean_g r) / (std_g r + eps); with norm_adv_by_std_in_grpo
                        False only the mean is removed (Dr. GRPO, Liu et al. 2025).  std is the
                        unbiased (Bessel) estimate.
  rloo                  REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024):
                        A_i = r_i - mean_{j != i} r_j = K/(K-1) (r_i - mean_g r).
  reinforce_plus_plus   REINFORCE++ (Hu 2025): discounted return-to-go of the token rewards
                        G_t = r_t + gamma G_{t+1}, whitened over all policy tokens of the batch.
  reinforce_plus_plus_baseline  REINFORCE++ with the group mean as baseline: (r_i - mean_g r)
                        on every token, whitened over the batch.
A group of one rollout has no baseline (its advantage would be 0 whatever its reward): the
estimators with a group baseline (`GROUP_BASELINE_ESTIMATORS`) refuse groups of one
(`check_group_size`).

Multi-turn trajectories (`multi_turn_advantages`): "trajectory" level gives every policy token
the GRPO advantage of the episode's total reward; "step" level gives the tokens of turn k the
group-normalised discounted return-to-go from step k, sum_{j >= k} gamma^{j-k} r_j, normalised
over all steps of the group's episodes (step-level credit assignment).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    """Advantage estimation settings (names follow verl's `algorithm.*`).

    adv_estimator: a key of ADVANTAGE_ESTIMATORS.
    gamma: discount over tokens (gae, reinforce_plus_plus) or over turns (step-level multi-turn).
    lam: GAE's lambda (Schulman et al. 2016): 1 = Monte-Carlo returns, 0 = one-step TD.
    norm_adv_by_std_in_grpo: divide by the group std (GRPO) or not (Dr. GRPO).
    whiten_gae: whiten GAE advantages over the batch's policy tokens (PPO's usual practice).
    epsilon: added to the std before dividing.
    """

    adv_estimator: str = "grpo"
    gamma: float = 1.0
    lam: float = 1.0
    norm_adv_by_std_in_grpo: bool = True
    whiten_gae: bool = True
    epsilon: float = 1e-6


def masked_whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over masked entries (unbiased var); masked-out entries -> 0."""
    m = mask.astype(jnp.float32)
    n = jnp.sum(m)
    mean = jnp.sum(x * m) / jnp.maximum(n, 1.0)
    var = jnp.sum(((x - mean) ** 2) * m) / jnp.maximum(n - 1.0, 1.0)
    return (x - mean) * jax.lax.rsqrt(var + eps) * m


def _reverse_scan(step: Callable, init: tuple, xs: tuple) -> jax.Array:
    """Run `step` from the last token to the first over [B, T] inputs; outputs [B, T]."""
    xs_t = tuple(jnp.swapaxes(x, 0, 1) for x in xs)  # scan runs over the leading (time) axis
    _, ys = jax.lax.scan(step, init, xs_t, reverse=True)
    return jnp.swapaxes(ys, 0, 1)


def gae(
    token_rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """GAE advantages and returns [B, T] (see module docstring); masked tokens are skipped.

    The value after a response's last policy token is 0 (the episode ends there).
    """
    r = token_rewards.astype(jnp.float32)
    v = values.astype(jnp.float32)
    m = mask.astype(bool)
    b = r.shape[0]

    def step(carry, x):
        next_v, next_a = carry
        r_t, v_t, m_t = x
        a_t = r_t + gamma * next_v - v_t + gamma * lam * next_a
        # a masked (env) token passes the carry through untouched: it is not a decision
        return (jnp.where(m_t, v_t, next_v), jnp.where(m_t, a_t, next_a)), jnp.where(m_t, a_t, 0.0)

    zeros = jnp.zeros((b,), jnp.float32)
    adv = _reverse_scan(step, (zeros, zeros), (r, v, m))
    returns = (adv + v) * m
    if whiten:
        adv = masked_whiten(adv, m)
    return adv, returns


def discounted_returns(token_rewards: jax.Array, mask: jax.Array, gamma: float = 1.0) -> jax.Array:
    """G_t = r_t + gamma G_{t'} with t' the next policy token; [B, T] -> [B, T] (0 off-mask)."""
    r = token_rewards.astype(jnp.float32)
    m = mask.astype(bool)

    def step(next_g, x):
        r_t, m_t = x
        g = r_t + gamma * next_g
        return jnp.where(m_t, g, next_g), jnp.where(m_t, g, 0.0)

    return _reverse_scan(step, jnp.zeros((r.shape[0],), jnp.float32), (r, m))


def group_normalize(
    x: jax.Array,
    valid: jax.Array,
    group_ids: jax.Array,
    *,
    scale_by_std: bool = True,
    leave_one_out: bool = False,
    eps: float = 1e-6,
) -> jax.Array:
    """Subtract each group's mean from x [N] (and divide by its unbiased std + eps).

    valid [N]: entries that count (others give 0).  group_ids [N] int in [0, N).
    leave_one_out: RLOO's baseline mean_{j != i}, i.e. K/(K-1) (x - mean); no std scaling.
    Groups of one valid entry give 0 (no baseline to compare with).
    """
    n = x.shape[0]
    x = x.astype(jnp.float32)
    w = valid.astype(jnp.float32)
    k = jax.ops.segment_sum(w, group_ids, num_segments=n)
    s = jax.ops.segment_sum(x * w, group_ids, num_segments=n)
    mean = (s / jnp.maximum(k, 1.0))[group_ids]
    kk = k[group_ids]
    centred = (x - mean) * w
    if leave_one_out:
        out = centred * kk / jnp.maximum(kk - 1.0, 1.0)
    elif scale_by_std:
        ss = jax.ops.segment_sum(centred * centred, group_ids, num_segments=n)[group_ids]
        std = jnp.sqrt(ss / jnp.maximum(kk - 1.0, 1.0))
        out = centred / (std + eps)
    else:
        out = centred
    return jnp.where(kk > 1.0, out, 0.0) * w


def _scores(token_rewards: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(token_rewards.astype(jnp.float32) * mask.astype(jnp.float32), axis=-1)


def _broadcast(per_seq: jax.Array, mask: jax.Array) -> jax.Array:
    return per_seq[:, None] * mask.astype(jnp.float32)


AdvantageFn = Callable[..., tuple[jax.Array, jax.Array]]


def _gae(token_rewards, mask, *, group_ids=None, values=None, cfg=AdvantageConfig()):
    if values is None:
        raise ValueError(
            "adv_estimator 'gae' needs values from a critic (PPO); use 'grpo', "
            "'rloo' or 'reinforce_plus_plus' without one"
        )
    return gae(token_rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam, whiten=cfg.whiten_gae)


def _need_groups(group_ids, name):
    if group_ids is None:
        raise ValueError(
            f"adv_estimator {name!r} needs group_ids (rollouts of one prompt share one)"
        )
    return group_ids


def _grpo(token_rewards, mask, *, group_ids=None, values=None, cfg=AdvantageConfig()):
    g = _need_groups(group_ids, "grpo")
    valid = jnp.ones(token_rewards.shape[:1], bool)
    a = _broadcast(
        group_normalize(
            _scores(token_rewards, mask),
            valid,
            g,
            scale_by_std=cfg.norm_adv_by_std_in_grpo,
            eps=cfg.epsilon,
        ),
        mask,
    )
    return a, a


def _rloo(token_rewards, mask, *, group_ids=None, values=None, cfg=AdvantageConfig()):
    g = _need_groups(group_ids, "rloo")
    valid = jnp.ones(token_rewards.shape[:1], bool)
    a = _broadcast(
        group_normalize(_scores(token_rewards, mask), valid, g, leave_one_out=True), mask
    )
    return a, a


def _reinforce_pp(token_rewards, mask, *, group_ids=None, values=None, cfg=AdvantageConfig()):
    ret = discounted_returns(token_rewards, mask, cfg.gamma)
    return masked_whiten(ret, mask), ret


def _reinforce_pp_baseline(
    token_rewards, mask, *, group_ids=None, values=None, cfg=AdvantageConfig()
):
    g = _need_groups(group_ids, "reinforce_plus_plus_baseline")
    valid = jnp.ones(token_rewards.shape[:1], bool)
    centred = group_normalize(_scores(token_rewards, mask), valid, g, scale_by_std=False)
    ret = _broadcast(centred, mask)
    return masked_whiten(ret, mask), ret


# the estimators whose baseline is the prompt's group: groups need >= 2 rollouts
GROUP_BASELINE_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus_baseline")


def check_group_size(adv_estimator: str, group_size: int) -> None:
    """ValueError when `adv_estimator` has a group baseline and groups hold fewer than 2."""
    if group_size < 2 and adv_estimator in GROUP_BASELINE_ESTIMATORS:
        raise ValueError(
            f"group_size={group_size}: {adv_estimator} needs >= 2 rollouts per "
            "prompt for its baseline"
        )


ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {
    "gae": _gae,
    "grpo": _grpo,
    "rloo": _rloo,
    "reinforce_plus_plus": _reinforce_pp,
    "reinforce_plus_plus_baseline": _reinforce_pp_baseline,
}


def compute_advantages(
    token_rewards: jax.Array,
    mask: jax.Array,
    cfg: AdvantageConfig,
    *,
    group_ids: jax.Array | None = None,
    values: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Advantages and returns [B, T] with the estimator `cfg.adv_estimator` (see module doc)."""
    if cfg.adv_estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown adv_estimator {cfg.adv_estimator!r}; choose one of "
            f"{tuple(ADVANTAGE_ESTIMATORS)}"
        )
    return ADVANTAGE_ESTIMATORS[cfg.adv_estimator](
        token_rewards, mask, group_ids=group_ids, values=values, cfg=cfg
    )


def multi_turn_advantages(
    step_rewards: jax.Array,
    step_mask: jax.Array,
    turn_ids: jax.Array,
    group_ids: jax.Array,
    *,
    level: str = "trajectory",
    gamma: float = 1.0,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> jax.Array:
    """Token advantages [B, T] of multi-turn episodes from per-turn rewards.

    step_rewards/step_mask [B, S]: reward after each of up to S policy turns (mask 1 for turns
    that happened).  turn_ids [B, T]: k + 1 on the tokens the policy wrote in turn k, 0 on
    prompt/tool/env/padding tokens.  group_ids [B] in [0, B).  level "trajectory" or "step"
    (see module docstring).
    """
    b, s = step_rewards.shape
    r = step_rewards.astype(jnp.float32) * step_mask
    if level == "trajectory":
        a = group_normalize(
            jnp.sum(r, axis=1), jnp.ones((b,), bool), group_ids, scale_by_std=scale_by_std, eps=eps
        )
        return a[:, None] * (turn_ids > 0)
    if level != "step":
        raise ValueError(
            f"unknown multi-turn advantage level {level!r}; choose 'trajectory' or 'step'"
        )
    ret = discounted_returns(r, step_mask, gamma)  # [B, S]; turns are the time axis here
    # every step of every episode in a group is one sample of the group's baseline
    flat_groups = jnp.repeat(group_ids, s)
    a = group_normalize(
        ret.reshape(-1),
        step_mask.reshape(-1).astype(bool),
        flat_groups,
        scale_by_std=scale_by_std,
        eps=eps,
    ).reshape(b, s)
    a = jnp.concatenate([jnp.zeros((b, 1), jnp.float32), a], axis=1)  # turn id 0 -> advantage 0
    return jnp.take_along_axis(a, jnp.clip(turn_ids, 0, s).astype(jnp.int32), axis=1)
