"""GRPO on multi-turn episodes: the packed rows of scripted calculator episodes train only the
policy's tokens with their behaviour logprobs; a tiny random model learns a two-turn reward;
`jaxturbo rl --task calculator` runs end to end."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxturbo.cli import main
from jaxturbo.inference.sampling import SamplingParams
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.init import init_params
from jaxturbo.models.transformer import forward
from jaxturbo.rl.advantages import multi_turn_advantages
from jaxturbo.rl.envs import CharTokenizer, Problem, TokenSetTask
from jaxturbo.rl.grpo import GRPOConfig, GRPOLearner
from jaxturbo.rl.multiturn import CalculatorEnv, MultiTurnTask, run_episodes, step_arrays
from jaxturbo.rl.rollout import RolloutOutput
from jaxturbo.train.optimizer import OptimizerConfig
from tests.rl.test_cli_rl import _records, _rl, tiny_rl_model  # noqa: F401 (fixture)

CFG = ModelConfig(
    vocab_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=64,
)
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=100, weight_decay=0.0)
TOK = CharTokenizer()


class FixedProblems:
    """Always the same problem (a Task for MultiTurnTask)."""

    def __init__(self, problem: Problem):
        self.problem = problem

    def sample(self, n, rng):
        return [self.problem] * n


class CallScript:
    """Plays turns[call][row] (text) with distinct logprobs -(call + 1) - 0.01 * token index."""

    def __init__(self, turns: list[list[str]]):
        self.turns, self.calls, self.logprobs = turns, 0, []

    def generate(self, prompts, sampling, *, max_new_tokens, stop_ids=(), seed=0):
        comps = [TOK.encode(t) for t in self.turns[self.calls][: len(prompts)]]
        lps = [-(self.calls + 1) - 0.01 * np.arange(len(c), dtype=np.float32) for c in comps]
        self.logprobs.append(lps)
        self.calls += 1
        return RolloutOutput(comps, lps, [False] * len(comps))

    def score(self, *a, **k):
        raise NotImplementedError

    def update_weights(self, params):
        pass


def _scripted_step(level: str):
    """One GRPO step on a group of two scripted calculator episodes of "1+2+3=" (answer 6):
    episode 0 calls the tool ("1+2=" -> "3\\n") then answers "6" (reward 1); episode 1 answers
    "9" at once (reward 0).  Returns (the batch the train step saw, metrics)."""
    task = MultiTurnTask(
        FixedProblems(Problem(TOK.encode("1+2+3="), 6)),
        CalculatorEnv(TOK.encode, TOK.decode),
        max_turns=3,
        max_tool_tokens=4,
    )
    engine = CallScript([["1+2=", "9"], ["6"]])
    learner = GRPOLearner(
        CFG,
        init_params(CFG, jax.random.key(0), std=0.2),
        task,
        GRPOConfig(
            prompts_per_step=1,
            group_size=2,
            max_new_tokens=4,
            seq_len=32,
            multi_turn_advantage=level,
        ),
        optimizer=OPT,
        engine=engine,
    )
    seen = []
    real = learner.train_step

    def spy(state, batch):
        seen.append({k: np.asarray(v) for k, v in batch.items()})
        return real(state, batch)

    learner.train_step = spy
    metrics = learner.step()
    assert engine.calls == 2 and len(seen) == 1
    return seen[0], metrics, engine


@pytest.mark.parametrize("level", ["trajectory", "step"])
def test_packed_episode_rows_train_policy_tokens_only(level):
    b, m, engine = _scripted_step(level)
    assert m["reward_mean"] == 0.5 and m["kept"] == 2
    # the update's loss is PPO's clipped loss (eps .2, dual clip 3, token mean) of these rows,
    # written out here in numpy on a plain forward pass of the initial weights
    logits, _ = forward(
        init_params(CFG, jax.random.key(0), std=0.2),
        CFG,
        b["tokens"],
        positions=b["positions"],
        segment_ids=b["segment_ids"],
    )
    logp = np.take_along_axis(
        np.asarray(jax.nn.log_softmax(logits, -1)), b["targets"][..., None], -1
    )[..., 0]
    w = b["weights"] > 0
    ratio, adv = np.exp(logp[w] - b["old_logprobs"][w]), b["advantages"][w]
    per_token = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
    per_token = np.where(adv < 0, np.minimum(per_token, -adv * 3.0), per_token)
    np.testing.assert_allclose(m["loss"], per_token.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["pg_loss"], m["loss"], rtol=1e-6)  # no KL, no entropy term
    # per segment: the full sequence, and which targets are policy tokens with which logprobs
    policy = {
        "1+2+3=1+2=3\n6": ("1+2=" + "6", list(engine.logprobs[0][0]) + list(engine.logprobs[1][0])),
        "1+2+3=9": ("9", list(engine.logprobs[0][1])),
    }
    # trajectory (GRPO over episode rewards [1, 0]): +-1/sqrt(2); step (returns-to-go [1, 1] and
    # [0] normalised over the group's three turns): +1/sqrt(3), -2/sqrt(3)
    want_adv = (
        {"1+2+3=1+2=3\n6": 2**-0.5, "1+2+3=9": -(2**-0.5)}
        if level == "trajectory"
        else {"1+2+3=1+2=3\n6": 3**-0.5, "1+2+3=9": -2 * 3**-0.5}
    )
    found = set()
    for r in range(b["tokens"].shape[0]):
        for seg in set(b["segment_ids"][r].tolist()) - {0}:
            at = b["segment_ids"][r] == seg
            toks, tgts = b["tokens"][r][at], b["targets"][r][at]
            text = TOK.decode([toks[0], *tgts])
            w = b["weights"][r][at]
            trained = TOK.decode(tgts[w > 0])
            want_text, want_lp = policy[text]
            found.add(text)
            # weight 1 exactly on the policy's tokens: never the prompt or the tool's "3\n"
            assert trained == want_text and set(w.tolist()) <= {0.0, 1.0}
            assert w.sum() == len(want_text)
            # the ratio's denominator: each policy token's behaviour logprob at its target
            np.testing.assert_allclose(b["old_logprobs"][r][at][w > 0], want_lp, atol=1e-6)
            assert np.all(b["old_logprobs"][r][at][w == 0] == 0)
            np.testing.assert_allclose(b["advantages"][r][at][w > 0], want_adv[text], atol=1e-5)
            assert np.all(b["advantages"][r][at][w == 0] == 0)
            np.testing.assert_array_equal(b["positions"][r][at], np.arange(len(toks)))
    assert found == set(policy)


def test_trajectory_advantages_equal_multi_turn_trajectory_level():
    # the learner's trajectory level (episode reward through the GRPO estimator) is
    # multi_turn_advantages(level="trajectory")
    b, _, _ = _scripted_step("trajectory")
    task = MultiTurnTask(
        FixedProblems(Problem(TOK.encode("1+2+3="), 6)),
        CalculatorEnv(TOK.encode, TOK.decode),
        max_turns=3,
    )
    eps = run_episodes(
        CallScript([["1+2=", "9"], ["6"]]),
        task,
        [task.problems.problem] * 2,
        SamplingParams(),
        max_turns=3,
        max_new_tokens=4,
        groups=[0, 0],
    )
    arr = step_arrays(eps)
    adv = np.asarray(
        multi_turn_advantages(
            arr["step_rewards"], arr["step_mask"], arr["turn_ids"], arr["group_ids"]
        )
    )
    got = sorted(set(np.round(b["advantages"][b["weights"] > 0], 5).tolist()))
    want = sorted(set(np.round(adv[arr["turn_ids"] > 0], 5).tolist()))
    assert got == want


class GoodTokenEnv:
    """Two-turn toy tool: the reply is always the tokens [30, 31]; each turn's reward is half
    the fraction of its tokens in {0..7} (episode reward in [0, 1], ~1/4 for a random policy)."""

    def respond(self, problem, turn):
        return [30, 31], 0.5 * float(np.mean([t < 8 for t in turn]))


def test_grpo_learns_two_turn_reward():
    task = MultiTurnTask(
        TokenSetTask(32, frozenset(range(8)), prompt_len=3),
        GoodTokenEnv(),
        max_turns=2,
        max_tool_tokens=2,
    )
    cfg = GRPOConfig(prompts_per_step=4, group_size=8, max_new_tokens=4, seq_len=24, kl_coef=0.01)
    learner = GRPOLearner(
        CFG, init_params(CFG, jax.random.key(0), std=0.2), task, cfg, optimizer=OPT
    )
    ms = [learner.step() for _ in range(20)]
    rewards = [m["reward_mean"] for m in ms]
    assert all(m["turns"] == 2 for m in ms) and ms[0]["rollout_tokens"] == 4 * 8 * 8
    first, last = np.mean(rewards[:2]), np.mean(rewards[-3:])
    assert first < 0.45 and last > first + 0.4, rewards  # ~0.27 -> ~0.99


@pytest.mark.parametrize("extra", [(), ("--multi-turn-advantage", "step", "--async")])
def test_rl_cli_calculator_runs(tiny_rl_model, tmp_path, capsys, extra):  # noqa: F811
    out = tmp_path / "calc"
    assert (
        _rl(
            tiny_rl_model,
            out,
            "--task",
            "calculator",
            "--steps",
            "2",
            "--max-turns",
            "2",
            "--eval-every",
            "0",
            *extra,
        )
        == 0
    )
    train = _records(out, "train")
    assert [r["step"] for r in train] == [1, 2]
    assert all(1 <= r["turns"] <= 2 and r["rollout_tokens"] > 0 for r in train)
    assert [r["step"] for r in _records(out, "eval")] == [0, 2]
    assert json.loads((out / "eval.json").read_text())["steps"] == 2
    assert "step 2/2" in capsys.readouterr().err


def test_rl_cli_calculator_refuses_ppo(tmp_path, capsys):
    code = main(
        [
            "rl",
            "--model",
            str(tmp_path / "none"),
            "--steps",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--task",
            "calculator",
            "--algo",
            "ppo",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--task calculator (multi-turn) is implemented for --algo grpo only" in err
