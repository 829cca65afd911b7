"""Shared pieces of the conformance tests: every backend the registry lists for an op runs the
op's cases (kernels in interpret mode on CPU), skipped only where the registry says it cannot
take the case, or where a slower interpreter's run would repeat what another backend covers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pallas_kernels import registry


def normals(seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    """float32 standard-normal arrays of `shapes`, drawn by numpy: an eager `jax.random` draw
    compiles a program for every new shape (about 0.2 s each on CPU), and the tests draw a few
    shapes per case.  Cast with `jnp.asarray(x, dtype)` (numpy casts, nothing compiles)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]


def rel(a, b) -> float:
    """Relative error ||a - b|| / ||b|| (a must hold no NaN)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert not np.isnan(a).any(), "NaN in the kernel's output"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def backends(op: registry.Op, configs: dict[str, dict[str, Any]] | None = None) -> list:
    """pytest params (implementation, config) for every backend of `op`: configs[impl] maps a
    variant's name to its Config (default: one variant, no Config)."""
    return [
        pytest.param(impl, cfg, id=variant_name(impl, cfg, configs))
        for impl in op.names
        for cfg in (configs or {}).get(impl, {"": None}).values()
    ]


def variant_name(impl: str, cfg: Any, configs: dict[str, dict[str, Any]] | None) -> str:
    """ "impl" or "impl-variant" for the Config `cfg` of `configs[impl]`."""
    variant = next(n for n, c in (configs or {}).get(impl, {"": None}).items() if c is cfg)
    return f"{impl}-{variant}" if variant else impl


def require(op: registry.Op, impl: str, call: Any) -> None:
    """Skip unless backend `impl` of `op` can run here and takes `call` (the registry's
    reason otherwise)."""
    b = op.backend(impl)
    why = b.unavailable() or b.refuses(call)
    if why is not None:
        pytest.skip(f"{op.name} {impl}: {why}")


def only(impl: str, case: str, runs: dict[str, set[str]]) -> None:
    """Skip `case` for `impl` where `runs` lists the cases `impl` runs (interpret mode is slow;
    the backend shares the logic those cases cover with another backend's run)."""
    if impl in runs and case not in runs[impl]:
        pytest.skip(f"{impl}: covered by the other cases (interpret mode is slow)")
