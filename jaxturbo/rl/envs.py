"""Single-turn verifiable tasks: problems with a prompt and a programmatic reward.

    task = ArithmeticTask(encode, decode, held_out_size=128)
    held = task.held_out()                          # fixed evaluation problems
    problems = task.sample(n, rng)                  # n training problems, none of them held out
    problem.prompt                                  # token ids
    task.reward(problem, completion_ids) -> float   # in [0, 1]

The train/held-out split belongs to the task: it draws its `held_out_size` evaluation problems
first (own RNG, `held_out_seed`; distinct), and its training sampler rejects every problem with
the key of a held-out one (`Problem.key`: what makes two problems the same question, e.g. the
operands in any order for sums, so "3+5=" is held out together with "5+3=").  Learners, the CLI
and notebooks sample through `sample`, so none of them trains on an evaluation problem.

Tasks work on token ids; those that are text tasks take an `encode`/`decode` pair (a HF
tokenizer's, or `CharTokenizer` for tests).  Multi-turn environments (tool calls between turns) are in `jaxturbo.rl.multiturn`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

import numpy as np

from jaxturbo.errors import UserError


@dataclasses.dataclass
class Problem:
    """prompt: token ids; answer: what the reward checks; key: the problem's identity for the
    train/held-out split (equal keys: the same question, e.g. a sum with its operands swapped)."""

    prompt: list[int]
    answer: Any = None
    key: Hashable = None


class Task(Protocol):
    def sample(self, n: int, rng: np.random.Generator) -> list[Problem]: ...

    def held_out(self) -> list[Problem]: ...

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


class HeldOutSplit:
    """Base of tasks whose evaluation problems never occur in training (module docstring).

    Subclasses (dataclasses with fields `held_out_size` and `held_out_seed`) define
    `_candidates(n, rng)` -> [n, ...] raw draws, `_key(row)`, `_problem(row)` and
    `distinct_problems()` (how many different keys exist)."""

    held_out_size: int
    held_out_seed: int

    def _candidates(self, n: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def _key(self, row: np.ndarray) -> Hashable:
        raise NotImplementedError

    def _problem(self, row: np.ndarray) -> Problem:
        raise NotImplementedError

    def distinct_problems(self) -> int:
        raise NotImplementedError

    def __post_init__(self) -> None:
        n, space = self.held_out_size, self.distinct_problems()
        if not 0 <= n < space:
            raise UserError(
                f"held-out set of {n} problems must be >= 0 and leave training problems "
                f"among the {space} distinct ones of {self._describe()}; use at most "
                f"{space - 1}, or more distinct problems (e.g. a larger max_operand)"
            )
        rng = np.random.default_rng(self.held_out_seed)
        held: dict[Hashable, np.ndarray] = {}
        while len(held) < n:  # distinct keys, in the order first drawn
            for row in self._candidates(n - len(held), rng):
                held.setdefault(self._key(row), row)
        self._held_rows = list(held.values())
        self._held_keys = frozenset(held)

    def _describe(self) -> str:
        return type(self).__name__

    def held_out(self) -> list[Problem]:
        """The fixed evaluation problems: `held_out_size` of them, distinct, the same on every
        call (and for every task built with the same settings)."""
        return [self._problem(row) for row in self._held_rows]

    def sample(self, n: int, rng: np.random.Generator) -> list[Problem]:
        """n training problems (repeats allowed), none with a held-out key: rejected draws are
        drawn again, so without a held-out set the stream is that of the plain draws."""
        rows: list[np.ndarray] = []
        while len(rows) < n:
            rows += [
                r
                for r in self._candidates(n - len(rows), rng)
                if self._key(r) not in self._held_keys
            ]
        return [self._problem(r) for r in rows]


@dataclasses.dataclass
class ArithmeticTask(HeldOutSplit):
    """ "a+b=" problems with operands in [0, max_operand]; reward 1 when the last integer the
    completion writes equals a + b (an exact-answer check, as in verifiable-reward RL; the last
    one, because models often restate the question: "7 + 8 = 15").  `template` is formatted
    with a and b and then encoded (an `encode` may wrap it in a chat template).  operands > 2
    sums that many numbers, named a, b, c, ... in the template (e.g. "{a}+{b}+{c}=", the
    multi-turn calculator task's problems).  A problem's key is its sorted operands: a
    held-out sum is held out in every operand order."""

    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    max_operand: int = 9
    template: str = "{a}+{b}="
    operands: int = 2
    held_out_size: int = 0
    held_out_seed: int = 10_000

    def _candidates(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, self.max_operand + 1, size=(n, self.operands))

    def _key(self, row: np.ndarray) -> Hashable:
        return tuple(sorted(int(x) for x in row))

    def _problem(self, row: np.ndarray) -> Problem:
        ops = dict(zip("abcdefgh", map(int, row)))
        return Problem(self.encode(self.template.format(**ops)), int(row.sum()), self._key(row))

    def distinct_problems(self) -> int:
        # multisets of `operands` values from max_operand + 1
        return math.comb(self.max_operand + self.operands, self.operands)

    def _describe(self) -> str:
        return f"{self.operands} operands in [0, {self.max_operand}] (order ignored)"

    def reward(self, problem: Problem, completion: Sequence[int]) -> float:
        nums = re.findall(r"-?\d+", self.decode(completion))
        return float(bool(nums) and int(nums[-1]) == problem.answer)


@dataclasses.dataclass
class TokenSetTask(HeldOutSplit):
    """A trivially learnable reward for end-to-end tests: random prompts of `prompt_len` ids;
    reward = fraction of the completion's tokens that lie in `good` (a random policy over V
    tokens scores len(good) / V; the optimum is 1).  A problem's key is its prompt."""

    vocab_size: int
    good: frozenset[int]
    prompt_len: int = 3
    held_out_size: int = 0
    held_out_seed: int = 10_000

    def _candidates(self, n: int, rng: np.random.Generator) -> np.ndarray:
        # one draw per prompt, as before the split existed (the same stream without held-out)
        return np.array(
            [rng.integers(0, self.vocab_size, self.prompt_len) for _ in range(n)], np.int64
        ).reshape(n, self.prompt_len)

    def _key(self, row: np.ndarray) -> Hashable:
        return tuple(int(x) for x in row)

    def _problem(self, row: np.ndarray) -> Problem:
        return Problem([int(x) for x in row], key=self._key(row))

    def distinct_problems(self) -> int:
        return self.vocab_size**self.prompt_len

    def _describe(self) -> str:
        return f"prompts of {self.prompt_len} ids below {self.vocab_size}"

    def reward(self, problem: Problem, completion: Sequence[int]) -> float:
        return float(np.mean([t in self.good for t in completion])) if completion else 0.0
