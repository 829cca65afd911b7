"""Rollouts -> rewards -> advantages -> packed training rows.

    prompts, groups = repeat_prompts(prompts, group_size)        # each prompt group_size times
    rollouts = [...]                                             # engine output + rewards
    batch, stats = build_batch(rollouts, AdvantageConfig("grpo"), seq_len=T, num_shards=D)

A rollout is prompt + completion; the completion may interleave the policy's tokens with tool or
environment output (multi-turn), told apart by `policy_mask`.  Packed rows follow
`jaxturbo.data`'s layout: every array is [B, T]; `tokens` are the inputs, `targets` the next
tokens, `segment_ids` 1, 2, ... per rollout in a row (0 = padding), `positions` restart at each
rollout.  `weights` is 1 only where the target is a policy token, so prompts, tool output and
padding never train; `old_logprobs` and `advantages` sit at the same target positions.

Dynamic sampling (DAPO, Yu et al. 2025, sec. 3.2): a group whose rewards are all equal has zero
group-normalised advantage everywhere and only dilutes the batch, so `filter_groups` drops it.
Rejection sampling (`max_completion_tokens`): rollouts that hit the length budget without
finishing can be dropped with their whole group, as truncated answers carry a misleading reward.

Data-parallel balance: with D shards the batch's rows split into D contiguous blocks (one per
device).  Rollouts are assigned to shards longest first to the least-loaded shard (LPT, Graham
1969: within 4/3 of the optimal maximum load) and each shard packs its own rows, so every device
gets a similar number of tokens and the same number of rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from jaxturbo.errors import UserError
from jaxturbo.rl.advantages import AdvantageConfig, compute_advantages

Batch = dict[str, np.ndarray]
BATCH_KEYS = (
    "tokens",
    "targets",
    "weights",
    "segment_ids",
    "positions",
    "old_logprobs",
    "advantages",
)


@dataclasses.dataclass
class Rollout:
    """One sampled response to one prompt.

    prompt/completion: token ids.  logprobs: behaviour-policy log-probability of each completion
    token (any value on env tokens).  policy_mask: 1 on tokens the policy wrote, 0 on tool/env
    output (None: all 1).  reward: the scalar outcome reward.  group: id shared by the rollouts
    of one prompt.  truncated: the response hit the token budget without a stop token.
    """

    prompt: Sequence[int]
    completion: Sequence[int]
    logprobs: Sequence[float]
    reward: float
    group: int
    policy_mask: Sequence[int] | None = None
    truncated: bool = False

    def mask(self) -> np.ndarray:
        n = len(self.completion)
        m = (
            np.ones(n, np.int32)
            if self.policy_mask is None
            else np.asarray(self.policy_mask, np.int32)
        )
        if len(m) != n or len(self.logprobs) != n:
            raise UserError(
                f"rollout of group {self.group}: completion has {n} tokens but "
                f"policy_mask {len(m)} and logprobs {len(self.logprobs)}"
            )
        return m


def repeat_prompts(
    prompts: Sequence[Sequence[int]], group_size: int
) -> tuple[list[list[int]], np.ndarray]:
    """Each prompt group_size times in a row, and the group id [P * group_size] of each."""
    if group_size < 1:
        raise UserError(f"group size {group_size} must be >= 1 (GRPO needs >= 2 for a baseline)")
    out = [list(p) for p in prompts for _ in range(group_size)]
    return out, np.repeat(np.arange(len(prompts)), group_size).astype(np.int32)


def filter_groups(rewards: np.ndarray, group_ids: np.ndarray) -> np.ndarray:
    """Keep mask [N]: False for every rollout of a group whose rewards are all equal."""
    rewards, group_ids = np.asarray(rewards, np.float64), np.asarray(group_ids)
    keep = np.zeros(len(rewards), bool)
    for g in np.unique(group_ids):
        idx = group_ids == g
        keep[idx] = np.ptp(rewards[idx]) > 0
    return keep


def response_arrays(rollouts: Sequence[Rollout]) -> dict[str, np.ndarray]:
    """Completion-aligned arrays [N, C] (C = longest completion): mask, token_rewards (the reward
    on each rollout's last policy token), plus group_ids [N] renumbered into [0, N)."""
    n, width = len(rollouts), max(1, max(len(r.completion) for r in rollouts))
    mask = np.zeros((n, width), np.int32)
    rew = np.zeros((n, width), np.float32)
    for i, r in enumerate(rollouts):
        m = r.mask()
        mask[i, : len(m)] = m
        policy = np.flatnonzero(m)
        if len(policy):
            rew[i, policy[-1]] = r.reward
    _, groups = np.unique([r.group for r in rollouts], return_inverse=True)
    return {"mask": mask, "token_rewards": rew, "group_ids": groups.astype(np.int32)}


def balance_shards(lengths: Sequence[int], num_shards: int) -> list[list[int]]:
    """Indices of `lengths` split into num_shards lists of similar total length (LPT greedy)."""
    loads = [0] * num_shards
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        s = min(range(num_shards), key=lambda s: (loads[s], len(shards[s])))
        shards[s].append(i)
        loads[s] += lengths[i]
    return shards


def _first_fit(lengths: Sequence[int], idx: Sequence[int], seq_len: int) -> list[list[int]]:
    """First-fit decreasing: rows (lists of indices) whose lengths sum to <= seq_len."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(idx, key=lambda i: -lengths[i]):
        for r, f in enumerate(free):
            if lengths[i] <= f:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(seq_len - lengths[i])
    return rows


def pack_rollouts(
    rollouts: Sequence[Rollout],
    advantages: np.ndarray,
    *,
    seq_len: int,
    num_shards: int = 1,
    rows_multiple: int = 1,
    min_rows: int = 0,
    extras: dict[str, np.ndarray] | None = None,
) -> Batch:
    """Pack rollouts with completion-aligned advantages [N, C] into rows [B, seq_len].

    extras: more completion-aligned float arrays [N, C] (e.g. PPO's old_values, returns), packed
    at the same target positions under their own keys.

    B = num_shards * rows per shard; rows per shard is the largest shard's need, at least
    min_rows (a fixed B keeps one compiled train step), rounded up to rows_multiple (e.g. the
    gradient-accumulation count); empty rows are all padding.
    """
    if not rollouts:
        raise UserError("no rollouts to pack (every group was filtered out?)")
    lengths = [len(r.prompt) + len(r.completion) - 1 for r in rollouts]  # inputs per rollout
    too_long = [n for n in lengths if n > seq_len]
    if too_long:
        raise UserError(
            f"a rollout of {too_long[0] + 1} tokens does not fit seq_len={seq_len}; "
            f"raise seq_len to >= {max(lengths)} or lower max_new_tokens"
        )
    shards = [_first_fit(lengths, s, seq_len) for s in balance_shards(lengths, num_shards)]
    per = max(min_rows, max(len(s) for s in shards))
    per = -(-per // rows_multiple) * rows_multiple
    extras = extras or {}
    out = {
        k: np.zeros(
            (num_shards * per, seq_len),
            np.float32 if k in ("weights", "old_logprobs", "advantages") else np.int32,
        )
        for k in BATCH_KEYS
    }
    out.update({k: np.zeros((num_shards * per, seq_len), np.float32) for k in extras})
    for s, rows in enumerate(shards):
        for j, row in enumerate(rows):
            b, pos = s * per + j, 0
            for seg, i in enumerate(row, start=1):
                r = rollouts[i]
                seq = np.concatenate(
                    [np.asarray(r.prompt, np.int32), np.asarray(r.completion, np.int32)]
                )
                n, p = lengths[i], len(r.prompt)
                sl = slice(pos, pos + n)
                out["tokens"][b, sl] = seq[:-1]
                out["targets"][b, sl] = seq[1:]
                out["segment_ids"][b, sl] = seg
                out["positions"][b, sl] = np.arange(n)
                # target j predicts seq[j + 1]; completion token k is seq[p + k] -> target p + k - 1
                c = slice(pos + p - 1, pos + n)
                out["weights"][b, c] = r.mask()
                out["old_logprobs"][b, c] = np.asarray(r.logprobs, np.float32)
                out["advantages"][b, c] = advantages[i, : len(r.completion)]
                for k, v in extras.items():
                    out[k][b, c] = v[i, : len(r.completion)]
                pos += n
    out["advantages"] *= out["weights"]  # env tokens carry no advantage
    return out


def build_batch(
    rollouts: Sequence[Rollout],
    adv_cfg: AdvantageConfig,
    *,
    seq_len: int,
    num_shards: int = 1,
    rows_multiple: int = 1,
    min_rows: int = 0,
    dynamic_filter: bool = True,
    drop_truncated: bool = False,
    advantage_fn: Callable[[list[int]], np.ndarray] | None = None,
) -> tuple[Batch, dict[str, float]]:
    """Advantages (outcome estimators: grpo, rloo, reinforce_plus_plus*) and packed rows
    (see `pack_rollouts` for num_shards, rows_multiple, min_rows).

    advantage_fn: instead of `adv_cfg`'s estimator on the outcome rewards, the completion-aligned
    advantages [K, >= longest completion] of the kept rollouts, given their indices (e.g.
    step-level multi-turn advantages, `jaxturbo.rl.multiturn`).

    dynamic_filter drops groups with equal rewards; drop_truncated drops every group that has a
    truncated rollout (rejection sampling).  Stats: reward_mean (over all rollouts, before
    filtering), kept (rollouts packed), groups_kept, tokens (trained tokens per shard, max/min).
    """
    rewards = np.array([r.reward for r in rollouts], np.float32)
    groups = np.array([r.group for r in rollouts])
    keep = np.ones(len(rollouts), bool)
    if drop_truncated:
        bad = {r.group for r in rollouts if r.truncated}
        keep &= np.array([g not in bad for g in groups])
    if dynamic_filter:
        keep &= filter_groups(rewards, groups)
    kept_idx = [int(i) for i in np.flatnonzero(keep)]
    kept = [rollouts[i] for i in kept_idx]
    stats = {
        "reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
        "kept": float(len(kept)),
        "groups_kept": float(len({r.group for r in kept})),
    }
    if not kept:
        return {}, stats
    if advantage_fn is not None:
        adv = advantage_fn(kept_idx)
    else:
        arr = response_arrays(kept)
        adv, _ = compute_advantages(
            jnp.asarray(arr["token_rewards"]),
            jnp.asarray(arr["mask"]),
            adv_cfg,
            group_ids=jnp.asarray(arr["group_ids"]),
        )
    batch = pack_rollouts(
        kept,
        np.asarray(adv),
        seq_len=seq_len,
        num_shards=num_shards,
        rows_multiple=rows_multiple,
        min_rows=min_rows,
    )
    per_shard = batch["weights"].reshape(num_shards, -1).sum(axis=1)
    stats.update(tokens_max=float(per_shard.max()), tokens_min=float(per_shard.min()))
    return batch, stats
