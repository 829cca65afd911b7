"""Read back the ladder decode benchmark: its rows, its compiled schedule and its traces.

One module, four subcommands (`python -m experiments.ladder.analysis CMD --help`):

    runs      ladder-vs-standard ratios run by run and per layout, or the benchmark grid, from
              `bench.py` rows:
                  python -m experiments.ladder.analysis runs experiments/ladder/results/runs_h100x4.json
                  python -m experiments.ladder.analysis runs --grid experiments/ladder/results/runs_h100x4.json
    schedule  compile `bench.py`'s decode loop for a described GPU host on a CPU-only machine and
              report whether its all-reduces overlap compute (no device, no timing):
                  python -m experiments.ladder.analysis schedule --preset 8b --tp 4
    hlo       the same report from compiled HLO text dumped on a GPU host:
                  python -m experiments.ladder.analysis hlo runs/hlo/decode.hlo.txt [--excerpt]
    trace     where each GPU's decode step goes, per stream, from a profiler trace
              (`bench.py --profile DIR`):
                  python -m experiments.ladder.analysis trace DIR/ladder_tp2_b1 DIR/desync_tp2_b1
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from experiments.bench_util import HLO_COMPUTATION, HLO_INSTR

PROG = "python -m experiments.ladder.analysis"
RAW = argparse.RawDescriptionHelpFormatter

# ---------------------------------------------------------------------------------------------
# runs: ratios from rows

RUNS_DOC = """Ladder-vs-standard ratios run by run, from a rows JSON (`bench.py` rows, with `call`,
`run`, `host` and `note` added where several calls are merged), as a table and a plot.

One bench process measures standard, ladder and desync back to back; a *run* is that triple.
Between processes on the same host, standard's tokens/s moved by up to 7% (the same
executable), so one run's ratio is not the layout's ratio: this groups rows into runs, prints
every run's ratio and each layout's median, and plots them against the bar.

