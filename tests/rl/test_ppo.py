"""PPO end to end on CPU: GAE + value head; a tiny random model learns a trivially learnable
reward; the packed batch carries old values and returns at the policy tokens."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxturbo.models.config import ModelConfig
from jaxturbo.models.init import init_params
from jaxturbo.rl.envs import TokenSetTask
from jaxturbo.rl.ppo import PPOConfig, PPOLearner
from jaxturbo.train.optimizer import OptimizerConfig


def test_ppo_learns_token_set_reward():
    cfg = ModelConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
    )
    params = init_params(cfg, jax.random.key(0), std=0.2)
    task = TokenSetTask(32, frozenset(range(8)), prompt_len=3)  # random policy: reward ~1/4
    learner = PPOLearner(
        cfg,
        params,
        task,
        PPOConfig(prompts_per_step=16, group_size=2, max_new_tokens=4, seq_len=24, kl_coef=0.01),
        optimizer=OptimizerConfig(
            learning_rate=1e-2, warmup_steps=0, total_steps=100, weight_decay=0.0
        ),
    )
    seen, real = [], learner.train_step

    def spy(state, batch):
        seen.append({k: np.asarray(v) for k, v in batch.items()})
        return real(state, batch)

    learner.train_step = spy
    rewards = []
    for i in range(20):
        m = learner.step()
        rewards.append(m["reward_mean"])
        if i == 0:
            # policy == reference at step 0 (up to decode-vs-forward rounding)
            assert abs(m["kl"]) < 1e-5
            _check_first_value_targets(seen[0], m, lam=learner.cfg.lam)
    # the value head moved off its zero start and the policy moved off the reference
    assert float(np.abs(np.asarray(learner.state.params["value_head"]["weight"])).max()) > 0
    assert m["kl"] > 0
    first, last = np.mean(rewards[:2]), np.mean(rewards[-3:])
    assert first < 0.45 and last > first + 0.4, rewards


def _check_first_value_targets(b, m, lam):
    """Step 0, zero value head: old values are 0, so GAE (gamma 1) makes the return at
    completion token j of an L-token response lam^(L-1-j) * its reward (reward = fraction of its
    tokens in {0..7}, on the last token; the KL term is ~1e-7 at the reference), and the value
    loss is 0.5 * the token mean of the squared returns."""
    w = b["weights"] > 0
    assert np.all(b["old_values"][w] == 0)
    checked = 0
    for r in range(b["tokens"].shape[0]):
        for seg in set(b["segment_ids"][r].tolist()) - {0}:
            at = (b["segment_ids"][r] == seg) & w[r]
            toks = b["targets"][r][at]
            reward = float(np.mean(toks < 8))
            want = reward * lam ** np.arange(len(toks) - 1, -1, -1)
            np.testing.assert_allclose(b["returns"][r][at], want, atol=1e-5)
            checked += 1
    assert checked == 16 * 2
    ret = b["returns"][w]
    assert m["vf_loss"] == pytest.approx(0.5 * float(np.mean(ret**2)), rel=1e-4)
    assert m["vf_loss"] > 0.01  # some responses scored: the check is not 0 == 0
