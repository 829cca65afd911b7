"""Multi-turn episodes: the policy writes a turn, the environment answers (tool output), until
the environment ends the episode with a reward.

    episodes = run_episodes(engine, env, problems, sampling, max_turns=4, max_new_tokens=16,
                            stop_ids=(eos,))
    rollouts = [e.rollout for e in episodes]                 # policy_mask 0 on tool output
    adv = multi_turn_advantages(step_rewards, step_mask, turn_ids, group_ids, level="step")

Learners train on it through a `MultiTurnTask` (problems from a `Task`, turns answered by a
`ToolEnv`): `GRPOLearner` given one collects G episodes per problem with `collect_episodes`
instead of single completions, and packs the whole trajectories (tool output weight 0).

An environment (`ToolEnv`) sees the problem and the policy's latest turn and returns the tokens
to append (None ends the episode) and that step's reward.  Tool output enters the context, so the
next turn is conditioned on it, but it is never trained on (`Rollout.policy_mask` is 0 there) and
its "logprobs" are 0.  `Episode` keeps the per-turn rewards and each token's turn id for the
step-level or trajectory-level advantages of `jaxturbo.rl.advantages.multi_turn_advantages`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from jaxturbo.inference.sampling import SamplingParams
from jaxturbo.rl.batch import Rollout
from jaxturbo.rl.envs import Problem, Task
from jaxturbo.rl.rollout import RolloutEngine


class ToolEnv(Protocol):
    def respond(self, problem: Problem, turn: Sequence[int]) -> tuple[list[int] | None, float]:
        """(tokens to append after the policy's turn, or None to end; this step's reward)."""
        ...


@dataclasses.dataclass
class Episode:
    """One finished episode.  rollout: prompt + all turns and tool output (policy_mask marks the
    policy's tokens; reward = sum of step rewards).  step_rewards: one per policy turn.
    turn_ids: per completion token, k + 1 for tokens of policy turn k, 0 for tool output."""

    rollout: Rollout
    step_rewards: list[float]
    turn_ids: list[int]


def run_episodes(
    engine: RolloutEngine,
    env: ToolEnv,
    problems: Sequence[Problem],
    sampling: SamplingParams,
    *,
    max_turns: int,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    groups: Sequence[int] | None = None,
    seed: int = 0,
) -> list[Episode]:
    """Play every problem to the end (or max_turns policy turns: the environment's answer to the
    last turn gives its reward, its reply tokens are not appended)."""
    groups = list(range(len(problems))) if groups is None else list(groups)
    comp: list[list[int]] = [[] for _ in problems]
    mask: list[list[int]] = [[] for _ in problems]
    logp: list[list[float]] = [[] for _ in problems]
    turn_ids: list[list[int]] = [[] for _ in problems]
    rewards: list[list[float]] = [[] for _ in problems]
    live = list(range(len(problems)))
    for turn in range(max_turns):
        if not live:
            break
        out = engine.generate(
            [list(problems[i].prompt) + comp[i] for i in live],
            sampling,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            seed=seed * max_turns + turn,
        )
        still = []
        for i, toks, lps in zip(live, out.completions, out.logprobs):
            comp[i] += toks
            mask[i] += [1] * len(toks)
            logp[i] += [float(x) for x in lps]
            turn_ids[i] += [turn + 1] * len(toks)
            reply, r = env.respond(problems[i], toks)
            rewards[i].append(float(r))
            if reply is None or turn == max_turns - 1:  # no turn would read a last reply
                continue
            comp[i] += reply
            mask[i] += [0] * len(reply)
            logp[i] += [0.0] * len(reply)
            turn_ids[i] += [0] * len(reply)
            still.append(i)
        live = still
    return [
        Episode(
            Rollout(
                list(p.prompt),
                comp[i],
                logp[i],
                float(sum(rewards[i])),
                groups[i],
                policy_mask=mask[i],
            ),
            rewards[i],
            turn_ids[i],
        )
        for i, p in enumerate(problems)
    ]


def step_arrays(episodes: Sequence[Episode]) -> dict[str, np.ndarray]:
    """Inputs of `multi_turn_advantages`: step_rewards/step_mask [N, S], turn_ids [N, C]
    (completion-aligned, C the longest completion), group_ids [N] renumbered into [0, N)."""
    n = len(episodes)
    s = max(1, max(len(e.step_rewards) for e in episodes))
    c = max(1, max(len(e.turn_ids) for e in episodes))
    out = {
        "step_rewards": np.zeros((n, s), np.float32),
        "step_mask": np.zeros((n, s), np.int32),
        "turn_ids": np.zeros((n, c), np.int32),
    }
    for i, e in enumerate(episodes):
        out["step_rewards"][i, : len(e.step_rewards)] = e.step_rewards
        out["step_mask"][i, : len(e.step_rewards)] = 1
        out["turn_ids"][i, : len(e.turn_ids)] = e.turn_ids
    _, g = np.unique([e.rollout.group for e in episodes], return_inverse=True)
    out["group_ids"] = g.astype(np.int32)
    return out


_CALL = re.compile(r"^\s*(\d+)\s*([+\-*])\s*(\d+)\s*=\s*$")


@dataclasses.dataclass
class CalculatorEnv:
    """A calculator tool: a turn "X op Y=" (op in + - *) is a tool call, answered with the value
    and a newline; any other turn is the final answer, rewarded 1 when its first integer equals
    `problem.answer`, and ends the episode.  encode/decode: the tokenizer's."""

    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    stop_text: str = ""

    def respond(self, problem: Problem, turn: Sequence[int]) -> tuple[list[int] | None, float]:
        text = self.decode(turn)
        if self.stop_text:
            text = text.split(self.stop_text)[0]
        m = _CALL.match(text)
        if m:
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            value = a + b if op == "+" else a - b if op == "-" else a * b
            return self.encode(f"{value}\n"), 0.0
        ans = re.search(r"-?\d+", text)
        return None, float(ans is not None and int(ans.group()) == problem.answer)


@dataclasses.dataclass
class MultiTurnTask:
    """A task played as episodes: problems from `problems` (a `Task`; its `reward` is unused),
    every policy turn answered by `env`, at most `max_turns` policy turns.  max_tool_tokens:
    a bound on one tool reply's tokens (sizes the learner's packed rows).  The train/held-out
    split is that of `problems` (`sample` never returns one of `held_out()`)."""

    problems: Task
    env: ToolEnv
    max_turns: int = 3
    max_tool_tokens: int = 8

    def sample(self, n: int, rng: np.random.Generator) -> list[Problem]:
        return self.problems.sample(n, rng)

    def held_out(self) -> list[Problem]:
        return self.problems.held_out()

    def respond(self, problem: Problem, turn: Sequence[int]) -> tuple[list[int] | None, float]:
        return self.env.respond(problem, turn)

    def max_episode_tokens(self, max_new_tokens: int) -> int:
        """Most completion tokens one episode can have (policy turns and tool replies)."""
        return self.max_turns * max_new_tokens + (self.max_turns - 1) * self.max_tool_tokens


def collect_episodes(
    engine: RolloutEngine,
    task: MultiTurnTask,
    n_prompts: int,
    group_size: int,
    sampling: SamplingParams,
    *,
    max_new_tokens: int,
    rng: np.random.Generator,
    stop_ids: Sequence[int] = (),
    seed: int = 0,
) -> tuple[list[Episode], dict[str, float]]:
    """The multi-turn `collect_rollouts`: n_prompts problems, group_size episodes each (group id
    = problem index), played with `run_episodes`.  Metrics: rollout_s, rollout_tokens (policy
    tokens generated), response_len (completion tokens per episode, tool output included),
    turns (policy turns per episode)."""
    import time

    problems = task.sample(n_prompts, rng)
    t0 = time.perf_counter()
    episodes = run_episodes(
        engine,
        task,
        [p for p in problems for _ in range(group_size)],
        sampling,
        max_turns=task.max_turns,
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        seed=seed,
        groups=np.repeat(np.arange(n_prompts), group_size).tolist(),
    )
    rollout_s = time.perf_counter() - t0
    n = max(len(episodes), 1)
    return episodes, {
        "rollout_s": rollout_s,
        "rollout_tokens": float(sum(int(np.sum(e.rollout.mask())) for e in episodes)),
        "response_len": sum(len(e.rollout.completion) for e in episodes) / n,
        "turns": sum(len(e.step_rewards) for e in episodes) / n,
    }
