"""Several hosts through JAX's own distributed runtime: one call before anything touches devices.

    initialize(coordinator="10.0.0.1:1234", num_processes=2, process_id=0)

Every process then sees the global device list (`jax.devices()`), builds the same mesh over it
and runs the same program; `jax.process_index()` says which rows of the batch it feeds (see
`jaxturbo.train.sharding.put_batch`).  With no arguments, clusters that JAX recognises
(Cloud TPU pods, SLURM with more than one task, ...) are detected by `jax.distributed` itself;
on a single machine nothing happens.  On CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

import os

import jax

from jaxturbo.errors import UserError


def _cluster_detected() -> bool:
    """Whether jax.distributed.initialize() can find its peers without arguments."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    return "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Join the distributed runtime; return True when running as several processes.

    coordinator: "host:port" of process 0's coordination service; num_processes and
    process_id go with it (all three or none).  Must run before the first device query.
    """
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise UserError(
            "multi-host runs need all of coordinator (HOST:PORT), num_processes "
            "and process_id (or none of them, on a cluster JAX detects)"
        )
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:  # type: ignore[operator]
            raise UserError(
                f"process_id={process_id} must be in [0, num_processes={num_processes})"
            )
        if num_processes == 1:
            return False
    elif not _cluster_detected():
        return False
    # CPU devices of different processes talk through gloo (the default, "none", cannot)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if all(given):
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
    else:
        jax.distributed.initialize()
    return jax.process_count() > 1
