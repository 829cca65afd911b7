"""Deviceless GPU compilation: XLA compiles for a GPU it does not have, on a CPU-only machine.

Given a GPU's description (a `GpuTargetConfigProto`, e.g. `h100_target_config.pbtxt` beside this
file) and a topology, `jax.jit(...).lower(...).compile()` runs the whole GPU pipeline: fusion,
the latency-hiding scheduler, the async-collective conversion, Mosaic GPU's lowering and ptxas.
Only the autotuning of GEMM algorithms is skipped.  What it cannot tell is time.  It answers
"what will the GPU run" before any device time is spent: the schedule of a TP decode step
(`ladder/aot_schedule.py`), the registers, spills and wgmma serialisation of a Pallas kernel
(`attention/ptxas_report.py`).

Needs, beside jax 0.11.2: the CUDA PJRT plugin, CUDA 13 libraries and a `ptxas` on PATH.

    pip install jax-cuda13-plugin==0.11.2 jax-cuda13-pjrt==0.11.2   # libs: nvidia-* cu13 wheels
                                                                    # (PyTorch's cu13 build has them)

Checked against the GPU: an earlier ladder decode step compiled this way had the same 33
synchronous / 32 async all-reduces as the H100 host's own compile of it, and the Mosaic GPU
forward the same 168 registers and no spills that ptxas reported there.

    from experiments.tools import aot_gpu
    devices = aot_gpu.gpu_devices(4)        # four abstract H100s for a Mesh
"""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = {"h100": HERE / "h100_target_config.pbtxt"}


def gpu_devices(count: int, target: str = "h100") -> list:
    """`count` abstract GPUs of one host, usable in a `Mesh` for `.lower(...).compile()`.

    Call before anything initialises JAX's backends with other XLA flags.  Exits with the
    install line when the CUDA plugin is missing."""
    if target not in TARGETS:
        raise SystemExit(f"target {target!r}: choose one of {sorted(TARGETS)}")
    # no driver here: the plugin's CUDA version check would call cuInit and fail
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(
            "aot", "cuda", topology=f"1x1x{count}", target_config=TARGETS[target].read_text()
        )
    except Exception as e:  # noqa: BLE001 - any failure here means: no usable CUDA plugin
        raise SystemExit(
            f"deviceless CUDA compile unavailable ({type(e).__name__}: {e}); "
            "pip install jax-cuda13-plugin==0.11.2 jax-cuda13-pjrt==0.11.2 "
            "(see experiments/tools/aot_gpu.py)"
        ) from None
    return list(topo.devices)


def dispatch_as_hopper() -> None:
    """Make the kernels' `auto` dispatch answer for the target GPU rather than this machine's
    CPU (it asks `jax.devices()`), so that a compiled step holds the kernels an H100 would run."""
    from pallas_kernels import registry

    registry.platform = lambda: "gpu"
    registry.is_hopper = lambda: True
