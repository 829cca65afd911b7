"""Single-turn verifiable tasks: problems with a prompt and a programmatic reward.

    problems = task.sample(n, rng)                  # n problems
    problem.prompt                                  # token ids
    task.reward(problem, completion_ids) -> float   # in [0, 1]

Tasks work on token ids; those that are text tasks take an `encode`/`decode` pair (a HF
tokenizer's, or `CharTokenizer` for tests).  Multi-turn environments (tool calls between turns) are in `jaxturbo.rl.multiturn`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np


@dataclasses.dataclass
class Problem:
    prompt: list[int]
    answer: Any = None


class Task(Protocol):
    def sample(self, n: int, rng: np.random.Generator) -> list[Problem]: ...

    def reward(self, problem: Problem, completion: Sequence[int]) -> float: ...


class CharTokenizer:
    """Characters <-> ids (id 0 is the end token): enough for arithmetic tasks in tests."""

    def __init__(self, alphabet: str = "0123456789+-*= \n"):
        self.alphabet = alphabet
        self.eos_id = 0

    def encode(self, text: str) -> list[int]:
        return [self.alphabet.index(ch) + 1 for ch in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.alphabet[i - 1] for i in ids if 0 < i <= len(self.alphabet))


@dataclasses.dataclass
class ArithmeticTask:
    """"a+b=" problems with operands in [0, max_operand]; reward 1 when the last integer the
    completion writes equals a + b (an exact-answer check, as in verifiable-reward RL; the last
    one, because models often restate the question: "7 + 8 = 15").  `template` is formatted
    with a and b and then encoded (an `encode` may wrap it in a chat template).  operands > 2
    sums that many numbers, named a, b, c, ... in the template (e.g. "{a}+{b}+{c}=", the
    multi-turn calculator task's problems)."""

    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    max_operand: int = 9
    template: str = "{a}+{b}="
    operands: int = 2

    def sample(self, n: int, rng: np.random.Generator) -> list[Problem]:
        xs = rng.integers(0, self.max_operand + 1, size=(n, self.operands))
        return [Problem(self.encode(self.template.format(**dict(zip("abcdefgh", map(int, x))))),
                        int(x.sum())) for x in xs]

    def reward(self, problem: Problem, completion: Sequence[int]) -> float:
        nums = re.findall(r"-?\d+", self.decode(completion))
        return float(bool(nums) and int(nums[-1]) == problem.answer)


@dataclasses.dataclass
class TokenSetTask:
    """A trivially learnable reward for end-to-end tests: random prompts of `prompt_len` ids;
    reward = fraction of the completion's tokens that lie in `good` (a random policy over V
    tokens scores len(good) / V; the optimum is 1)."""

    vocab_size: int
    good: frozenset[int]
    prompt_len: int = 3

    def sample(self, n: int, rng: np.random.Generator) -> list[Problem]:
        return [Problem(rng.integers(0, self.vocab_size, self.prompt_len).tolist())
                for _ in range(n)]

    def reward(self, problem: Problem, completion: Sequence[int]) -> float:
        return float(np.mean([t in self.good for t in completion])) if completion else 0.0
