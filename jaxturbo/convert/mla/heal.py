"""Healing: distil the converted MLA model toward the original GQA model (logit KL).

The teacher's logits come from the GQA forward with frozen params; the student's from
`mla_forward`; the loss is `train.losses.distill_kl` and the step is the training core's
`make_train_step` (float32 master weights, AdamW).

Data: healing trains on every position of its windows (`heal_batches`: disjoint windows from
the start of the training tokens, cycled); `jaxturbo convert-mla` gives it only the tokens
before its held-out perplexity windows (`calibrate.split_held_out`), so the scored tokens are
never healed on.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from jaxturbo.models.config import ModelConfig
from jaxturbo.models.mla import MLAConfig, mla_forward
from jaxturbo.models.transformer import Params, forward
from jaxturbo.train.losses import distill_kl
from jaxturbo.train.optimizer import OptimizerConfig, make_optimizer
from jaxturbo.train.step import TrainConfig, init_state, make_train_step


def heal_batches(token_ids: np.ndarray, steps: int, batch: int, length: int) -> list[np.ndarray]:
    """[batch, length] int32 token batches for `steps` heal steps: consecutive disjoint windows
    from the start of `token_ids`, as many as the steps use or the text holds (whole batches);
    `heal` cycles them when there are fewer than `steps`."""
    windows = min(steps * batch, len(token_ids) // length // batch * batch)
    if windows < batch:
        from jaxturbo.errors import UserError
        raise UserError(f"healing needs at least one batch of {batch} x {length} = "
                        f"{batch * length} tokens, the training text has {len(token_ids)}; "
                        "lower --heal-batch or --calib-len")
    w = np.asarray(token_ids[:windows * length], np.int32).reshape(windows, length)
    return [w[i:i + batch] for i in range(0, windows, batch)]


def heal(student: Params, mla_cfg: MLAConfig, teacher: Params, teacher_cfg: ModelConfig,
         batches: list[np.ndarray], *, steps: int, lr: float = 1e-4,
         compute_dtype: str = "float32",
         progress: Callable[[dict], None] | None = None,
         every: int = 0, on_every: Callable[[int, Params], None] | None = None) -> Params:
    """`steps` AdamW steps of KL(teacher || student) on [B, T] token batches (cycled).

    `on_every(step, params)` runs after every `every`-th step (e.g. a perplexity curve).
    Returns the healed student params (float32).  Heal tokens = steps * B * T.
    """
    def loss_fn(p: Params, batch: dict):
        s, _ = mla_forward(p, mla_cfg, batch["tokens"], attn_impl="xla")
        # the teacher travels in the batch, not as a closure: closed-over arrays would be
        # baked into the compiled step as constants
        t, _ = forward(batch["teacher"], teacher_cfg, batch["tokens"], attn_impl="xla")
        return distill_kl(s, t, batch["weights"]), {}

    opt = make_optimizer(OptimizerConfig(learning_rate=lr, warmup_steps=max(1, steps // 10),
                                         total_steps=steps, weight_decay=0.0))
    train_cfg = TrainConfig(compute_dtype=compute_dtype)
    step = make_train_step(teacher_cfg, train_cfg, opt, loss_fn=loss_fn)
    state = init_state(jax.tree.map(np.asarray, student), opt)
    for i in range(steps):
        toks = batches[i % len(batches)]
        batch = {"tokens": toks, "weights": np.ones(toks.shape, np.float32), "teacher": teacher}
        state, metrics = step(state, batch)
        if progress is not None:
            progress({"step": i + 1, "kl": float(metrics["loss"])})
        if on_every is not None and every > 0 and (i + 1) % every == 0 and i + 1 < steps:
            on_every(i + 1, state.params)
    return state.params
