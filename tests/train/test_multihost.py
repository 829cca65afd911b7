"""Multi-host: 2 processes x 4 CPU devices on localhost (jax.distributed, gloo collectives) train
like 1 process x 8 devices: same global batch, same mesh (data=4 x fsdp=2), same losses.

The reference process runs alongside the two distributed ones (three processes at once, so the
test costs about one run's wall time).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxturbo.errors import UserError
from jaxturbo.train.distributed import initialize

WORKER = Path(__file__).with_name("multihost_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _held_port() -> socket.socket:
    """A socket bound to a free port with SO_REUSEPORT and kept open (not listening) while the
    processes run: a plain bind or an ephemeral port elsewhere cannot take the port, yet the
    coordinator (a gRPC server, which binds with SO_REUSEPORT too) can join it."""
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)  # "[::]:port", the coordinator's
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("::", 0))
    return s


def _start(out: Path, nproc: int, pid: int, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(out), str(nproc), str(pid), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _losses(proc: subprocess.Popen) -> list[float] | None:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    for line in out.splitlines():
        if line.startswith("LOSSES "):
            return [float.fromhex(x) for x in json.loads(line[7:])]
    return None


def test_two_processes_give_the_losses_of_one(tmp_path):
    held = _held_port()  # held until the end, so nothing can take the port before the coordinator
    port = held.getsockname()[1]
    procs = [
        _start(tmp_path / "two", 2, 0, port),
        _start(tmp_path / "two", 2, 1, port),
        _start(tmp_path / "one", 1, 0, 0),
    ]
    try:
        two, other, one = (_losses(p) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        held.close()
    assert other is None and two is not None and one is not None  # process 0 reports
    assert len(two) == 2 and two[1] != two[0]
    # the cross-process all-reduce may add in another order: last-bit differences only
    np.testing.assert_allclose(two, one, rtol=1e-6)
    # both processes wrote one checkpoint together (orbax, multi-process)
    assert (tmp_path / "two" / "checkpoints" / "2").is_dir()


@pytest.mark.parametrize("args", [("localhost:1", None, None), ("localhost:1", 2, 2)])
def test_incomplete_or_bad_multihost_arguments(args):
    with pytest.raises(UserError, match="coordinator|process_id"):
        initialize(*args)


def test_single_process_needs_no_runtime():
    assert initialize() is False and initialize("localhost:1", 1, 0) is False
