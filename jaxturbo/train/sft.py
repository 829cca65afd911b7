"""Supervised fine-tuning: packed batches through the shared training loop, and the whole run
behind `jaxturbo sft` (held-in evaluation, the final HF export).

    result = train_sft(model_cfg, params, docs, RunConfig(out_dir=..., steps=...), ...)
    result = run_sft(model_cfg, params, tokenizer, records, RunConfig(...), export=...)

Resuming (`resume=True`) restores the newest complete checkpoint in `out_dir/checkpoints`
(params, optimizer state, step, RNG, data iterator) and continues; with the same settings the
losses of the following steps are bit-identical to an uninterrupted run's
(`jaxturbo.train.trainer`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxturbo.data.pipeline import Doc, PackedBatches, encode_documents
from jaxturbo.data.records import Record
from jaxturbo.data.tokenize import tokenize_record
from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.lora import target_weights
from jaxturbo.models.transformer import Params
from jaxturbo.train import sharding as shd
from jaxturbo.train.losses import ROUTER_METRICS
from jaxturbo.train.metrics import peak_flops, train_flops_per_token
from jaxturbo.train.optimizer import OptimizerConfig, lr_schedule, make_optimizer
from jaxturbo.train.step import TrainConfig, TrainState, init_state, make_train_step, model_params
from jaxturbo.train.trainer import (
    Exporter,
    LoopConfig,
    LoopResult,
    host_params,
    save_tokenizer,
    train,
)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What an SFT run does and where it writes.

    steps: optimizer steps in total (a resumed run counts the restored steps too).
    batch_size, seq_len: global batch rows and tokens per row.
    save_every, keep: checkpoint every N steps and at the end (0: at the end only; None: no
      checkpoints), keep the last K.
    eval_every: with an evaluation, run it every N steps too (0: before and after only).
    sequence_parallel: "none", "ulysses", "ring" or "hybrid" over the mesh's `sequence` axis
      (jaxturbo.parallel.sequence).  Not part of the checkpoint's identity: the math is the
      same, so a run may resume with another mode or mesh.
    """

    out_dir: str
    steps: int
    batch_size: int = 8
    seq_len: int = 512
    seed: int = 0
    save_every: int | None = 100
    keep: int = 3
    resume: bool = False
    eval_every: int = 0
    progress: bool = True
    plot: bool = True
    tensorboard: bool = True
    sequence_parallel: str = "none"

    def loop(self) -> LoopConfig:
        return LoopConfig(
            out_dir=self.out_dir,
            steps=self.steps,
            save_every=self.save_every,
            keep=self.keep,
            resume=self.resume,
            eval_every=self.eval_every,
            progress=self.progress,
            plot=self.plot,
            tensorboard=self.tensorboard,
            name="sft",
        )

    def check(self, mesh: Mesh | None, grad_accum: int = 1) -> None:
        """Refusals that need no model or data (the mesh's axes against the SP mode, the batch
        against grad_accum, the mesh and the process count): UserError naming the field."""
        self.loop().validate()
        if self.batch_size < 1 or self.seq_len < 2:
            raise UserError(
                f"need batch_size >= 1 and seq_len >= 2 (got batch_size="
                f"{self.batch_size}, seq_len={self.seq_len})"
            )
        if mesh is not None:
            shd.check_training_mesh(mesh, self.sequence_parallel)
            shd.check_batch_size(self.batch_size, mesh, grad_accum)
        elif self.sequence_parallel != "none":
            raise UserError(
                f"sequence_parallel={self.sequence_parallel} needs a mesh with a "
                "sequence axis (e.g. data=2,sequence=4)"
            )
        elif self.batch_size % grad_accum:
            raise UserError(
                f"batch_size={self.batch_size} must be a multiple of grad_accum={grad_accum}"
            )
        if self.batch_size % jax.process_count():
            raise UserError(
                f"batch_size={self.batch_size} must be a multiple of the process "
                f"count {jax.process_count()}"
            )


def check_model(
    model_cfg: ModelConfig, params: Params, run: RunConfig, train: TrainConfig, mesh: Mesh | None
) -> None:
    """Refusals that need the model but no data or compilation: the mesh against it (tensor
    size, expert axis) and LoRA targets it lacks; UserError naming the valid choices."""
    if mesh is not None:
        shd.check_training_mesh(mesh, run.sequence_parallel, model_cfg)
    if train.lora is not None:
        target_weights(params["layers"], train.lora)


