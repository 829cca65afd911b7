"""Healing: distil the converted MLA model toward the original GQA model (logit KL).

The teacher's logits come from the GQA forward with frozen params; the student's from
`mla_forward`; the distillation (loss, step, loop) is the one every conversion shares,
`jaxturbo.convert.distill`.

Data: healing trains on every position of its windows (`heal_batches`: disjoint windows from
the start of the training tokens, cycled); `jaxturbo convert-mla` gives it only the tokens
before its held-out perplexity windows (`calibrate.split_held_out`), so the scored tokens are
never healed on.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jaxturbo.convert.distill import distill, heal_batches
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.mla import MLAConfig, mla_forward
from jaxturbo.models.transformer import Params, forward

__all__ = ["heal", "heal_batches"]


def heal(
    student: Params,
    mla_cfg: MLAConfig,
    teacher: Params,
    teacher_cfg: ModelConfig,
    batches: list[np.ndarray],
    *,
    steps: int,
    lr: float = 1e-4,
    compute_dtype: str = "float32",
    progress: Callable[[dict], None] | None = None,
    every: int = 0,
    on_every: Callable[[int, Params], None] | None = None,
) -> Params:
    """`steps` AdamW steps of KL(teacher || student) on [B, T] token batches (cycled).

    progress({"step": n, "kl": float}) after each step; `on_every(step, params)` runs after
    every `every`-th step but the last (e.g. a perplexity curve).  Returns the healed student
    params (float32).  Heal tokens = steps * B * T.
    """

    def student_fn(p: Params, tokens):
        return mla_forward(p, mla_cfg, tokens, attn_impl="xla")[0]

    def teacher_fn(p: Params, tokens):
        return forward(p, teacher_cfg, tokens, attn_impl="xla")[0]

    def evaluate(params: Params, step: int) -> dict[str, float]:
        if on_every is not None and every > 0 and 0 < step < steps:
            on_every(step, params)
        return {}

    def on_step(rec: dict) -> None:
        if progress is not None:
            progress({"step": rec["step"], "kl": rec["loss"]})

    return distill(
        student,
        student_fn,
        teacher,
        teacher_fn,
        teacher_cfg,
        batches,
        steps=steps,
        lr=lr,
        compute_dtype=compute_dtype,
        evaluate=evaluate,
        eval_every=every,
        on_step=on_step,
        progress=False,
    ).params
