"""Shared helpers for the benchmark scripts: timing, copy bandwidth, result tables."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp


def device_name() -> str:
    d = jax.devices()[0]
    return getattr(d, "device_kind", d.platform)


def block(x: Any) -> Any:
    return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def time_fn(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time in seconds of fn() (which must return device arrays), after warm-up."""
    for _ in range(warmup):
        block(fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn())
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def copy_bandwidth(nbytes: int) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read + written (METHOD.md)."""
    x = jnp.arange(nbytes // 4, dtype=jnp.float32)
    f = jax.jit(lambda a: a * 1.0000001)
    t = time_fn(lambda: f(x), repeats=5)
    return 2 * nbytes / t


def peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def write_table(rows: list[dict], columns: list[str], out: Path, title: str,
                meta: dict | None = None) -> str:
    """Write rows as JSON + Markdown under `out` (a path stem); return the Markdown table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"meta": meta or {}, "rows": rows}, indent=2))
    lines = [f"| {' | '.join(columns)} |", f"| {' | '.join('---' for _ in columns)} |"]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append(f"| {' | '.join(cells)} |")
    md = "\n".join([f"### {title}", ""] + (
        [f"{k}: {v}" for k, v in (meta or {}).items()] + [""]) + lines) + "\n"
    Path(f"{out}.md").write_text(md)
    return md
