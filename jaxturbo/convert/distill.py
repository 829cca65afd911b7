"""Healing a converted model: logit distillation toward the model it was converted from.

One implementation for every conversion that heals (GQA -> MLA in `convert.mla.heal`,
standard -> Ladder-Residual in `convert.ladderize`): the student is the converted model, the
teacher the original with frozen weights; the loss is token-level KL(teacher || student) of
the next-token distributions (`train.losses.distill_kl`) on every position of plain text
windows; the step is the training core's (`train.step.make_train_step`: float32 master weights,
AdamW with warm-up and cosine decay, no weight decay) and the loop the shared trainer
(`train.trainer.train`: metrics.jsonl, TensorBoard, progress, a KL plot).

Data: `heal_batches` takes consecutive disjoint windows from the start of the training tokens
(cycled when the steps need more); the conversions hand it only the tokens before their
held-out perplexity windows (`convert.mla.calibrate.split_held_out`), so no scored token is
ever trained on.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.transformer import Params
from jaxturbo.train.losses import distill_kl
from jaxturbo.train.optimizer import OptimizerConfig, lr_schedule, make_optimizer
from jaxturbo.train.sft import plot_loss
from jaxturbo.train.step import TrainConfig, TrainState, init_state, make_train_step
from jaxturbo.train.trainer import LoopConfig, train

# (params, tokens [B, T] int32) -> logits [B, T, V] float32
Forward = Callable[[Params, jax.Array], jax.Array]


def heal_batches(
    token_ids: np.ndarray,
    steps: int,
    batch: int,
    length: int,
    *,
    flags: str = "--heal-batch or --calib-len",
) -> list[np.ndarray]:
    """[batch, length] int32 token batches for `steps` heal steps: consecutive disjoint windows
    from the start of `token_ids`, as many as the steps use or the text holds (whole batches);
    `distill` cycles them when there are fewer than `steps`.  `flags`: what the error tells the
    user to lower when the text holds less than one batch."""
    windows = min(steps * batch, len(token_ids) // length // batch * batch)
    if windows < batch:
        raise UserError(
            f"healing needs at least one batch of {batch} x {length} = "
            f"{batch * length} tokens, the training text has {len(token_ids)}; "
            f"lower {flags}"
        )
    w = np.asarray(token_ids[: windows * length], np.int32).reshape(windows, length)
    return [w[i : i + batch] for i in range(0, windows, batch)]


class CycledBatches:
    """The heal batches in order, forever; the position is a checkpointable JSON value
    (the trainer's DataSource)."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        if not batches:
            raise UserError("healing needs at least one token batch")
        self.batches, self.position = batches, 0

    def __next__(self) -> np.ndarray:
        b = self.batches[self.position % len(self.batches)]
        self.position += 1
        return b

    def get_state(self) -> dict[str, Any]:
        return {"position": self.position}

    def set_state(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


@dataclasses.dataclass
class DistillResult:
    """params: the healed student (float32).  history: one record per step (loss = the
    training KL in nats/token, grad_norm, lr, step_time_s).  evals: `evaluate`'s records
    (step 0, every `eval_every` steps, the last step)."""

    params: Params
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]


def distill_loss(student_fn: Forward, teacher_fn: Forward) -> Callable:
    """loss_fn(params, batch) for `make_train_step`: KL(teacher || student) on every position
    of batch["tokens"] [B, T] weighted by batch["weights"] [B, T]; the teacher's params travel
    in batch["teacher"] (as an argument: closed-over arrays would be baked into the compiled
    step as constants)."""

    def loss_fn(p: Params, batch: dict):
        s = student_fn(p, batch["tokens"])
        t = teacher_fn(batch["teacher"], batch["tokens"])
        return distill_kl(s, t, batch["weights"]), {}

    return loss_fn


def distill(
    student: Params,
    student_fn: Forward,
    teacher: Params,
    teacher_fn: Forward,
    teacher_cfg: ModelConfig,
    batches: list[np.ndarray],
    *,
    steps: int,
    lr: float,
    compute_dtype: str = "float32",
    out_dir: str | Path | None = None,
    evaluate: Callable[[Params, int], dict[str, float]] | None = None,
    eval_every: int = 0,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    name: str = "heal",
) -> DistillResult:
    """`steps` AdamW steps of KL(teacher || student) on the [B, T] token `batches` (cycled).

    student_fn/teacher_fn: the two forwards (`Forward`); teacher_cfg: the config the step is
    built for (its checks; the loss is `distill_loss`).  out_dir: where the trainer writes
    metrics.jsonl, tensorboard/ and kl.png (None: a temporary directory, removed after).
    evaluate(params, step) -> {name: float}: before the first step, every `eval_every` steps and
    after the last (the trainer's evaluation).  on_step(record) after each step; progress: the
    trainer's bar or step lines on stderr.  Heal tokens = steps * B * T.
    """
    if steps < 1:
        raise UserError(f"heal steps={steps} must be >= 1")
    if not (lr > 0 and math.isfinite(lr)):
        raise UserError(f"heal learning rate {lr} must be a positive number")
    opt_cfg = OptimizerConfig(
        learning_rate=lr, warmup_steps=max(1, steps // 10), total_steps=steps, weight_decay=0.0
    )
    opt = make_optimizer(opt_cfg)
    schedule = lr_schedule(opt_cfg)
    step = make_train_step(
        teacher_cfg,
        TrainConfig(compute_dtype=compute_dtype),
        opt,
        loss_fn=distill_loss(student_fn, teacher_fn),
    )
    state = init_state(jax.tree.map(np.asarray, student), opt)
    teacher = jax.device_put(teacher)  # once: numpy leaves would be copied in at every step
    ones = {b.shape: np.ones(b.shape, np.float32) for b in batches}

    def step_fn(state: TrainState, tokens: np.ndarray) -> tuple[TrainState, dict[str, float]]:
        state, m = step(
            state, {"tokens": tokens, "weights": ones[tokens.shape], "teacher": teacher}
        )
        kl = float(m["loss"])  # waits for the step: the loop's timing is the step's
        if not math.isfinite(kl):
            raise FloatingPointError(
                f"the heal KL became {kl} at step {int(state.step)}; lower the heal learning rate"
            )
        return state, {"loss": kl, "grad_norm": float(m["grad_norm"])}

    def derive(rec: dict[str, Any]) -> None:
        rec["lr"] = float(schedule(rec["step"] - 1))

    def describe(rec: dict[str, Any]) -> dict[str, str]:
        return {"kl": f"{rec['loss']:.4f}"}

    scratch = None
    if out_dir is None:
        out_dir = scratch = tempfile.mkdtemp(prefix="jaxturbo-heal-")
    try:
        res = train(
            step_fn,
            state,
            CycledBatches(batches),
            LoopConfig(
                out_dir=str(out_dir),
                steps=steps,
                save_every=None,
                eval_every=eval_every,
                progress=progress,
                name=name,
                tensorboard=scratch is None,
                plot=scratch is None,
            ),
            evaluate=None if evaluate is None else (lambda s, i: evaluate(s.params, i)),
            derive=derive,
            describe=describe,
            on_step=on_step,
            plots={"kl.png": plot_loss},
        )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return DistillResult(res.state.params, res.history, res.evals)
