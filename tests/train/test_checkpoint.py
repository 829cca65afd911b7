"""Checkpoints: a run killed with SIGKILL resumes from its last complete checkpoint and
reproduces the uninterrupted run's losses bit for bit; a half-written save is ignored; an
incompatible checkpoint says what differs."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxturbo.errors import UserError
from jaxturbo.train.checkpoint import Checkpointer, describe_differences

WORKER = Path(__file__).with_name("sft_worker.py")
ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


def _start(out: Path, cache: Path, *extra: str, env_extra: dict | None = None) -> subprocess.Popen:
    # a compilation cache shared by the module's processes: only the first ones compile
    compiled = {
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT), **compiled, **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(out), str(STEPS), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _losses(lines) -> dict[int, str]:
    return {int(p[1]): p[2] for p in (ln.split() for ln in lines) if p and p[0] == "STEP"}


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xla-cache")


@pytest.fixture(scope="module")
def full_losses(tmp_path_factory, xla_cache):
    """The uninterrupted run both kill tests compare with, run once: started when the first of
    them starts its victim (the two run side by side); calling the fixture's value waits for it
    and returns {step: loss as float.hex}."""
    full = _start(tmp_path_factory.mktemp("full") / "full", xla_cache)
    losses: dict[int, str] = {}

    def wait() -> dict[int, str]:
        if not losses:
            out_f, err_f = full.communicate(timeout=300)
            assert full.returncode == 0, err_f[-2000:]
            losses.update(_losses(out_f.splitlines()))
        return losses

    yield wait
    if full.poll() is None:
        full.kill()
        full.wait()


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_uninterrupted_losses(tmp_path, xla_cache, full_losses):
    victim = _start(tmp_path / "killed", xla_cache, env_extra={"SFT_WORKER_SLEEP": "0.3"})
    seen = []
    for line in victim.stdout:
        seen.append(line)
        if line.startswith(f"STEP {STEPS - 1} "):
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, victim.stderr.read()[-2000:]
    ckpts = tmp_path / "killed" / "checkpoints"
    # a save killed half-way leaves only a temporary directory, which must be ignored
    partial = ckpts / f"{STEPS}.orbax-checkpoint-tmp-1"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_text("half written")

    resumed = _start(tmp_path / "killed", xla_cache, "--resume")
    out_r, err_r = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err_r[-2000:]
    want, before, after = full_losses(), _losses(seen), _losses(out_r.splitlines())
    assert sorted(want) == list(range(1, STEPS + 1))
    # it resumed from a checkpoint (not from scratch), and every step it ran matches exactly
    assert after and min(after) > 1 and max(after) == STEPS
    assert {s: want[s] for s in after} == after
    assert {s: want[s] for s in before} == before
    # the metrics file holds each step once, with the uninterrupted losses
    import json

    rec = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec] == list(range(1, STEPS + 1))
    assert [float(r["loss"]).hex() for r in rec] == [want[s] for s in range(1, STEPS + 1)]


@pytest.mark.slow
def test_sigkill_during_a_save_resumes_from_the_previous_checkpoint(
    tmp_path, xla_cache, full_losses
):
    """Killed inside the save of step 4 (saves every 2 steps) at a fixed point: every item of
    step 4 is written to orbax's temporary directory, the commit has not begun (the worker
    kills itself there, no timing involved).  Step 4 never becomes a checkpoint, the resumed run
    starts from step 2, repeats steps 3.. exactly, and the half-saved directory is removed."""
    victim = _start(tmp_path / "killed", xla_cache, env_extra={"SFT_WORKER_KILL_IN_SAVE": "4"})
    out_v, err_v = victim.communicate(timeout=300)
    assert victim.returncode == -signal.SIGKILL, err_v[-2000:]
    killed = [ln.split() for ln in out_v.splitlines() if ln.startswith("KILLED-IN-SAVE")]
    assert len(killed) == 1 and killed[0][1] == "4", out_v
    ckpts = tmp_path / "killed" / "checkpoints"
    half = Path(killed[0][2])
    # the kill came mid-save: step 4's state is on disk under the temporary name only
    assert half.parent == ckpts and half.name.startswith("4.orbax-checkpoint-tmp")
    assert any(p.is_file() for p in (half / "state").rglob("*"))
    assert not (ckpts / "4").exists()
    ckpt = Checkpointer(ckpts, every=2, keep=2)
    assert ckpt.latest_step() == 2, ckpt.all_steps()  # the interrupted save did not count
    ckpt.close()
    resumed = _start(tmp_path / "killed", xla_cache, "--resume")
    out_r, err_r = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err_r[-2000:]
    want, after = full_losses(), _losses(out_r.splitlines())
    assert sorted(after) == [3, 4, 5, 6]
    assert {s: want[s] for s in after} == after
    assert not half.exists() and sorted(p.name for p in ckpts.iterdir()) == ["4", "6"]


def test_incompatible_checkpoint_names_the_differences(tmp_path):
    ck = Checkpointer(tmp_path / "c", every=1, keep=2, async_save=False)
    state = {"w": jnp.arange(4.0), "step": jnp.int32(3)}
    meta = {"seq_len": 64, "model": {"hidden_size": 32, "vocab_size": 64}}
    ck.save(3, state, {"next_index": 5}, meta)
    ck.wait()
    like = {"w": jnp.zeros(4), "step": jnp.int32(0)}
    got, data = ck.restore(3, like, meta)
    np.testing.assert_array_equal(np.asarray(got["w"]), np.arange(4.0))
    assert data == {"next_index": 5}
    other = {"seq_len": 128, "model": {"hidden_size": 48, "vocab_size": 64}}
    with pytest.raises(
        UserError,
        match=r"model.hidden_size: checkpoint 32, now 48; "
        r"seq_len: checkpoint 64, now 128",
    ):
        ck.restore(3, like, other)
    ck.close()
    assert describe_differences({"a": 1}, {"a": 1, "b": 2}) == ["b: checkpoint '<absent>', now 2"]
