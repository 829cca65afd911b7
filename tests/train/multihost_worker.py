"""One process of a tiny sharded SFT run, for the multi-host test.

    python tests/train/multihost_worker.py OUT_DIR NUM_PROCESSES PROCESS_ID PORT

Each process has 8 / NUM_PROCESSES fake CPU devices; with more than one process they join
through `jaxturbo.train.distributed.initialize` (coordinator on localhost:PORT).  The mesh is
data=4 x fsdp=2 over the 8 global devices.  Process 0 prints `LOSSES <json of float.hex>`.
"""

import json
import os
import sys

out, nproc, pid, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tests.helpers import CPU_COMPILE_FLAGS  # noqa: E402

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // nproc} {CPU_COMPILE_FLAGS}"

from jaxturbo.train.distributed import initialize  # noqa: E402

initialize(f"localhost:{port}", nproc, pid)

import jax  # noqa: E402
from sft_worker import CFG, docs  # noqa: E402

from jaxturbo.models.init import init_params  # noqa: E402
from jaxturbo.parallel.mesh import make_mesh  # noqa: E402
from jaxturbo.train.optimizer import OptimizerConfig  # noqa: E402
from jaxturbo.train.sft import RunConfig, train_sft  # noqa: E402
from jaxturbo.train.step import TrainConfig  # noqa: E402

STEPS = 2
run = RunConfig(
    out_dir=out,
    steps=STEPS,
    batch_size=8,
    seq_len=32,
    save_every=100,
    keep=1,
    progress=False,
    plot=False,
)
hist = train_sft(
    CFG,
    init_params(CFG, jax.random.key(0)),
    docs(),
    run,
    opt_cfg=OptimizerConfig(learning_rate=3e-3, warmup_steps=1, total_steps=STEPS),
    train_cfg=TrainConfig(compute_dtype="float32"),
    mesh=make_mesh("data=4,fsdp=2"),
    data_id="worker-docs",
).history
if jax.process_index() == 0:
    print("LOSSES " + json.dumps([float(h["loss"]).hex() for h in hist]), flush=True)