`--grid` instead reads one or more rows files and prints the benchmark grid (TP x batch x P2P)
for one XLA flag set and layout, each cell from the latest round of runs (the rows' `session`
number) that measured both standard and ladder there (medians over that round's runs).

A rows file is a JSON list of rows, or an object whose "rows" is that list."""

MODES = ("standard", "ladder", "desync")


def group_runs(rows: list[dict]) -> list[dict]:
    """Rows -> one dict per run: {note, host, call, run, batch, p2p, <mode>: tokens/s, ratio}.
    A run is keyed by (call, run, note, batch, p2p); ratio = ladder / standard (None when the
    run lacks either).  Rows without `call` form one run per (note, batch, p2p)."""
    runs: dict[tuple, dict] = {}
    for r in rows:
        key = (
            r.get("call"),
            r.get("run", 1),
            r.get("note", r.get("xla_preset", "")),
            r["batch"],
            r["p2p"],
        )
        run = runs.setdefault(
            key,
            dict(
                note=key[2],
                host=r.get("host", "-"),
                call=key[0],
                run=key[1],
                batch=r["batch"],
                p2p=r["p2p"],
            ),
        )
        if r["residual"] in run:
            raise ValueError(f"two {r['residual']} rows in run {key}")
        run[r["residual"]] = r["tokens_per_s"]
    out = list(runs.values())
    for run in out:
        run["ratio"] = (
            run["ladder"] / run["standard"] if "ladder" in run and "standard" in run else None
        )
    return out


def layout_medians(runs: list[dict]) -> dict[tuple, dict]:
    """(note, batch, p2p) -> {n: runs with a ratio, ratio/min/max, <mode>: median tokens/s}."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["note"], run["batch"], run["p2p"]), []).append(run)
    out = {}
    for key, rs in groups.items():
        ratios = [r["ratio"] for r in rs if r["ratio"] is not None]
        s = dict(n=len(ratios))
        if ratios:
            s.update(ratio=statistics.median(ratios), min=min(ratios), max=max(ratios))
        for m in MODES:
            vals = [r[m] for r in rs if m in r]
            if vals:
                s[m] = statistics.median(vals)
        out[key] = s
    return out


def runs_table(runs: list[dict]) -> str:
    lines = [
        "| layout | batch | P2P | host | call.run | standard | ladder | desync | ladder / standard |",
        "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(
        runs, key=lambda r: (r["note"], r["batch"], not r["p2p"], r["call"] or 0, r["run"])
    ):
        cells = [f"{r[m]:.1f}" if m in r else "-" for m in MODES]
        ratio = f"{r['ratio']:.3f}x" if r["ratio"] is not None else "-"
        lines.append(
            f"| {r['note']} | {r['batch']} | {'on' if r['p2p'] else 'off'} | {r['host']} | "
            f"{'-' if r['call'] is None else r['call']}.{r['run']} | {' | '.join(cells)} | {ratio} |"
        )
    lines += [
        "",
        "| layout | batch | P2P | runs | median ratio | range | median standard | "
        "median ladder | median desync |",
        "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for (note, batch, p2p), s in sorted(
        layout_medians(runs).items(), key=lambda kv: (kv[0][1], kv[0][0])
    ):
        if not s["n"]:
            continue
        med = [f"{s[m]:.1f}" if m in s else "-" for m in MODES]
        lines.append(
            f"| {note} | {batch} | {'on' if p2p else 'off'} | {s['n']} | {s['ratio']:.3f}x | "
            f"{s['min']:.3f}-{s['max']:.3f} | {' | '.join(med)} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, bar: float | None, title: str) -> None:
    """Each run's ratio as a dot per layout (batch 1, P2P on), the layout's median as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in runs if r["ratio"] is not None and r["batch"] == 1 and r["p2p"]]
    notes = sorted(
        {r["note"] for r in sel},
        key=lambda n: -statistics.median(r["ratio"] for r in sel if r["note"] == n),
    )
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(notes) + 1.6))
    hosts = sorted({r["host"] for r in sel})
    for i, note in enumerate(notes):
        rs = [r for r in sel if r["note"] == note]
        ax.barh(i, statistics.median(r["ratio"] for r in rs), color="0.85")
        for r in rs:
            ax.plot(r["ratio"], i, "o", color=f"C{hosts.index(r['host'])}")
    for j, h in enumerate(hosts):
        ax.plot([], [], "o", color=f"C{j}", label=f"host {h}")
    if bar:
        ax.axvline(bar, color="k", ls="--", lw=1, label=f"bar {bar:.2f}x")
    ax.set_yticks(range(len(notes)), notes, fontsize=8)
    lo = min(r["ratio"] for r in sel)
    ax.set_xlim(min(lo, bar or lo) - 0.05, max(max(r["ratio"] for r in sel), bar or 0) + 0.03)
    ax.set_xlabel("ladder / standard tokens/s (dots: runs; bars: median)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


GRID_MODES = ("standard", "ladder", "parallel", "desync")


def grid(rows: list[dict], xla_preset: str) -> list[dict]:
    """Rows of several rounds of runs (their `session` number) -> one dict per (tp, batch, p2p)
    measured with `xla_preset`: {tp, batch, p2p, session, <mode>: median tokens/s, ratio:
    ladder / standard, borrowed: {mode: session}}.  A cell's round is the latest that measured
    both standard and ladder there, so its ratio is a same-round one; a mode that round lacks
    is taken from the latest round that has it and named in `borrowed` (it is not part of the
    ratio)."""
    cells: dict[tuple, dict[int, dict[str, list[float]]]] = {}
    for r in rows:
        if r.get("xla_preset") != xla_preset or r["residual"] not in GRID_MODES:
            continue
        by_session = cells.setdefault((r["tp"], r["batch"], bool(r["p2p"])), {})
        by_session.setdefault(r.get("session", 0), {}).setdefault(r["residual"], []).append(
            r["tokens_per_s"]
        )
    out = []
    for (tp, batch, p2p), by_session in sorted(
        cells.items(), key=lambda kv: (-kv[0][0], kv[0][1], not kv[0][2])
    ):
        paired = [s for s, m in by_session.items() if "standard" in m and "ladder" in m]
        if not paired:
            continue
        session = max(paired)
        cell = dict(tp=tp, batch=batch, p2p=p2p, session=session, borrowed={})
        for mode in GRID_MODES:
            have = [s for s, m in by_session.items() if mode in m]
            if not have:
                continue
            src = session if session in have else max(have)
            cell[mode] = statistics.median(by_session[src][mode])
            if src != session:
                cell["borrowed"][mode] = src
        cell["ratio"] = cell["ladder"] / cell["standard"]
        out.append(cell)
    return out


def grid_table(cells: list[dict]) -> str:
    lines = [
        "| TP | batch | P2P | standard | ladder | parallel | desync | ladder / standard | round |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in cells:
        vals = [
            (f"{c[m]:,.1f}" + (f" (s{c['borrowed'][m]})" if m in c["borrowed"] else ""))
            if m in c
            else "-"
            for m in GRID_MODES
        ]
        lines.append(
            f"| {c['tp']} | {c['batch']} | {'on' if c['p2p'] else 'off'} | "
            f"{' | '.join(vals)} | {c['ratio']:.3f}x | {c['session']} |"
        )
    return "\n".join(lines)


def _load_rows(path: Path) -> list[dict]:
    rows = json.loads(path.read_text())
    if isinstance(rows, dict) and "rows" in rows:
        rows = rows["rows"]
    if not isinstance(rows, list) or not rows:
        raise ValueError('expected a non-empty JSON list of rows (or {"rows": [...]})')
    return rows


def runs_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"{PROG} runs", description=RUNS_DOC, formatter_class=RAW)
    p.add_argument(
        "rows",
        type=Path,
        nargs="+",
        help="rows JSON (a list of bench.py rows); several only with --grid",
    )
    p.add_argument("--bar", type=float, default=None, help="ratio to draw as the bar")
    p.add_argument("--png", type=Path, default=None, help="write the plot here")
    p.add_argument("--md", type=Path, default=None, help="write the table here")
    p.add_argument(
        "--grid",
        action="store_true",
        help="the TP x batch x P2P grid over all the files' rounds of runs instead",
    )
    p.add_argument(
        "--xla-preset",
        default="nccl_lhs+fusedproj",
        help="with --grid: the rows' xla_preset (flag set + layout) to tabulate",
    )
    a = p.parse_args(argv)
    if len(a.rows) > 1 and not a.grid:
        print(f"error: {len(a.rows)} files given; one, or use --grid", file=sys.stderr)
        return 2
    try:
        rows = [r for path in a.rows for r in _load_rows(path)]
        runs = None if a.grid else group_runs(rows)
        cells = grid(rows, a.xla_preset) if a.grid else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: {' '.join(map(str, a.rows))}: not ladder bench rows ({e})", file=sys.stderr)
        return 2
    if a.grid:
        if not cells:
            presets = sorted({str(r.get("xla_preset")) for r in rows})
            print(
                f"error: no standard/ladder pair with xla_preset {a.xla_preset!r}; the files "
                f"have {', '.join(presets)}",
                file=sys.stderr,
            )
            return 2
        text = grid_table(cells)
        print(text)
        if a.md:
            a.md.write_text(text + "\n")
        return 0
    text = runs_table(runs)
    print(text)
    if a.md:
        a.md.write_text(text + "\n")
    if a.png:
        r0 = rows[0]
        plot(runs, a.png, a.bar, f"{r0['preset']}, TP {r0['tp']}, batch 1, {r0['device']}")
    return 0


# ---------------------------------------------------------------------------------------------
# hlo: does a compiled module's all-reduce overlap compute

HLO_DOC = """Read a compiled (scheduled) HLO module and report whether its all-reduces overlap compute.

In a scheduled module the instruction order of each computation is the execution order.  An
async all-reduce is an `all-reduce-start` / `all-reduce-done` pair; the compute kernels that sit
between the two run while the collective is in flight.  A synchronous `all-reduce` overlaps
nothing.  A tuple all-reduce with several operands means XLA combined independent reductions,
which in `ladder` makes the attention all-reduce wait for the MLP (no overlap left to win)."""

COMPUTE_OPS = {
    "fusion",
    "custom-call",
    "dot",
    "convolution",
    "reduce",
    "scatter",
    "gather",
    "dynamic-update-slice",
    "while",
    "conditional",
    "call",
    "call-start",
    "async-start",
}  # the last two: a computation on another stream


@dataclass
class Pair:
    name: str
    operands: int
    between: list[str] = field(default_factory=list)  # compute instructions between start/done


# Instructions that put work on a GPU stream: kernels (fusions, custom calls, copies) and
# collectives (a start is the launch, its done only a wait).  Control flow launches nothing.
LAUNCH_OPS = (COMPUTE_OPS - {"while", "conditional", "call", "call-start", "async-start"}) | {
    "copy",
    "all-reduce",
    "all-reduce-start",
    "all-gather",
    "all-gather-start",
    "reduce-scatter",
    "collective-permute",
    "collective-permute-start",
    "all-to-all",
}


@dataclass
class Report:
    computation: str
    sync: list[tuple[str, int]] = field(default_factory=list)  # (name, operand count)
    pairs: list[Pair] = field(default_factory=list)
    launches: int = 0  # kernels and collectives launched by one run of the computation


def _operand_count(args: str) -> int:
    head = args.split("),", 1)[0]
    return head.count("%")


def analyse(text: str) -> list[Report]:
    """One Report per computation that holds an all-reduce."""
    reports: list[Report] = []
    comp, order = None, []
    for line in text.splitlines():
        m = HLO_COMPUTATION.match(line)
        if m:
            comp, order = m.group(1), []
            continue
        if line.startswith("}") and comp is not None:
            rep = _pairs(comp, order)
            if rep.sync or rep.pairs:
                reports.append(rep)
            comp = None
            continue
        im = HLO_INSTR.match(line)
        if comp is not None and im:
            order.append((im.group(1), im.group(3), im.group(4)))
    return reports


def _pairs(comp: str, order: list[tuple[str, str, str]]) -> Report:
    rep = Report(comp, launches=sum(op in LAUNCH_OPS for _, op, _ in order))
    open_: dict[str, Pair] = {}
    for name, op, args in order:
        if op == "all-reduce":
            rep.sync.append((name, _operand_count(args)))
        elif op == "all-reduce-start":
            open_[name] = Pair(name, _operand_count(args))
        elif op == "all-reduce-done":
            src = re.match(r"\s*%?([\w.\-]+)", args)
            pair = open_.pop(src.group(1), None) if src else None
            if pair:
                rep.pairs.append(pair)
        elif op in COMPUTE_OPS:
            for p in open_.values():
                p.between.append(f"{op} {name}")
    return rep


def summary(reports: list[Report]) -> str:
    lines = []
    for r in reports:
        overl = [p for p in r.pairs if p.between]
        comb = sum(1 for _, n in r.sync if n > 1) + sum(1 for p in r.pairs if p.operands > 1)
        lines.append(
            f"{r.computation}: {len(r.sync)} sync all-reduce, {len(r.pairs)} async pairs, "
            f"{len(overl)} with compute inside (mean {sum(len(p.between) for p in r.pairs) / max(len(r.pairs), 1):.1f} "
            f"kernels), {comb} combined (multi-operand), {r.launches} launches"
        )
    return "\n".join(lines)


_WHILE = re.compile(r"^\s*%(\S+) = .* while\(.*?body=%([\w.\-]+)(.*)$", re.M)
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def loops(text: str) -> str:
    """One line per `while` of a compiled module: its body and whether XLA knows its trip count.
    A GPU while loop without one copies its predicate to the host on every iteration and waits
    for it (the device's queue drains each time); with one, the iterations launch back to back."""
    lines = []
    for name, body, rest in _WHILE.findall(text):
        trip = _TRIP.search(rest)
        lines.append(
            f"loop {name} (body {body}): "
            + (
                f"known trip count {trip.group(1)}, no host round trip"
                if trip
                else "trip count unknown: the host reads the predicate every iteration"
            )
        )
    return "\n".join(lines)


def excerpt(text: str, start_name: str, context: int = 3) -> str:
    """The scheduled lines from `context` before an all-reduce-start to its done."""
    lines = text.splitlines()
    i = next(k for k, l in enumerate(lines) if re.search(rf"%{re.escape(start_name)} = ", l))
    j = next(
        k
        for k in range(i, len(lines))
        if "all-reduce-done(" in lines[k] and re.search(rf"%{re.escape(start_name)}\b", lines[k])
    )
    short = [re.sub(r", metadata=\{.*", "", l)[:160] for l in lines[max(0, i - context) : j + 1]]
    return "\n".join(short)


def around_sync(text: str, computation: str, name: str, context: int = 12) -> str:
    """The scheduled lines `context` before and after one synchronous all-reduce: what the
    scheduler put next to it instead of inside an async pair."""
    lines = text.splitlines()
    start = next(
        k
        for k, l in enumerate(lines)
        if HLO_COMPUTATION.match(l) and HLO_COMPUTATION.match(l).group(1) == computation
    )
    i = next(k for k in range(start, len(lines)) if re.search(rf"%{re.escape(name)} = ", lines[k]))
    return "\n".join(
        re.sub(r", metadata=\{.*", "", l)[:200]
        for l in lines[max(0, i - context) : i + context + 1]
    )


def hlo_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"{PROG} hlo", description=HLO_DOC, formatter_class=RAW)
    p.add_argument("files", nargs="+")
    p.add_argument("--excerpt", action="store_true", help="print the lines around one pair")
    p.add_argument(
        "--around-sync",
        action="store_true",
        help="print the lines around the middle synchronous all-reduce",
    )
    a = p.parse_args(argv)
    for f in a.files:
        text = open(f).read()
        reps = analyse(text)
        print(f"== {f}\n{summary(reps)}")
        if a.excerpt:
            for r in reps:
                if r.pairs:
                    mid = r.pairs[len(r.pairs) // 2]
                    print(excerpt(text, mid.name))
        if a.around_sync:
            for r in reps:
                if r.sync:
                    print(f"-- {r.computation}, around {r.sync[len(r.sync) // 2][0]}:")
                    print(around_sync(text, r.computation, r.sync[len(r.sync) // 2][0]))
                    break
    return 0


# ---------------------------------------------------------------------------------------------
# schedule: compile the decode loop for a GPU without one

SCHEDULE_DOC = """Compile the tensor-parallel decode loop for a lent GPU host without any GPU,
and report whether its all-reduces overlap compute (the `hlo` report, plus each `while` loop).

The *schedule* of `bench.py`'s decode step (the same `generate_arrays` while loop, the same
shardings and XLA flags) decides whether each all-reduce is an async start/done pair with
compute inside or a synchronous wait.  `experiments/tools/aot_gpu.py` compiles it for an H100
host without one, so that schedule is read on a CPU machine before any device time is spent;
timing still needs the GPU.  Setup (the CUDA plugin) in `experiments/tools/aot_gpu.py`."""


def _schedule_args(argv: list[str] | None, bench, aot_gpu) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"{PROG} schedule", description=SCHEDULE_DOC, formatter_class=RAW
    )
    p.add_argument("--preset", default="8b", choices=sorted(bench.PRESETS))
    p.add_argument("--residual", default="standard,ladder,desync")
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--xla-preset", default="nccl_lhs", choices=sorted(bench.XLA_PRESETS))
    p.add_argument(
        "--target", default="h100", choices=sorted(aot_gpu.TARGETS), help="the GPU to compile for"
    )
    p.add_argument(
        "--attn-impl",
        default="auto",
        help="attention implementation inside the step ('auto': what the lent H100 "
        "picks, decided here for a Hopper GPU)",
    )
    p.add_argument(
        "--projections",
        default="fused",
        choices=bench.PROJECTIONS,
        help="weight layout, as bench's --projections",
    )
    p.add_argument("--dump", default=None, help="folder for each mode's compiled HLO")
    p.add_argument(
        "--around-sync",
        action="store_true",
        help="print the scheduled lines around one synchronous all-reduce",
    )
    return p.parse_args(argv)


def schedule_main(argv: list[str] | None = None) -> int:
    from experiments.ladder import bench  # bench imports this module: import it here
    from experiments.tools import aot_gpu

    a = _schedule_args(argv, bench, aot_gpu)
    # the same XLA flags as a bench.py worker: they are read when the backend starts
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), *bench.GPU_FLAGS, *bench.XLA_PRESETS[a.xla_preset]]
    ).strip()
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxturbo.bridge.hf import global_shapes
    from jaxturbo.inference.generation import generate_arrays
    from jaxturbo.inference.sampling import SamplingParams
    from jaxturbo.parallel import tensor
    from jaxturbo.parallel.mesh import make_mesh

    devices = aot_gpu.gpu_devices(a.tp, a.target)
    aot_gpu.dispatch_as_hopper()

    dtype = jnp.bfloat16
    base = bench.preset_config(a.preset)
    tensor.check_tensor_parallel(base, a.tp)
    mesh = make_mesh({"tensor": a.tp}, devices)
    shapes = bench.bench_layer_shapes(base, a.tp, a.projections)
    specs = tensor.param_specs(
        {**{n: None for n in global_shapes(base)}, "layers": {n: None for n in shapes}}
    )

    def abstract(shape, spec, dt=dtype):
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))

    params = {n: abstract(s, specs[n]) for n, s in global_shapes(base).items()}
    params["layers"] = {
        n: abstract((base.num_hidden_layers, *s), specs["layers"][n]) for n, s in shapes.items()
    }
    toks = abstract((a.batch, a.prompt), P(), jnp.int32)
    lens = abstract((a.batch,), P(), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))
    stops = abstract((1,), P(), jnp.int32)

    print(
        f"# {a.preset}, TP {a.tp}, batch {a.batch}, XLA flags {a.xla_preset}"
        f", {a.projections} projections, compiled for "
        f"{devices[0].device_kind} without a device"
    )
    for mode in a.residual.split(","):
        # desync: the standard model without its all-reduces (as in bench.py)
        cfg = base.replace(residual_mode="standard" if mode == "desync" else mode)
        gen_kw = dict(
            cfg=cfg,
            max_new_tokens=a.new_tokens,
            sampling=SamplingParams(),
            stream=None,
            attn_impl=a.attn_impl,
            cache_dtype=jnp.dtype(dtype).name,
            model_fn=tensor.TensorParallel(mesh, unroll=True, skip_allreduce=mode == "desync"),
            kv_heads=tensor.cache_kv_heads(cfg, a.tp),
        )
        compiled = generate_arrays.lower(params, toks, lens, key, stops, **gen_kw).compile()
        text = compiled.as_text()
        mem = compiled.memory_analysis()
        if a.dump:
            Path(a.dump).mkdir(parents=True, exist_ok=True)
            (
                Path(a.dump)
                / f"aot_{a.preset}_{mode}_tp{a.tp}_b{a.batch}_{a.xla_preset}_{a.projections}.hlo.txt"
            ).write_text(text)
        reports = analyse(text)
        gib = ""
        if mem is not None:  # per GPU: weights + cache in, XLA's scratch; does it fit?
            gib = (
                f" (per GPU: arguments {mem.argument_size_in_bytes / 2**30:.1f} GiB, "
                f"outputs {mem.output_size_in_bytes / 2**30:.1f} GiB, "
                f"temporaries {mem.temp_size_in_bytes / 2**30:.1f} GiB)"
            )
        print(f"== {mode}{gib}\n{summary(reports)}\n{loops(text)}", flush=True)
        if a.around_sync:
            for r in reports:
                if r.sync:
                    name = r.sync[len(r.sync) // 2][0]
                    print(f"-- {r.computation}, around {name}:")
                    print(around_sync(text, r.computation, name))
                    break
    return 0


# ---------------------------------------------------------------------------------------------
# trace: per-GPU, per-stream reading of a profiler trace

TRACE_DOC = """Where a tensor-parallel decode step's time goes, per GPU and stream, from a
profiler trace.

`bench.py --profile DIR` traces one generate call per setting (`jax.profiler.trace(...,
create_perfetto_trace=True)`).  This reads such a trace and, for each GPU, over the decode
window (first to last decode-attention kernel, so prefill is left out):

    window      wall time of the window                       (ms per decode step)
    busy        union of the compute stream's kernel intervals (ms per step)
    idle        window - busy: the compute stream has nothing running
    idle@comm   the part of idle in gaps that end within `slack_us` after a collective kernel
                on another stream ends: the compute stream waiting for an all-reduce
    idle@comm+  gaps that end `slack_us`..`late_us` after one (a slow hand-off between the
                collective and compute streams, or a wait on something else)
    comm        collective kernels (NCCL) per step, their mean duration and their total time

    lead        launch lead: how long after the host's launch call (the CUDA API event with the
                same correlation id) each compute kernel started, median over the window, and
                the share of kernels that started within 10 us of it.  A GPU that waits for
                its host starts kernels right after their launch (lead near the launch latency,
                share near 1): the step is launch-bound; a host that runs ahead gives leads of
                hundreds of us.

Read against `desync` (no all-reduce): ladder's busy above desync's means its kernels ran
slower beside the collectives (contention); idle@comm means it waited for them."""

COMM_MARKERS = ("nccl", "allreduce", "all_reduce", "all-reduce")


def _is_comm(name: str) -> bool:
    low = name.lower()
    return any(m in low for m in COMM_MARKERS)


def _union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by [start, end) intervals (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def load_events(trace_dir: Path) -> list[dict]:
    """The events of the newest perfetto_trace.json.gz under trace_dir."""
    files = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    data = json.loads(gzip.open(files[-1]).read())
    return data["traceEvents"] if isinstance(data, dict) else data


def _correlation(e: dict) -> str | None:
    for k, v in e.get("args", {}).items():
        if "correlation" in k.lower():
            return str(v)
    return None


def _is_marker(name: str, marker: str) -> bool:
    # the decode kernel, not its chunk-merge kernel (one marker per layer and step)
    return marker in name and "merge" not in name


def launch_leads(events: list[dict], kernels: list[dict], gpu_pids: set) -> list[float]:
    """For each kernel with a correlation id, its start minus the start of the host event (a
    CUDA launch API call) with the same id, in us."""
    host = {}
    for e in events:
        if e.get("ph") == "X" and e.get("pid") not in gpu_pids:
            c = _correlation(e)
            if c is not None:
                host.setdefault(c, e["ts"])
    leads = []
    for e in kernels:
        c = _correlation(e)
        if c is not None and c in host:
            leads.append(e["ts"] - host[c])
    return leads


def summarize(
    events: list[dict],
    layers: int,
    marker: str = "jaxturbo_decode",
    slack_us: float = 3.0,
    late_us: float = 30.0,
) -> list[dict]:
    """One dict per GPU (see the module docstring); times in ms per step.  The window runs from
    the first marker kernel (one per layer and step) to the last: (markers - 1) / layers steps."""
    names = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    gpus = sorted(p for p, n in names.items() if "GPU" in n.upper())
    out = []
    for pid in gpus:
        kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") == pid and "dur" in e]
        marked = [e for e in kernels if _is_marker(e["name"], marker)]
        if len(marked) <= layers:
            continue
        steps = (len(marked) - 1) / layers
        lo = min(e["ts"] for e in marked)
        hi = max(e["ts"] + e["dur"] for e in marked)
        inside = [e for e in kernels if e["ts"] >= lo and e["ts"] + e["dur"] <= hi]
        comm = [e for e in inside if _is_comm(e["name"])]
        per_tid: dict = collections.defaultdict(float)
        for e in inside:
            if not _is_comm(e["name"]):
                per_tid[e["tid"]] += e["dur"]
        compute_tid = max(per_tid, key=per_tid.get)
        compute = sorted(
            (e["ts"], e["ts"] + e["dur"])
            for e in inside
            if e["tid"] == compute_tid and not _is_comm(e["name"])
        )
        busy = _union_length(compute)
        comm_ends = sorted(e["ts"] + e["dur"] for e in comm if e["tid"] != compute_tid)
        idle_comm, idle_late, prev_end, j = 0.0, 0.0, lo, 0
        for s, e in compute:
            if s > prev_end:  # a gap [prev_end, s): did a collective end just before s?
                while j < len(comm_ends) and comm_ends[j] < prev_end:
                    j += 1
                k = j
                while k < len(comm_ends) and comm_ends[k] <= s:
                    k += 1
                if k > j and s - comm_ends[k - 1] <= slack_us:
                    idle_comm += s - prev_end
                elif k > j and s - comm_ends[k - 1] <= late_us:
                    idle_late += s - prev_end
            prev_end = max(prev_end, e)
        window = hi - lo
        leads = sorted(
            launch_leads(events, [e for e in inside if e["tid"] == compute_tid], set(gpus))
        )
        lead_med = leads[len(leads) // 2] if leads else float("nan")
        lead_near = sum(x < 10.0 for x in leads) / len(leads) if leads else float("nan")
        out.append(
            dict(
                gpu=names[pid],
                window_ms=window / steps / 1e3,
                busy_ms=busy / steps / 1e3,
                idle_ms=(window - busy) / steps / 1e3,
                idle_at_comm_ms=idle_comm / steps / 1e3,
                idle_after_comm_ms=idle_late / steps / 1e3,
                comm_per_step=len(comm) / steps,
                comm_mean_us=(sum(e["dur"] for e in comm) / len(comm)) if comm else 0.0,
                comm_ms=sum(e["dur"] for e in comm) / steps / 1e3,
                kernels_per_step=len(compute) / steps,
                lead_median_us=lead_med,
                lead_under_10us=lead_near,
            )
        )
    return out


def trace_table(rows: list[dict]) -> str:
    head = (
        "| setting | GPU | window ms | busy ms | idle ms | idle@comm ms | comm/step | "
        "comm us (mean) | comm ms | kernels/step | lead us (median) | lead < 10 us | "
        "idle@comm+ ms |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['gpu']} | {r['window_ms']:.3f} | {r['busy_ms']:.3f} | "
            f"{r['idle_ms']:.3f} | {r['idle_at_comm_ms']:.3f} | {r['comm_per_step']:.1f} | "
            f"{r['comm_mean_us']:.1f} | {r['comm_ms']:.3f} | {r['kernels_per_step']:.1f} | "
            f"{r.get('lead_median_us', float('nan')):.1f} | "
            f"{r.get('lead_under_10us', float('nan')):.2f} | "
            f"{r.get('idle_after_comm_ms', float('nan')):.3f} |"
        )
    return "\n".join(lines)


def trace_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"{PROG} trace", description=TRACE_DOC, formatter_class=RAW)
    ap.add_argument("dirs", nargs="+", help="trace folders (one per setting)")
    ap.add_argument("--layers", type=int, default=32, help="marker kernels per decode step")
    ap.add_argument(
        "--marker",
        default="jaxturbo_decode",
        help="kernel-name part of the decode-attention kernel (one per layer and step)",
    )
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    rows = []
    for d in a.dirs:
        try:
            got = summarize(load_events(Path(d)), a.layers, a.marker)
        except FileNotFoundError as e:
            print(f"{d}: {e}", file=sys.stderr)
            continue
        rows += [dict(setting=Path(d).name, **r) for r in got]
    if not rows:
        print("no GPU kernels with the marker in any trace", file=sys.stderr)
        return 1
    print(trace_table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


COMMANDS = {"runs": runs_main, "schedule": schedule_main, "hlo": hlo_main, "trace": trace_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
