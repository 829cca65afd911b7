"""The train/held-out split of the tasks: the held-out set is fixed, distinct and of the
requested size, and no training draw is one of its problems, operand swaps included (checked on
the decoded prompt text, not through the task's own keys)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxturbo.errors import UserError
from jaxturbo.rl.envs import ArithmeticTask, CharTokenizer, TokenSetTask
from jaxturbo.rl.multiturn import CalculatorEnv, MultiTurnTask

TOK = CharTokenizer()


def _operands(problem) -> tuple[int, ...]:
    """The operands a prompt shows, read back from its text ("3+5=" -> (3, 5))."""
    text = TOK.decode(problem.prompt)
    assert text.endswith("=")
    return tuple(int(x) for x in text[:-1].split("+"))


def _training_draws(task, n_batches: int = 60, n: int = 50) -> list:
    out = []
    for seed in range(n_batches):
        out += task.sample(n, np.random.default_rng(seed))
    return out


@pytest.mark.parametrize("operands, size", [(2, 20), (3, 40)])
def test_arithmetic_training_never_draws_a_held_out_problem(operands, size):
    template = "+".join(f"{{{c}}}" for c in "abc"[:operands]) + "="
    task = ArithmeticTask(
        TOK.encode,
        TOK.decode,
        max_operand=9,
        template=template,
        operands=operands,
        held_out_size=size,
    )
    held = task.held_out()
    held_ops = [_operands(p) for p in held]
    # the requested size, distinct up to operand order, answers right, and fixed
    assert len(held) == size and len({tuple(sorted(o)) for o in held_ops}) == size
    assert all(p.answer == sum(o) for p, o in zip(held, held_ops))
    assert [_operands(p) for p in task.held_out()] == held_ops
    again = ArithmeticTask(
        TOK.encode,
        TOK.decode,
        max_operand=9,
        template=template,
        operands=operands,
        held_out_size=size,
    )
    assert [_operands(p) for p in again.held_out()] == held_ops
    held_sets = {tuple(sorted(o)) for o in held_ops}
    # some held-out sums appear in training order-swapped if swaps were not excluded
    assert any(len(set(o)) > 1 for o in held_ops)
    train = _training_draws(task)
    train_ops = [_operands(p) for p in train]
    assert all(p.answer == sum(o) for p, o in zip(train, train_ops))
    assert not held_sets & {tuple(sorted(o)) for o in train_ops}
    # every other problem is still drawn: the split removes the held-out ones only
    n_distinct = task.distinct_problems()
    assert len({tuple(sorted(o)) for o in train_ops}) == n_distinct - size
    # the same task without a held-out set draws held-out problems all the time
    plain = ArithmeticTask(
        TOK.encode, TOK.decode, max_operand=9, template=template, operands=operands
    )
    assert held_sets & {tuple(sorted(_operands(p))) for p in _training_draws(plain, 4)}


def test_multi_turn_task_keeps_the_split_of_its_problems():
    problems = ArithmeticTask(
        TOK.encode, TOK.decode, max_operand=4, template="{a}+{b}+{c}=", operands=3, held_out_size=10
    )
    task = MultiTurnTask(problems, CalculatorEnv(TOK.encode, TOK.decode), max_turns=2)
    held = {tuple(sorted(_operands(p))) for p in task.held_out()}
    assert len(held) == 10
    assert held == {tuple(sorted(_operands(p))) for p in problems.held_out()}
    assert not held & {tuple(sorted(_operands(p))) for p in _training_draws(task, 20)}


def test_token_set_task_split():
    task = TokenSetTask(4, frozenset({0}), prompt_len=2, held_out_size=5)
    held = {tuple(p.prompt) for p in task.held_out()}
    assert len(held) == 5
    train = {tuple(p.prompt) for p in _training_draws(task, 10)}
    assert not held & train and len(train) == 16 - 5


def test_no_held_out_set_keeps_the_plain_stream():
    # without a held-out set, the draws are the RNG's plain ones (as before the split existed)
    task = ArithmeticTask(TOK.encode, TOK.decode, max_operand=20)
    got = [_operands(p) for p in task.sample(6, np.random.default_rng(3))]
    want = np.random.default_rng(3).integers(0, 21, size=(6, 2))
    assert got == [tuple(map(int, r)) for r in want] and task.held_out() == []


@pytest.mark.parametrize("size", [55, 56, -1])
def test_held_out_set_must_leave_training_problems(size):
    # operands in [0, 9], order ignored: 55 distinct sums
    with pytest.raises(UserError, match=f"held-out set of {size} problems .* 55 distinct"):
        ArithmeticTask(TOK.encode, TOK.decode, max_operand=9, held_out_size=size)
    assert (
        len(ArithmeticTask(TOK.encode, TOK.decode, max_operand=9, held_out_size=54).held_out())
        == 54
    )
