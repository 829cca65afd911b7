"""Deviceless GPU compilation: XLA compiles for a GPU it does not have, on a CPU-only machine.

Given a GPU's description (a `GpuTargetConfigProto`, e.g. `H100_TARGET_CONFIG` below) and a topology, `jax.jit(...).lower(...).compile()` runs the whole GPU pipeline: fusion,
the latency-hiding scheduler, the async-collective conversion, Mosaic GPU's lowering and ptxas.
Only the autotuning of GEMM algorithms is skipped.  What it cannot tell is time.  It answers
"what will the GPU run" before any device time is spent: the schedule of a TP decode step
(`ladder/analysis.py schedule`), the registers, spills and wgmma serialisation of a Pallas kernel
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

# XLA GpuTargetConfigProto (text) of one H100 80GB HBM3 (SXM): what XLA reads off the device,
# written out so that XLA compiles for it without one.  The runtime and cuDNN versions are those
# JAX 0.11.2's cu13 wheels bring.
H100_TARGET_CONFIG = """\
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
runtime_version: { major: 13 minor: 0 patch: 0 }
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 19 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
TARGETS = {"h100": H100_TARGET_CONFIG}


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
            "aot", "cuda", topology=f"1x1x{count}", target_config=TARGETS[target]
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
