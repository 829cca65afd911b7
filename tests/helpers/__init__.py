"""Test helpers shared across the suite: tiny random HF models (`hf_tiny`), tiny DeepSeek-V3
checkpoints (`deepseek_tiny`) and tiny GGUF files (`gguf_tiny`)."""

import os

# Compiling, not running, is what the CPU suite spends its time on (tiny models, hundreds of
# distinct programs, many on 8 fake devices).  LLVM at -O0 without its expensive passes halves
# XLA:CPU's compile time (a sequence-parallel train-step test: 147 -> 82 CPU-seconds); the
# programs run slower, which tiny shapes do not notice.  Results are unchanged: LLVM reorders no
# floating-point arithmetic at any level (XLA:CPU does not enable fast-math).
CPU_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def cpu_env(devices: int, **extra: str) -> dict[str, str]:
    """The environment for a subprocess that runs JAX on `devices` fake CPU devices, compiling as
    the suite does (CPU_COMPILE_FLAGS); `extra` variables are added or override."""
    flags = f"--xla_force_host_platform_device_count={devices} {CPU_COMPILE_FLAGS}"
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, **extra}
