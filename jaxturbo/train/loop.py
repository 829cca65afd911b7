"""The SFT loop: packed batches -> train steps -> metrics JSONL, checkpoints, loss curve.

    history = train_sft(model_cfg, params, docs, RunConfig(out_dir=..., steps=...), ...)

Resuming (`resume=True`) restores the newest complete checkpoint in `out_dir/checkpoints`
(params, optimizer state, step, RNG, data iterator) and continues; with the same settings the
losses of the following steps are bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxturbo.data.pipeline import Doc, PackedBatches
from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.transformer import Params
from jaxturbo.train import sharding as shd
from jaxturbo.train.checkpoint import Checkpointer
from jaxturbo.train.metrics import JsonlWriter, peak_flops, train_flops_per_token
from jaxturbo.train.optimizer import OptimizerConfig, lr_schedule, make_optimizer
from jaxturbo.train.step import TrainConfig, TrainState, init_state, make_train_step


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What a run does and where it writes.

    steps: optimizer steps in total (a resumed run counts the restored steps too).
    batch_size, seq_len: global batch rows and tokens per row.
    save_every, keep: checkpoint every N steps (and at the end), keep the last K.
    sequence_parallel: "none", "ulysses", "ring" or "hybrid" over the mesh's `sequence` axis
      (jaxturbo.parallel.sequence).  Not part of the checkpoint's identity: the math is the
      same, so a run may resume with another mode or mesh.
    """

    out_dir: str
    steps: int
    batch_size: int = 8
    seq_len: int = 512
    seed: int = 0
    save_every: int = 100
    keep: int = 3
    resume: bool = False
    progress: bool = True
    plot: bool = True
    sequence_parallel: str = "none"


def run_meta(model_cfg: ModelConfig, run: RunConfig, opt: OptimizerConfig, train: TrainConfig,
             data_id: str) -> dict[str, Any]:
    """What must match for a checkpoint to continue this run (not the SP mode: see RunConfig)."""
    return {"model": model_cfg.to_hf_dict(), "optimizer": dataclasses.asdict(opt),
            "train": dataclasses.asdict(train), "batch_size": run.batch_size,
            "seq_len": run.seq_len, "seed": run.seed, "steps": run.steps, "data": data_id}


def train_sft(model_cfg: ModelConfig, params: Params, docs: list[Doc], run: RunConfig, *,
              opt_cfg: OptimizerConfig | None = None, train_cfg: TrainConfig | None = None,
              mesh: Mesh | None = None, data_id: str = "",
              on_step: Callable[[dict[str, Any]], None] | None = None) -> tuple[TrainState, list[dict]]:
    """Train on packed `docs`; return the final state and the metrics of every step of the run."""
    opt_cfg = opt_cfg or OptimizerConfig(total_steps=run.steps, warmup_steps=min(100, run.steps // 10))
    train_cfg = train_cfg or TrainConfig()
    optimizer = make_optimizer(opt_cfg)
    schedule = lr_schedule(opt_cfg)
    sequence_ring = None   # put_batch's zigzag ring size; None: tokens not split
    if mesh is not None:
        shd.check_training_mesh(mesh, run.sequence_parallel)
        shd.check_batch_size(run.batch_size, mesh, train_cfg.grad_accum)
        if run.sequence_parallel != "none":
            from jaxturbo.parallel.sequence import model_layout
            # every constraint (heads, seq_len, ring size) checked here, before compiling
            _, _, sequence_ring = model_layout(run.sequence_parallel, model_cfg, mesh,
                                               batch=run.batch_size // train_cfg.grad_accum,
                                               seq_len=run.seq_len)
    elif run.sequence_parallel != "none":
        raise UserError(f"--sequence-parallel {run.sequence_parallel} needs --mesh with a "
                        "sequence axis (e.g. --mesh data=2,sequence=4)")
    elif run.batch_size % train_cfg.grad_accum:
        raise UserError(f"batch size {run.batch_size} must be a multiple of grad_accum "
                        f"{train_cfg.grad_accum}")
    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pid, nproc = jax.process_index(), jax.process_count()
    # every process packs the same global batch and feeds its own slice of rows: the run is
    # the same whatever the process count (packing is cheap host work next to a step)
    data = PackedBatches(docs, seq_len=run.seq_len, batch_size=run.batch_size, seed=run.seed)
    if run.batch_size % nproc:
        raise UserError(f"batch size {run.batch_size} must be a multiple of the process count "
                        f"{nproc}")
    rows = slice(pid * run.batch_size // nproc, (pid + 1) * run.batch_size // nproc)
    state = init_state(params, optimizer, mesh=mesh, seed=run.seed)
    step_fn = make_train_step(model_cfg, train_cfg, optimizer, mesh=mesh, params=state.params,
                              sequence_parallel=run.sequence_parallel)
    ckpt = Checkpointer(out / "checkpoints", every=run.save_every, keep=run.keep)
    meta = run_meta(model_cfg, run, opt_cfg, train_cfg, data_id)

    start = 0
    latest = ckpt.latest_step()
    if run.resume and latest is not None:
        state, data_state = ckpt.restore(latest, state, meta)
        data.set_state(data_state)
        start = latest
    elif latest is not None:
        raise UserError(f"{out}/checkpoints already holds checkpoints (latest step {latest}); "
                        "pass --resume to continue that run, or choose a new --out directory")
    log = JsonlWriter(out / "metrics.jsonl", resume_step=start if run.resume else None)

    flops_tok = train_flops_per_token(model_cfg, run.seq_len)
    peak = peak_flops()
    n_dev = mesh.devices.size if mesh is not None else 1
    bar = None
    if run.progress and pid == 0:
        from tqdm import tqdm
        bar = tqdm(total=run.steps, initial=start, desc="sft", file=sys.stderr, dynamic_ncols=True)
    history: list[dict] = []
    t_last = time.perf_counter()
    for step in range(start, run.steps):
        batch = next(data)
        real_tokens = int((batch["segment_ids"] > 0).sum())
        batch = {k: v[rows] for k, v in batch.items()}
        state, m = step_fn(state, shd.put_batch(batch, mesh, sequence_ring=sequence_ring))
        loss = float(m["loss"])  # waits for the step: the timing below is the step's
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        rec = {"step": step + 1, "loss": loss, "lr": float(schedule(step)),
               "grad_norm": float(m["grad_norm"]), "trained_tokens": float(m["count"]),
               "tokens_per_s": real_tokens / dt, "step_time_s": dt}
        # MFU counts the padded row length the device computed on, per device
        rec["mfu"] = (flops_tok * run.batch_size * run.seq_len / dt / n_dev / peak) if peak else None
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step + 1}; lower the learning rate")
        history.append(rec)
        if pid == 0:
            log.write(rec)
        ckpt.save(step + 1, state, data.get_state(), meta, force=step + 1 == run.steps)
        if bar is not None:
            post = {"loss": f"{loss:.4f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
            if rec["mfu"] is not None:
                post["mfu"] = f"{100 * rec['mfu']:.1f}%"
            bar.set_postfix(post)
            bar.update(1)
        if on_step is not None:
            on_step(rec)
    if bar is not None:
        bar.close()
    ckpt.close()
    if run.plot and pid == 0:
        plot_loss(log.read(), out / "loss.png")
    return state, history


def plot_loss(records: list[dict], path: Path) -> None:
    """Loss against step, written as a PNG (matplotlib, no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
