"""A tiny SFT run in its own process, for the kill-and-resume test.

    python tests/train/sft_worker.py OUT_DIR STEPS [--resume]

Prints `STEP <n> <loss as float.hex>` after every step (flushed) so the parent can kill it.
With SFT_WORKER_KILL_IN_SAVE=N the process SIGKILLs itself right after the asynchronous save of
step N has started, while orbax is still writing it (a kill during a save).
"""

import os
import sys
import time

import jax
import numpy as np

from jaxturbo.models.config import ModelConfig
from jaxturbo.train.init import init_params
from jaxturbo.train.loop import RunConfig, train_sft
from jaxturbo.train.optimizer import OptimizerConfig
from jaxturbo.train.step import TrainConfig

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def docs(n: int = 40) -> list[dict]:
    rs = np.random.RandomState(0)
    out = []
    for _ in range(n):
        ids = rs.randint(2, 64, rs.randint(4, 20)).astype(np.int32)
        out.append({"inputs": ids[:-1], "targets": ids[1:],
                    "weights": np.ones(len(ids) - 1, np.float32)})
    return out


def _kill_during_save(step_to_kill: int) -> None:
    """Make `Checkpointer.save` of `step_to_kill` start the (async) write, then SIGKILL us."""
    import signal

    from jaxturbo.train import checkpoint

    real = checkpoint.Checkpointer.save

    def save(self, step, *args, **kwargs):
        started = real(self, step, *args, **kwargs)
        if step == step_to_kill and started:
            print(f"KILLED-IN-SAVE {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return started

    checkpoint.Checkpointer.save = save


def main() -> None:
    if os.environ.get("SFT_WORKER_KILL_IN_SAVE"):
        _kill_during_save(int(os.environ["SFT_WORKER_KILL_IN_SAVE"]))
    out, steps = sys.argv[1], int(sys.argv[2])
    run = RunConfig(out_dir=out, steps=steps, batch_size=4, seq_len=32, save_every=2, keep=2,
                    resume="--resume" in sys.argv, progress=False, plot=False)

    def report(rec):
        print(f"STEP {rec['step']} {float(rec['loss']).hex()}", flush=True)
        time.sleep(float(os.environ.get("SFT_WORKER_SLEEP", "0")))  # leaves time to be killed

    train_sft(CFG, init_params(CFG, jax.random.key(0)), docs(), run,
              opt_cfg=OptimizerConfig(learning_rate=3e-3, warmup_steps=2, total_steps=steps),
              train_cfg=TrainConfig(compute_dtype="bfloat16"), data_id="worker-docs",
              on_step=report)


if __name__ == "__main__":
    main()
