"""A tiny SFT run in its own process, for the kill-and-resume test.

    python tests/train/sft_worker.py OUT_DIR STEPS [--resume]

Prints `STEP <n> <loss as float.hex>` after every step (flushed) so the parent can kill it.
With SFT_WORKER_KILL_IN_SAVE=N the process SIGKILLs itself inside the save of step N, at one
fixed point of every run: all of the step's items are written to orbax's temporary directory
and the commit (success marker, rename to the step's name) has not begun.  It prints
`KILLED-IN-SAVE <N> <temporary directory>` first.
"""

import os
import sys
import time

import jax
import numpy as np

from jaxturbo.models.config import ModelConfig
from jaxturbo.models.init import init_params
from jaxturbo.train.optimizer import OptimizerConfig
from jaxturbo.train.sft import RunConfig, train_sft
from jaxturbo.train.step import TrainConfig

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


def docs(n: int = 40) -> list[dict]:
    rs = np.random.RandomState(0)
    out = []
    for _ in range(n):
        ids = rs.randint(2, 64, rs.randint(4, 20)).astype(np.int32)
        out.append(
            {"inputs": ids[:-1], "targets": ids[1:], "weights": np.ones(len(ids) - 1, np.float32)}
        )
    return out


def _kill_during_save(step_to_kill: int) -> None:
    """SIGKILL this process when orbax starts committing step `step_to_kill` (its data written,
    not yet renamed into place): the commit of an atomic-rename save is this `finalize`."""
    import signal

    from orbax.checkpoint._src.path import atomicity

    real = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if self.get_final().name == str(step_to_kill):
            print(f"KILLED-IN-SAVE {step_to_kill} {self.get()}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return await real(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main() -> None:
    if os.environ.get("SFT_WORKER_KILL_IN_SAVE"):
        _kill_during_save(int(os.environ["SFT_WORKER_KILL_IN_SAVE"]))
    out, steps = sys.argv[1], int(sys.argv[2])
    run = RunConfig(
        out_dir=out,
        steps=steps,
        batch_size=4,
        seq_len=32,
        save_every=2,
        keep=2,
        resume="--resume" in sys.argv,
        progress=False,
        plot=False,
    )

    def report(rec):
        print(f"STEP {rec['step']} {float(rec['loss']).hex()}", flush=True)
        time.sleep(float(os.environ.get("SFT_WORKER_SLEEP", "0")))  # leaves time to be killed

    train_sft(
        CFG,
        init_params(CFG, jax.random.key(0)),
        docs(),
        run,
        opt_cfg=OptimizerConfig(learning_rate=3e-3, warmup_steps=2, total_steps=steps),
        train_cfg=TrainConfig(compute_dtype="bfloat16"),
        data_id="worker-docs",
        on_step=report,
    )


if __name__ == "__main__":
    main()
