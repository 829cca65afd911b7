"""Multi-turn episodes with a calculator tool: tool output is in the context but never trained;
per-turn rewards and turn ids feed step-level advantages (scripted policy, no model)."""

from __future__ import annotations

import numpy as np

from jaxturbo.inference.sampling import SamplingParams
from jaxturbo.rl.advantages import multi_turn_advantages
from jaxturbo.rl.batch import pack_rollouts
from jaxturbo.rl.envs import CharTokenizer, Problem
from jaxturbo.rl.multiturn import CalculatorEnv, run_episodes, step_arrays
from jaxturbo.rl.rollout import RolloutOutput

TOK = CharTokenizer()


class ScriptedEngine:
    """Plays fixed turns per prompt (keyed by the prompt's first token) and records contexts."""

    def __init__(self, script: dict[int, list[str]]):
        self.script, self.seen = script, []

    def generate(self, prompts, sampling, *, max_new_tokens, stop_ids=(), seed=0):
        self.seen.append([list(p) for p in prompts])
        comps, lps = [], []
        for p in prompts:
            turns = self.script[p[0]]
            k = len([x for x in self.seen if any(q[0] == p[0] for q in x)]) - 1
            ids = TOK.encode(turns[k])
            comps.append(ids)
            lps.append(np.full(len(ids), -0.5, np.float32))
        return RolloutOutput(comps, lps, [False] * len(comps))

    def score(self, *a, **k):
        raise NotImplementedError

    def update_weights(self, params):
        pass


def test_calculator_episodes_masks_rewards_and_step_advantages():
    p1 = Problem(TOK.encode("1*3+4="), 7)  # uses the tool, then answers right
    p2 = Problem(TOK.encode("2*3+4="), 10)  # answers wrong without the tool
    eng = ScriptedEngine({TOK.encode("1")[0]: ["1*3=", "3+4=", "7"], TOK.encode("2")[0]: ["9"]})
    env = CalculatorEnv(TOK.encode, TOK.decode)
    eps = run_episodes(
        eng, env, [p1, p2], SamplingParams(), max_turns=4, max_new_tokens=8, groups=[0, 0]
    )
    e1, e2 = eps
    # episode 1: "1*3=" -> tool "3\n" -> "3+4=" -> tool "7\n" -> "7" (reward 1)
    assert TOK.decode(e1.rollout.completion) == "1*3=3\n3+4=7\n7"
    assert e1.rollout.policy_mask == [1] * 4 + [0] * 2 + [1] * 4 + [0] * 2 + [1]
    assert e1.turn_ids == [1] * 4 + [0] * 2 + [2] * 4 + [0] * 2 + [3]
    assert e1.step_rewards == [0.0, 0.0, 1.0] and e1.rollout.reward == 1.0
    assert e1.rollout.logprobs[4:6] == [0.0, 0.0] and e1.rollout.logprobs[0] == -0.5
    # the second turn saw the tool's answer in its context
    assert TOK.decode(eng.seen[1][0]) == "1*3+4=1*3=3\n"
    assert TOK.decode(e2.rollout.completion) == "9" and e2.step_rewards == [0.0]
    assert len(eng.seen[1]) == 1  # episode 2 ended after one turn

    arr = step_arrays(eps)
    adv = np.asarray(
        multi_turn_advantages(
            arr["step_rewards"], arr["step_mask"], arr["turn_ids"], arr["group_ids"], level="step"
        )
    )
    # returns-to-go (gamma 1): e1 [1, 1, 1], e2 [0]; group mean .75, centred [.25]*3, -.75;
    # unbiased std sqrt((3 * .0625 + .5625) / 3) = .5 -> e1 turns +.5, e2 -1.5; tool tokens 0
    np.testing.assert_allclose(
        adv[0, :13], np.array([0.5] * 4 + [0] * 2 + [0.5] * 4 + [0] * 2 + [0.5]), atol=1e-5
    )
    np.testing.assert_allclose(adv[1, :1], [-1.5], atol=1e-5)
    # packed: the tool tokens 3, \n, 7, \n are targets with weight 0
    b = pack_rollouts([e1.rollout], adv[:1], seq_len=32)
    w = b["weights"][0]
    assert w.sum() == 9 and b["advantages"][0][w == 0].sum() == 0
