"""AdamW with linear warm-up and cosine decay, global-norm clipping, no decay on norms/biases."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from jaxturbo.errors import UserError


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer hyper-parameters.

    learning_rate: peak learning rate, reached after `warmup_steps` (linear from peak / warmup_steps).
    total_steps: length of the schedule; cosine decay (Loshchilov & Hutter, SGDR) from the peak
      at the end of warm-up to `min_lr_ratio * learning_rate` at `total_steps`.
    b1, b2, eps, weight_decay: AdamW (Loshchilov & Hutter, 2019); decoupled decay, applied to
      matrices only (norm scales and biases are not decayed).
    clip_norm: clip gradients to this global L2 norm before the update (None: no clipping).
    """

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 1000
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0

    def validate(self) -> None:
        if self.total_steps < 1:
            raise UserError(f"total_steps={self.total_steps} must be >= 1")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise UserError(
                f"warmup_steps={self.warmup_steps} must be in [0, total_steps={self.total_steps}]"
            )
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate={self.learning_rate} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")


def lr_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """step -> learning rate: linear warm-up from peak / warmup_steps, then cosine down to min_lr_ratio * peak."""
    cfg.validate()
    # start at peak / warmup rather than 0, so that the first step is not wasted
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.learning_rate / max(cfg.warmup_steps, 1),
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: weight matrices, not norm scales or biases."""

    def decays(path: tuple, _leaf: Any) -> bool:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return not ("norm" in name or name.endswith(".bias"))

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW on the `lr_schedule`."""
    parts = [] if cfg.clip_norm is None else [optax.clip_by_global_norm(cfg.clip_norm)]
    parts.append(
        optax.adamw(
            lr_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)
