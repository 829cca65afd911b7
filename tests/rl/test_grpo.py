"""GRPO end to end on CPU: a tiny random model learns a trivially learnable reward; task rewards."""

from __future__ import annotations

import jax
import numpy as np

from jaxturbo.models.config import ModelConfig
from jaxturbo.rl.envs import ArithmeticTask, CharTokenizer, Problem, TokenSetTask
from jaxturbo.rl.grpo import GRPOConfig, GRPOLearner
from jaxturbo.train.init import init_params
from jaxturbo.train.optimizer import OptimizerConfig


def test_arithmetic_task_rewards_exact_answers():
    tok = CharTokenizer()
    task = ArithmeticTask(tok.encode, tok.decode, max_operand=9)
    probs = task.sample(4, np.random.default_rng(0))
    for p in probs:
        text = tok.decode(p.prompt)
        a, b = text[:-1].split("+")
        assert text.endswith("=") and p.answer == int(a) + int(b)
    p = Problem(tok.encode("3+4="), 7)
    assert task.reward(p, tok.encode("7")) == 1.0
    assert task.reward(p, tok.encode(" 7\n")) == 1.0
    assert task.reward(p, tok.encode("17")) == 0.0
    assert task.reward(p, tok.encode("=")) == 0.0 and task.reward(p, []) == 0.0


def test_grpo_learns_token_set_reward():
    cfg = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      max_position_embeddings=64)
    params = init_params(cfg, jax.random.key(0), std=0.2)
    # reward: fraction of the 4 generated tokens in {0..7}; a random policy scores ~1/4
    task = TokenSetTask(32, frozenset(range(8)), prompt_len=3)
    gcfg = GRPOConfig(prompts_per_step=4, group_size=8, max_new_tokens=4, seq_len=24,
                      kl_coef=0.01)
    learner = GRPOLearner(cfg, params, task, gcfg, optimizer=OptimizerConfig(
        learning_rate=1e-2, warmup_steps=0, total_steps=100, weight_decay=0.0))
    rewards, kls = [], []
    for _ in range(20):
        m = learner.step()
        rewards.append(m["reward_mean"])
        kls.append(m.get("kl", 0.0))
    first, last = np.mean(rewards[:2]), np.mean(rewards[-3:])
    assert first < 0.45 and last > first + 0.4, rewards
    assert kls[0] < 1e-5 < max(kls)  # on the reference policy at step 0, then moving away
