"""Standard -> hybrid Ladder-Residual conversion of a pretrained model, and its healing.

`ladderize(params, cfg, n)` turns the last `n` layers into Ladder-Residual layers (each module
reads the residual stream one module late, Zhang et al. 2025, so that tensor parallelism can
overlap each all-reduce with the next module).  The weights are the same tensors: the
conversion is a config change.  Without retraining quality drops as `n` grows (SmolLM2-135M,
WikiText-2: perplexity x1.46 at 8 of 30 layers, experiments/ladderize/RESULTS.md).

`heal(params, ladder_cfg, teacher_cfg, batches, ...)` recovers it: logit distillation of the
ladderized student toward the original (teacher: the same weights with the original residual
stream), the distillation every conversion shares (`jaxturbo.convert.distill`).  Heal tokens
come from the training part of the text only (`split_held_out`): the scored windows are
never trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxturbo.convert.distill import DistillResult, distill, heal_batches
from jaxturbo.convert.mla.calibrate import split_held_out
from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.transformer import Params, forward

__all__ = ["heal", "heal_batches", "ladder_config", "ladderize", "split_held_out"]

CONVERTIBLE = ("standard", "hybrid", "ladder")


def ladder_config(cfg: ModelConfig, n_layers: int) -> ModelConfig:
    """`cfg` with Ladder-Residual on its last `n_layers` layers (`hybrid`; 0 = standard).

    Needs only the config (the command checks --layers before reading weights).  Raises
    UserError naming the valid range when `n_layers` is not in [0, num_hidden_layers].
    """
    n = cfg.num_hidden_layers
    if not 0 <= n_layers <= n:
        raise UserError(
            f"--ladder-layers {n_layers} is out of range for a model with {n} layers; "
            f"choose N in [0, {n}] (0 = unchanged, {n} = every layer ladder)"
        )
    if cfg.residual_mode not in CONVERTIBLE:
        raise UserError(
            f"cannot convert a {cfg.residual_mode!r} model to Ladder-Residual; "
            "start from a standard (or ladder/hybrid) checkpoint"
        )
    return cfg.replace(residual_mode="hybrid", ladder_layers=n_layers)


def ladderize(params: Params, cfg: ModelConfig, n_layers: int) -> ModelConfig:
    """The config of `params` run as hybrid Ladder-Residual on the last `n_layers` layers.

    params: the model's weights, unchanged (the same tensors serve the returned config);
    checked to have `cfg.num_hidden_layers` stacked layers.  See `ladder_config`.
    """
    q = params["layers"]["self_attn.q_proj.weight"]
    if q.shape[0] != cfg.num_hidden_layers:
        raise UserError(
            f"the params hold {q.shape[0]} layers, the config "
            f"{cfg.num_hidden_layers}; pass the config the params were loaded with"
        )
    return ladder_config(cfg, n_layers)


def heal(
    params: Params,
    ladder_cfg: ModelConfig,
    teacher_cfg: ModelConfig,
    batches: list[np.ndarray],
    *,
    steps: int,
    lr: float = 1e-4,
    compute_dtype: str = "float32",
    out_dir: str | Path | None = None,
    evaluate: Callable[[Params, int], dict[str, float]] | None = None,
    eval_every: int = 0,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> DistillResult:
    """Distil the ladderized model toward the original: `steps` AdamW steps of
    KL(teacher || student) on every position of the [B, T] token `batches` (cycled).

    params: the original weights (the teacher, frozen, and the student's starting point);
    ladder_cfg: the student (`ladderize`'s config); teacher_cfg: the config the weights were
    trained with.  out_dir, evaluate, eval_every, on_step, progress: `distill`'s.  Returns the
    healed params (float32, to be run with `ladder_cfg`), the step records and evaluations.
    """
    if ladder_cfg.num_hidden_layers != teacher_cfg.num_hidden_layers:
        raise UserError(
            f"student has {ladder_cfg.num_hidden_layers} layers, teacher "
            f"{teacher_cfg.num_hidden_layers}: heal takes the config the weights "
            "came with and its ladderized copy"
        )

    def student_fn(p: Params, tokens: jax.Array) -> jax.Array:
        return forward(p, ladder_cfg, tokens, attn_impl="xla")[0]

    def teacher_fn(p: Params, tokens: jax.Array) -> jax.Array:
        return forward(p, teacher_cfg, tokens, attn_impl="xla")[0]

    return distill(
        params,
        student_fn,
        params,
        teacher_fn,
        teacher_cfg,
        batches,
        steps=steps,
        lr=lr,
        compute_dtype=compute_dtype,
        out_dir=out_dir,
        evaluate=evaluate,
        eval_every=eval_every,
        on_step=on_step,
        progress=progress,
        name="heal",
    )