def run_meta(
    model_cfg: ModelConfig, run: RunConfig, opt: OptimizerConfig, train: TrainConfig, data_id: str
) -> dict[str, Any]:
    """What must match for a checkpoint to continue this run (not the SP mode: see RunConfig)."""
    return {
        "model": model_cfg.to_hf_dict(),
        "optimizer": dataclasses.asdict(opt),
        "train": dataclasses.asdict(train),
        "batch_size": run.batch_size,
        "seq_len": run.seq_len,
        "seed": run.seed,
        "steps": run.steps,
        "data": data_id,
    }


def train_sft(
    model_cfg: ModelConfig,
    params: Params,
    docs: list[Doc],
    run: RunConfig,
    *,
    opt_cfg: OptimizerConfig | None = None,
    train_cfg: TrainConfig | None = None,
    mesh: Mesh | None = None,
    data_id: str = "",
    evaluate: Callable[[TrainState, int], dict[str, float]] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    files: dict[str, str] | None = None,
) -> LoopResult:
    """Train on packed `docs` (`jaxturbo.train.trainer.train` does the loop).

    Step records: loss, grad_norm, trained_tokens (the loss's denominator), batch_tokens
    (non-padding tokens of the global batch), lr, tokens_per_s, step_time_s, mfu (None where
    the device's peak is unknown).  evaluate(state, step) -> {name: float}, files: see the
    trainer (`jaxturbo.train.trainer.train`).
    """
    opt_cfg = opt_cfg or OptimizerConfig(
        total_steps=run.steps, warmup_steps=min(100, run.steps // 10)
    )
    train_cfg = train_cfg or TrainConfig()
    run.check(mesh, train_cfg.grad_accum)
    check_model(model_cfg, params, run, train_cfg, mesh)
    if run.seq_len > model_cfg.max_position_embeddings:
        raise UserError(
            f"seq_len={run.seq_len} exceeds the model's context of "
            f"{model_cfg.max_position_embeddings}"
        )
    sequence_ring = None  # put_batch's zigzag ring size; None: tokens not split
    if mesh is not None and run.sequence_parallel != "none":
        from jaxturbo.parallel.sequence import model_layout

        # every constraint (heads, seq_len, ring size) checked here, before compiling
        _, _, sequence_ring = model_layout(
            run.sequence_parallel,
            model_cfg,
            mesh,
            batch=run.batch_size // train_cfg.grad_accum,
            seq_len=run.seq_len,
        )
    optimizer = make_optimizer(opt_cfg)
    schedule = lr_schedule(opt_cfg)
    pid, nproc = jax.process_index(), jax.process_count()
    # every process packs the same global batch and feeds its own slice of rows: the run is
    # the same whatever the process count (packing is cheap host work next to a step)
    data = PackedBatches(docs, seq_len=run.seq_len, batch_size=run.batch_size, seed=run.seed)
    rows = slice(pid * run.batch_size // nproc, (pid + 1) * run.batch_size // nproc)
    state = init_state(params, optimizer, mesh=mesh, seed=run.seed, lora=train_cfg.lora)
    train_step = make_train_step(
        model_cfg,
        train_cfg,
        optimizer,
        mesh=mesh,
        params=state.params,
        sequence_parallel=run.sequence_parallel,
    )
    flops_tok = train_flops_per_token(model_cfg, run.seq_len)
    peak = peak_flops()
    n_dev = mesh.devices.size if mesh is not None else 1

    def step_fn(state: TrainState, batch: dict[str, np.ndarray]) -> tuple[TrainState, dict]:
        real_tokens = int((batch["segment_ids"] > 0).sum())
        batch = {k: v[rows] for k, v in batch.items()}
        state, m = train_step(state, shd.put_batch(batch, mesh, sequence_ring=sequence_ring))
        loss = float(m["loss"])  # waits for the step: the loop's timing is the step's
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss} at step {int(state.step)}; lower the learning rate"
            )
        return state, {
            "loss": loss,
            "grad_norm": float(m["grad_norm"]),
            "trained_tokens": float(m["count"]),
            "batch_tokens": real_tokens,
            **{k: float(m[k]) for k in ROUTER_METRICS if k in m},
        }  # MoE models

    def derive(rec: dict[str, Any]) -> None:
        dt = rec["step_time_s"]
        rec["lr"] = float(schedule(rec["step"] - 1))
        rec["tokens_per_s"] = rec["batch_tokens"] / dt
        # MFU counts the padded row length the device computed on, per device
        rec["mfu"] = flops_tok * run.batch_size * run.seq_len / dt / n_dev / peak if peak else None

    def describe(rec: dict[str, Any]) -> dict[str, str]:
        shown = {"loss": f"{rec['loss']:.4f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
        if rec["mfu"] is not None:
            shown["mfu"] = f"{100 * rec['mfu']:.1f}%"
        return shown

    return train(
        step_fn,
        state,
        data,
        run.loop(),
        meta=run_meta(model_cfg, run, opt_cfg, train_cfg, data_id),
        evaluate=evaluate,
        describe=describe,
        derive=derive,
        on_step=on_step,
        plots={"loss.png": plot_loss},
        files=files,
    )


def held_in_tokens(records: list[Record], tokenizer: Any, n: int) -> np.ndarray:
    """The first `n` tokens [n] int32 of the records, tokenized as SFT trains on them."""
    ids: list[int] = []
    for r in records:
        ids += tokenize_record(r, tokenizer)[0].tolist()
        if len(ids) >= n:
            break
    return np.asarray(ids[:n], np.int32)


def run_sft(
    model_cfg: ModelConfig,
    params: Params,
    tokenizer: Any,
    records: list[Record],
    run: RunConfig,
    *,
    opt_cfg: OptimizerConfig,
    train_cfg: TrainConfig,
    mesh: Mesh | None = None,
    data_id: str = "",
    eval_tokens: int = 0,
    export: Exporter | None = None,
    files: dict[str, str] | None = None,
) -> LoopResult:
    """A whole SFT run: tokenize and pack `records`, train (`train_sft`), score the held-in
    perplexity of the first `eval_tokens` tokens in windows of seq_len before, every
    run.eval_every steps and after (metrics.jsonl, eval.json), write the final model with
    `export` to out_dir/hf (process 0).  files: written to out_dir when training starts (the
    trainer's `files`).  With LoRA (`train_cfg.lora_rank` > 0) `export` gets the state's
    params as they are, {"base": frozen params, "lora": adapters} (`jaxturbo.train.step`), to
    write the merged model and the adapters."""
    if eval_tokens < 0:
        raise UserError(f"eval_tokens={eval_tokens} must be >= 0 (0: no evaluation)")
    check_model(model_cfg, params, run, train_cfg, mesh)  # before tokenizing
    out = Path(run.out_dir)
    docs = encode_documents(records, tokenizer, run.seq_len)
    held = held_in_tokens(records, tokenizer, eval_tokens) if eval_tokens > 0 else None
    evaluate = None
    if held is not None:
        from jaxturbo.inference.scoring import perplexity

        def evaluate(state: TrainState, step: int) -> dict[str, float]:
            p = state.params if jax.process_count() == 1 else host_params(state.params)
            p = model_params(p, train_cfg.lora)  # LoRA: the adapters merged in
            return {
                "held_in_perplexity": perplexity(p, model_cfg, held, window=run.seq_len).perplexity
            }

    lead = jax.process_index() == 0
    if lead:
        print(
            f"sft: {len(docs)} documents, {sum(len(d['inputs']) for d in docs)} tokens; "
            f"{run.steps} steps of {run.batch_size} x {run.seq_len}; metrics -> "
            f"{out / 'metrics.jsonl'}"
            + (f", TensorBoard -> {out / 'tensorboard'}" if run.tensorboard else ""),
            file=sys.stderr,
        )
        out.mkdir(parents=True, exist_ok=True)
        save_tokenizer(tokenizer, out)
    result = train_sft(
        model_cfg,
        params,
        docs,
        run,
        opt_cfg=opt_cfg,
        train_cfg=train_cfg,
        mesh=mesh,
        data_id=data_id,
        evaluate=evaluate,
        files=files,
    )
    final = host_params(result.state.params) if export is not None else None  # collective
    if held is not None and lead:
        curve = [
            {"step": r["step"], "held_in_perplexity": r["held_in_perplexity"]} for r in result.evals
        ]
        summary = {
            "held_in_tokens": int(len(held)),
            "before": curve[0]["held_in_perplexity"],
            "after": curve[-1]["held_in_perplexity"],
            "curve": curve,
        }
        (out / "eval.json").write_text(json.dumps(summary, indent=1))
        print(
            f"held-in perplexity {summary['before']:.3f} (step {curve[0]['step']}) -> "
            f"{summary['after']:.3f} (step {curve[-1]['step']})",
            file=sys.stderr,
        )
    if export is not None and lead:
        print(f"model written to {export(final, out / 'hf')}", file=sys.stderr)
    return result


def plot_loss(records: list[dict], path: Path) -> None:
    """Training loss against step, written as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if r.get("kind", "train") == "train"]
    if not records:
        return
    steps = np.array([r["step"] for r in records])
    loss = np.array([r["loss"] for r in records])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
