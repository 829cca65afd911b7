"""One training loop for SFT and RL: a step function, a data source, and the loop's services.

    result = train(step_fn, state, data, LoopConfig(out_dir=..., steps=...), meta=...)

step_fn(state, item) -> (state, metrics): one update on one item of `data` (a packed batch for
SFT, a batch of rollouts for RL); metrics are floats, returned once the step has finished (so
the loop's step time is the step's).
data: an iterator whose position is part of a checkpoint: `get_state()` returns JSON values,
`set_state(s)` continues from them (`jaxturbo.data.PackedBatches`, an RL learner's rollouts).

What the loop does around the steps, all under `out_dir`:
  checkpoints  orbax (`jaxturbo.train.checkpoint`) in checkpoints/: every `save_every` steps and
               at the end (save_every 0: at the end only; None: never, and orbax is not
               imported).  `resume` restores the newest one (state + data position), refuses
               one whose `meta` differs from this run's, and continues exactly: the following
               steps are the uninterrupted run's.
  metrics      metrics.jsonl, one JSON object per step ({"kind": "train", "step": n, ...}) and
               per evaluation ({"kind": "eval", ...}); a resumed run drops lines past the
               restored step.
  TensorBoard  the same numbers as event files in tensorboard/ (tensorboardX), tagged
               "train/<name>" and "eval/<name>".
  progress     a tqdm bar when stderr is a terminal, else one plain line per step.
  evaluation   evaluate(state, step) -> {name: float} before the first step, every
               `eval_every` steps and after the last.
  plots        plots[file](records, path) at the end, over every record of the run.
  on_step      called with each step's record.
Only process 0 writes files and progress; every process saves its part of a checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import jax

from jaxturbo.errors import UserError
from jaxturbo.train.metrics import JsonlWriter, TensorBoardWriter

Record = dict[str, Any]
StepFn = Callable[[Any, Any], tuple[Any, dict[str, float]]]
Plot = Callable[[list[Record], Path], None]
# writes a model as an HF directory: (params, directory) -> the directory written (e.g. the
# bridge's export_hf with the model config and tokenizer bound; train and rl do not import it)
Exporter = Callable[[Any, Path], Any]


class DataSource(Protocol):
    """An endless iterator whose position can be saved and restored (JSON values)."""

    def __next__(self) -> Any: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """What the loop does around the steps (see the module docstring).

    steps: steps in total (a resumed run counts the restored ones too).
    save_every: checkpoint every N steps and at the end; 0: at the end only; None: never.
    keep: checkpoints kept (the newest).
    eval_every: evaluate every N steps (0: only before the first step and after the last).
    progress: a bar on a terminal, lines otherwise; False: neither.
    plot / tensorboard: write the plots / the event files.
    name: the progress bar's label.
    """

    out_dir: str
    steps: int
    save_every: int | None = 100
    keep: int = 3
    resume: bool = False
    eval_every: int = 0
    progress: bool = True
    plot: bool = True
    tensorboard: bool = True
    name: str = "train"

    def validate(self) -> None:
        """Refusals that need no model or data: UserError naming the bad field."""
        if self.steps < 1:
            raise UserError(f"steps={self.steps} must be >= 1")
        if self.save_every is not None and self.save_every < 0:
            raise UserError(f"save_every={self.save_every} must be >= 0 (0: at the end only)")
        if self.keep < 1:
            raise UserError(f"keep={self.keep} must be >= 1")
        if self.eval_every < 0:
            raise UserError(f"eval_every={self.eval_every} must be >= 0 (0: before and after only)")
        if self.resume and self.save_every is None:
            raise UserError("resume=True needs checkpoints (save_every >= 0), this run writes none")


@dataclasses.dataclass
class LoopResult:
    """state: the final state.  history: this run's step records (a resumed run: the steps after
    the restored one).  evals: every evaluation record of the run, restored ones included.
    start: the step the run started from (0, or the restored checkpoint's)."""

    state: Any
    history: list[Record]
    evals: list[Record]
    start: int


def _checkpointer(out: Path, cfg: LoopConfig) -> Any:
    # imported only when checkpoints are written: orbax is heavy and optional
    from jaxturbo.train.checkpoint import Checkpointer

    # the loop decides which steps to save (orbax's own policy would also save the first)
    return Checkpointer(out / "checkpoints", every=cfg.save_every or 1, keep=cfg.keep)


def train(
    step_fn: StepFn,
    state: Any,
    data: DataSource | Iterator[Any],
    cfg: LoopConfig,
    *,
    meta: Mapping[str, Any] | None = None,
    evaluate: Callable[[Any, int], dict[str, float]] | None = None,
    describe: Callable[[Record], dict[str, str]] | None = None,
    derive: Callable[[Record], None] | None = None,
    on_restore: Callable[[Any], None] | None = None,
    on_step: Callable[[Record], None] | None = None,
    plots: Mapping[str, Plot] | None = None,
    files: Mapping[str, str] | None = None,
) -> LoopResult:
    """Run `step_fn` over `data` until `cfg.steps` (see the module docstring).

    meta: what a checkpoint must share with a run resuming it (JSON values).
    describe(record) -> the few {name: text} the progress bar / step line shows.
    derive(record): adds numbers computed from the step's time (`step_time_s`) in place.
    on_restore(state): after a resume restored `state`, before the first step (e.g. to push
    the weights to a rollout engine).
    files: {name: text} written to out_dir once the run is known to start (not refused for
    its checkpoints), e.g. the command line's resolved config.yaml.
    """
    cfg.validate()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0
    meta = dict(meta or {})
    ckpt, start = None, 0
    if cfg.save_every is not None:
        ckpt = _checkpointer(out, cfg)
        latest = ckpt.latest_step()
        if cfg.resume and latest is None:
            ckpt.close()
            raise UserError(
                f"resume=True: no checkpoint in {out / 'checkpoints'}; start without resume"
            )
        if latest is not None and not cfg.resume:
            ckpt.close()
            raise UserError(
                f"{out / 'checkpoints'} already holds checkpoints (latest step "
                f"{latest}); resume=True continues that run, or choose a new "
                "output directory"
            )
        if cfg.resume:
            try:
                state, data_state = ckpt.restore(latest, state, meta)
            except BaseException:
                ckpt.close()
                raise
            data.set_state(data_state)  # type: ignore[union-attr]
            start = latest
            if on_restore is not None:
                on_restore(state)
    if start >= cfg.steps:
        if ckpt is not None:
            ckpt.close()
        raise UserError(
            f"the checkpoint is at step {start}, which is already steps="
            f"{cfg.steps}; nothing to do (raise steps to train further)"
        )

    log = tb = None
    evals: list[Record] = []
    if lead:
        for name, text in (files or {}).items():
            (out / name).write_text(text)
        log = JsonlWriter(out / "metrics.jsonl", resume_step=start if cfg.resume else None)
        evals = [r for r in log.read() if r.get("kind") == "eval"]
        if cfg.tensorboard:
            tb = TensorBoardWriter(
                out / "tensorboard", purge_step=start + 1 if cfg.resume else None
            )
    bar = None
    lines = False
    if cfg.progress and lead:
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(
                total=cfg.steps,
                initial=start,
                desc=cfg.name,
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
            )
        else:
            lines = True

    def say(msg: str) -> None:
        """A line on stderr that does not break a live progress bar."""
        if not (cfg.progress and lead):
            return
        if bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    # a resumed run's log already holds the evaluation of the restored step when eval_every
    # divides it (evaluations are logged before the checkpoint of their step); decided from
    # the settings, not the log, so every process evaluates (and joins collectives) alike
    last_eval = start if cfg.resume and cfg.eval_every and start % cfg.eval_every == 0 else None

    def run_eval(step: int) -> None:
        nonlocal last_eval
        if evaluate is None or last_eval == step:
            return
        last_eval = step
        values = evaluate(state, step)
        rec = {"kind": "eval", "step": step, **values}
        evals.append(rec)
        if log is not None:
            log.write(rec)
        if tb is not None:
            tb.write(rec)
        say(f"eval at step {step}: " + "  ".join(f"{k}={v:.4f}" for k, v in values.items()))

    history: list[Record] = []
    try:
        run_eval(start)
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            state, metrics = step_fn(state, next(data))
            rec = {
                "kind": "train",
                "step": step,
                **metrics,
                "step_time_s": time.perf_counter() - t0,
            }
            if derive is not None:
                derive(rec)
            history.append(rec)
            if log is not None:
                log.write(rec)
            if tb is not None:
                tb.write(rec)
            shown = describe(rec) if describe is not None else {}
            if bar is not None:
                bar.set_postfix(shown)
                bar.update(1)
            elif lines:
                print(
                    f"step {step}/{cfg.steps}  " + "  ".join(f"{k}={v}" for k, v in shown.items()),
                    file=sys.stderr,
                )
            if on_step is not None:
                on_step(rec)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                run_eval(step)
            if ckpt is not None and (
                step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0)
            ):
                ckpt.save(
                    step,
                    state,
                    data.get_state(),
                    meta,  # type: ignore[union-attr]
                    force=True,
                )
    finally:
        if bar is not None:
            bar.close()
        if tb is not None:
            tb.close()
        if ckpt is not None:
            ckpt.close()  # waits for the asynchronous writes
    if cfg.plot and log is not None and plots:
        records = log.read()
        for name, plot in plots.items():
            plot(records, out / name)
    return LoopResult(state, history, evals, start)


def host_params(params: Any) -> Any:
    """Every parameter whole on this host (numpy), from any layout: FSDP shards on other hosts
    are gathered (a collective: every process must call it)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def save_tokenizer(tokenizer: Any, out_dir: str | Path) -> None:
    """A copy of the run's tokenizer in `out_dir/tokenizer`, which `jaxturbo export-hf
    --checkpoint` pairs with the run's checkpoints when no base model is named (process 0)."""
    if jax.process_index() == 0 and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(Path(out_dir) / "tokenizer"))
