"""Shared helpers for the benchmark scripts: timing, copy bandwidth, per-program memory, result
tables, a word-level tokenizer for random-weight shapes.  Imported as `from experiments.bench_util import ...` (run scripts from the repository
root as `python -m experiments.<topic>.<script>`); how the suite times is in docs/benchmarks.md."""

from __future__ import annotations

import collections
import gzip
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp


def positive_ints(text: str, flag: str, error: Callable[[str], Any]) -> list[int]:
    """A comma-separated list of integers >= 1 (a flag's value); `error` (an ArgumentParser's
    `error`) is called with a message naming the flag otherwise."""
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        error(f"{flag} {text}: comma-separated integers >= 1")
    return values


def device_name() -> str:
    d = jax.devices()[0]
    return getattr(d, "device_kind", d.platform)


def block(x: Any) -> Any:
    return jax.tree.map(
        lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x
    )


def time_fn(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1, inner: int = 1) -> float:
    """Median wall time in seconds of fn() (which must return device arrays), after warm-up.

    inner: calls per timed window, back to back (the dispatch queue hides the host's launch and
    sync overhead, which otherwise dominates sub-millisecond calls); the window's time / inner."""
    for _ in range(warmup):
        block(fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn()
        block(out)
        ts.append((time.perf_counter() - t0) / inner)
    return sorted(ts)[len(ts) // 2]


def time_difference(
    short: Callable[[], Any],
    long: Callable[[], Any],
    repeats: int = 3,
    what: str = "the difference",
    fix: str = "raise --reps",
) -> tuple[float, float, float]:
    """(short s, long s, long - short s) of two programs that differ by the work being timed (e.g.
    generate(1 token) and generate(N tokens): the difference is N-1 decode steps).

    Each repetition times `short` and then `long` back to back, so that a change in the machine's
    load moves both; the difference is the median of the pairs' differences (short and long are
    the medians of their own times).  One warm-up call of each first.  Raises RuntimeError when
    the difference is not positive: the work was below the timing noise, and any rate computed
    from it would be made up; `what` names the difference and `fix` what to change."""
    block(short())
    block(long())
    shorts, longs = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(short())
        t1 = time.perf_counter()
        block(long())
        shorts.append(t1 - t0)
        longs.append(time.perf_counter() - t1)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    diff = med([b - a for a, b in zip(shorts, longs)])
    if diff <= 0:
        raise RuntimeError(
            f"{what} {diff * 1e3:.3f} ms <= 0: the long program took {med(longs) * 1e3:.3f} ms, "
            f"the short one {med(shorts) * 1e3:.3f} ms (median of {repeats} back-to-back pairs); "
            f"the timed work is below the timing noise: {fix}"
        )
    return med(shorts), med(longs), diff


def compiled_bytes(compiled: Any) -> int | None:
    """Device bytes XLA's buffer assignment gives one compiled program (`jax.jit(f).lower(...)
    .compile()`): arguments + outputs not aliased to them + temporaries, per device.  A per-row
    peak, unlike `peak_bytes_in_use`, which is the process's high-water mark over every row so
    far.  None where the backend gives no memory analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def copy_bandwidth(nbytes: int) -> float:
    """Device copy bandwidth in bytes/s of an elementwise pass over `nbytes` of float32, counting
    bytes read + written: the practical HBM ceiling the floors are computed against."""
    x = jnp.arange(nbytes // 4, dtype=jnp.float32)
    f = jax.jit(lambda a: a * 1.0000001)
    t = time_fn(lambda: f(x), repeats=5)
    return 2 * nbytes / t


def process_peak_bytes() -> int | None:
    """The allocator's high-water mark on device 0 over the whole process so far (never reset):
    not a per-row figure; see `compiled_bytes` for one."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def write_table(
    rows: list[dict], columns: list[str], out: Path, title: str, meta: dict | None = None
) -> str:
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
    md = (
        "\n".join(
            [f"### {title}", ""] + ([f"{k}: {v}" for k, v in (meta or {}).items()] + [""]) + lines
        )
        + "\n"
    )
    Path(f"{out}.md").write_text(md)
    return md


def kernel_summary(trace_dir: Path, steps: int = 1, top: int = 40) -> dict:
    """GPU kernel time per step from the newest Perfetto trace that `jax.profiler.trace(...,
    create_perfetto_trace=True)` wrote under trace_dir: kernels and busy ms per step, and the
    `top` kernel names by time (per step = totals / steps)."""
    files = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    data = json.loads(gzip.open(files[-1]).read())
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    gpu = {p for p, n in names.items() if "GPU" in n.upper()}
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e:
            name = e["name"]
            if name.startswith("Memcpy"):  # which HLO op copies: the trace names it
                args = e.get("args", {})
                op = args.get("hlo_op") or args.get("long_name") or args.get("tf_op")
                name = f"{name} <{str(op)[:60] if op else ','.join(sorted(args))[:60]}>"
            by_name[name].append(e["dur"])
    rows = sorted(((n, len(v), sum(v)) for n, v in by_name.items()), key=lambda r: -r[2])
    busy_us = sum(r[2] for r in rows)
    return {
        "kernels_per_step": sum(r[1] for r in rows) / steps,
        "busy_ms_per_step": busy_us / steps / 1e3,
        "top": [
            {
                "kernel": n[:120],
                "per_step": round(c / steps, 2),
                "us_per_step": round(t / steps, 1),
                "share": round(t / max(busy_us, 1e-9), 4),
            }
            for n, c, t in rows[:top]
        ],
    }


def trace_kernels(run: Callable[[], Any], steps: int, top: int = 25) -> dict | None:
    """GPU kernels of `steps` calls made by run() (which blocks on its own results), from a
    profiler trace in a temporary directory: `kernel_summary` per step plus `wall_ms_per_step`
    (device busy over wall tells a host-bound loop from a device-bound one).  None off GPU or
    when the profiler is unavailable (a machine without CUPTI still gets its wall times)."""
    if jax.devices()[0].platform != "gpu":
        return None
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d, create_perfetto_trace=True):
                t0 = time.perf_counter()
                run()
                wall = time.perf_counter() - t0
            return {"wall_ms_per_step": 1e3 * wall / steps, **kernel_summary(Path(d), steps, top)}
    except Exception as e:  # noqa: BLE001
        print(f"profiler unavailable: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None


# One instruction of an HLO module's text: (name, result type, opcode, operands...), and a
# computation's header: (name).  Shared by the HLO readers of the benchmarks.
HLO_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
HLO_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_HLO_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def hlo_copies(hlo_text: str, top: int = 12) -> dict:
    """The copy instructions of an optimized HLO module (what the GPU runs as MemcpyD2D):
    count, total bytes, and the `top` (dtype, shape) groups by bytes.  A copy of a whole
    parameter- or optimizer-sized buffer every step usually means a buffer XLA could not
    update in place."""
    groups: dict[tuple[str, str], list[int]] = {}
    fusion_body = False
    for line in hlo_text.splitlines():
        head = HLO_COMPUTATION.match(line)
        if head:  # a fusion's body is one kernel: its copies are not memcpys
            fusion_body = "fused" in head[1] or head[1].startswith("wrapped_")
            continue
        ins = None if fusion_body else HLO_INSTR.match(line)
        if ins is None or ins[3] not in ("copy", "copy-start"):
            continue
        arr = _HLO_ARRAY.search(ins[2])
        if arr is None:
            continue
        dtype, dims = arr[1], arr[2]
        n = math.prod(int(d) for d in dims.split(",") if d)
        g = groups.setdefault((dtype, dims), [0, 0])
        g[0] += 1
        g[1] += n * _DTYPE_BYTES.get(dtype, 4)
    rows = sorted(groups.items(), key=lambda kv: -kv[1][1])
    return {
        "copies": sum(g[0] for g in groups.values()),
        "bytes": sum(g[1] for g in groups.values()),
        "top": [{"dtype": d, "shape": s, "count": c, "bytes": b} for (d, s), (c, b) in rows[:top]],
    }


_DTYPE_BYTES = {
    "f32": 4,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "s8": 1,
    "u8": 1,
    "pred": 1,
    "s64": 8,
    "f64": 8,
    "u64": 8,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
}


# A word-level tokenizer for random-weight model shapes: token id i <-> the word "w<i>".  A prompt
# of token ids becomes the text "w12 w7 w993 ...", which encodes back to exactly those ids, so a
# text prompt and a token-id prompt are the same workload, and every generated token decodes to
# text (a server's incremental detokenization runs as for a real model).  It saves like any
# transformers tokenizer (`save_pretrained`), with a chat template, so `jaxturbo serve --model
# DIR` loads it from a model directory.
WORD_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}w0{% endif %}"
)


def word_tokenizer(vocab_size: int) -> Any:
    """A transformers fast tokenizer over the words w0 .. w<vocab_size - 1> (split on spaces;
    unknown words -> w0; no special tokens, no BOS/EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0")
    tok.chat_template = WORD_CHAT_TEMPLATE
    return tok


def ids_to_text(ids: Sequence[int]) -> str:
    """The text `word_tokenizer` encodes to exactly `ids`."""
    return " ".join(f"w{int(i)}" for i in ids)
