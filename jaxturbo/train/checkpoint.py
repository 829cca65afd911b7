"""Training checkpoints with orbax: async, keep the last K, atomic, restorable onto any mesh.

A checkpoint `DIR/<step>/` holds three items (`read_params` reads the params and meta of one
without knowing the rest of the state, e.g. for an HF export):
  state  the TrainState (step, float32 params, optimizer state, RNG), as sharded arrays
  data   the data iterator's state (JSON), so the batch stream continues where it stopped
  meta   what the run was (model config, optimizer/train config, batch shape, data file):
         a resume compares it with the new run and names every difference

Atomicity is orbax's: a step is written under a temporary name and renamed when complete, so a
process killed mid-save leaves no step directory, only a temporary one that is ignored (and
removed by the next save).  Saves are asynchronous: `save` returns once the arrays are copied
to host memory; the write to disk overlaps the next training steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from jaxturbo.errors import UserError


def _abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings of a live state: where `restore` puts the arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def describe_differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: checkpoint X, now Y' for every leaf that differs between two nested dicts."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: checkpoint {a!r}, now {b!r}")
    return out


class Checkpointer:
    """Save every `every` steps (and on `force`), keep the newest `keep`, restore the latest."""

    def __init__(
        self, directory: str | Path, *, every: int, keep: int = 3, async_save: bool = True
    ):
        if every < 1 or keep < 1:
            raise UserError(f"checkpoint interval ({every}) and number kept ({keep}) must be >= 1")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._mgr = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict[str, Any],
        meta: dict[str, Any],
        *,
        force: bool = False,
    ) -> bool:
        """Start saving `state` as `step` if the interval says so (or `force`)."""
        return self._mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def read_meta(self, step: int) -> dict[str, Any]:
        return self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(
        self, step: int, like_state: Any, meta_now: dict[str, Any], ignore: tuple[str, ...] = ()
    ) -> tuple[Any, dict[str, Any]]:
        """Restore (state, data_state) of `step` onto the shardings of `like_state`.

        Raises UserError naming every field of `meta` that differs from `meta_now` (except the
        top-level keys in `ignore`).
        """
        saved = self.read_meta(step)
        diffs = describe_differences(
            {k: v for k, v in saved.items() if k not in ignore},
            {k: v for k, v in meta_now.items() if k not in ignore},
        )
        if diffs:
            raise UserError(
                f"cannot resume from {self.directory}/{step}: the checkpoint was made "
                f"by a different run ({'; '.join(diffs)}); use the original settings "
                "or a new output directory"
            )
        got = self._mgr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(like_state)), data=ocp.args.JsonRestore()
            ),
        )
        return got["state"], got["data"]

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


def _step_dir(path: Path, step: int | None) -> Path:
    """The directory of one complete checkpoint step: `path` itself, or the newest (or `step`)
    under a checkpoints/ directory or a run directory holding one."""
    if (path / "state").is_dir() and (path / "meta").is_dir():
        if step is not None and path.name != str(step):
            raise UserError(f"{path} is the checkpoint of step {path.name}, not {step}")
        return path
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    steps = (
        sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "state").is_dir())
        if path.is_dir()
        else []
    )
    if not steps:
        raise UserError(
            f"no checkpoint in {path}: give a run directory, its checkpoints/ or one "
            "step's directory (checkpoints/<step>)"
        )
    if step is None:
        return path / str(steps[-1])
    if step not in steps:
        raise UserError(
            f"no checkpoint of step {step} in {path}; steps there: {', '.join(map(str, steps))}"
        )
    return path / str(step)


class SavedParams(NamedTuple):
    """A checkpoint's params: `step`, its `directory` (checkpoints/<step>), the run's `meta`
    (model config, settings) and `params`."""

    step: int
    directory: Path
    meta: dict[str, Any]
    params: Any


def read_params(path: str | Path, step: int | None = None) -> SavedParams:
    """The params of a saved checkpoint as numpy arrays (float32 master weights; an RL PPO
    run's are {"policy", "value_head"}), with nothing else of the state read: no optimizer
    moments, no devices.  `path`: a run directory, its checkpoints/, or one step's directory;
    the newest step unless `step`."""
    d = _step_dir(Path(path).absolute(), step)
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(d / "meta")
    reader = ocp.PyTreeCheckpointer()
    tree = reader.metadata(d / "state").item_metadata.tree
    if not isinstance(tree, dict) or "params" not in tree:
        raise UserError(f"{d} holds no training state with params")
    import numpy as np

    item = {"params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree["params"])}
    args = {
        "params": jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree["params"])
    }
    got = reader.restore(
        d / "state", args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
    )
    return SavedParams(int(d.name), d, meta, got["params"])
