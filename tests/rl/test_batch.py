"""Rollouts -> packed RL rows: layout by hand, policy-only masks, filtering, shard balance."""

from __future__ import annotations

import numpy as np
import pytest

from jaxturbo.errors import UserError
from jaxturbo.rl.advantages import AdvantageConfig
from jaxturbo.rl.batch import (
    Rollout,
    balance_shards,
    build_batch,
    filter_groups,
    pack_rollouts,
    repeat_prompts,
)


def test_repeat_prompts_and_filter_groups():
    ps, g = repeat_prompts([[1, 2], [3]], 3)
    assert ps == [[1, 2]] * 3 + [[3]] * 3 and g.tolist() == [0, 0, 0, 1, 1, 1]
    keep = filter_groups(np.array([1, 1, 0, 1, 0.5, 0.5]), np.array([0, 0, 1, 1, 2, 2]))
    assert keep.tolist() == [False, False, True, True, False, False]
    with pytest.raises(UserError, match="group size 0"):
        repeat_prompts([[1]], 0)


def test_pack_layout_trains_only_policy_tokens():
    r0 = Rollout([5, 6], [7, 8], [-0.1, -0.2], reward=1.0, group=0)
    # multi-turn: 11 is tool output (policy_mask 0) between policy tokens 10 and 12
    r1 = Rollout([9], [10, 11, 12], [-0.3, 0.0, -0.5], reward=0.0, group=0, policy_mask=[1, 0, 1])
    adv = np.array([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]], np.float32)
    b = pack_rollouts([r0, r1], adv, seq_len=8)
    assert b["tokens"].tolist() == [[5, 6, 7, 9, 10, 11, 0, 0]]
    assert b["targets"].tolist() == [[6, 7, 8, 10, 11, 12, 0, 0]]
    assert b["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 2, 0, 0]]
    assert b["positions"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 0]]
    # targets 7, 8 (r0) and 10, 12 (r1) are the policy's; 6 is prompt, 11 tool output
    assert b["weights"].tolist() == [[0, 1, 1, 1, 0, 1, 0, 0]]
    np.testing.assert_allclose(b["old_logprobs"], [[0, -0.1, -0.2, -0.3, 0, -0.5, 0, 0]], atol=1e-7)
    assert b["advantages"].tolist() == [[0, 1, 1, 2, 0, 2, 0, 0]]
    with pytest.raises(UserError, match="raise seq_len to >= 6"):
        pack_rollouts([r0, Rollout([1] * 4, [2] * 3, [0.0] * 3, 0.0, 1)], adv, seq_len=5)


def test_balance_shards_lpt_and_packed_blocks():
    # LPT: 10 -> s0, 9 -> s1, 8 -> s1 (9 < 10), 3, 2, 1 -> s0 (13, 15, 16 vs 17)
    assert balance_shards([10, 9, 8, 3, 2, 1], 2) == [[0, 3, 4, 5], [1, 2]]
    lens = [10, 9, 8, 3, 2, 1]
    rolls = [Rollout([1], [2] * n, [0.0] * n, 0.0, i) for i, n in enumerate(lens)]
    adv = np.ones((6, 10), np.float32)
    b = pack_rollouts(rolls, adv, seq_len=12, num_shards=2, rows_multiple=2)
    assert pack_rollouts(rolls, adv, seq_len=12, num_shards=2, min_rows=3)["tokens"].shape == (
        6,
        12,
    )
    # shard 0 packs 10+3 | 2+1 ... rows: [10, 2](12)? first-fit decreasing of 10,3,2,1 in 12:
    # 10 -> row 0 (free 2); 3 -> row 1 (free 9); 2 -> row 0 (free 0); 1 -> row 1 -> 2 rows.
    # shard 1: 9 -> row 0 (free 3); 8 -> row 1 -> 2 rows.  2 rows per shard, B = 4.
    assert b["tokens"].shape == (4, 12)
    per_shard = b["weights"].reshape(2, -1).sum(axis=1)
    assert per_shard.tolist() == [16, 17]
    assert (b["segment_ids"][0] > 0).sum() == 12 and (b["segment_ids"][1] > 0).sum() == 4


def test_build_batch_grpo_filters_equal_groups_and_truncated():
    rolls = [
        Rollout([1, 2], [3, 4], [-1.0, -1.0], 1.0, group=7),
        Rollout([1, 2], [3, 5, 6], [-1.0] * 3, 0.0, group=7),
        Rollout([8], [9], [-2.0], 1.0, group=3),
        Rollout([8], [9], [-2.0], 1.0, group=3),
        Rollout([4], [4, 4], [-2.0, -2.0], 1.0, group=5),
        Rollout([4], [4, 5], [-2.0, -2.0], 0.0, group=5, truncated=True),
    ]
    batch, stats = build_batch(rolls, AdvantageConfig("grpo"), seq_len=8, drop_truncated=True)
    # group 3 (equal rewards) and group 5 (a truncated rollout) are gone; group 7: rewards 1, 0
    # -> mean .5, std sqrt(.5) -> advantages +-.5/.707107 = +-.707106 on each policy token
    assert stats["kept"] == 2 and stats["groups_kept"] == 1
    assert stats["reward_mean"] == pytest.approx(4 / 6)
    a = batch["advantages"][batch["weights"] > 0]
    np.testing.assert_allclose(np.sort(a), [-0.707106] * 3 + [0.707106] * 2, atol=1e-5)
    assert batch["weights"].sum() == 5
    empty, stats = build_batch(rolls[2:4], AdvantageConfig("grpo"), seq_len=8)
    assert empty == {} and stats["kept"] == 0
