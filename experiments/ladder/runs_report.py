"""Ladder-vs-standard ratios run by run, from a rows JSON (`bench.py` rows, with `call`, `run`,
`host` and `note` added where several calls are merged), as a table and a plot.

One bench process measures standard, ladder and desync back to back; a *run* is that triple.
Between processes on the same host, standard's tokens/s moved by up to 7% (the same
executable), so one run's ratio is not the layout's ratio: this groups rows into runs, prints
every run's ratio and each layout's median, and plots them against the bar.

    python -m experiments.ladder.runs_report experiments/ladder/results/runs_h100x4.json \
        --bar 1.28 --png runs.png

`--grid` instead reads one or more rows files and prints the benchmark grid (TP x batch x P2P)
for one XLA flag set and layout, each cell from the latest round of runs (the rows' `session`
number) that measured both standard and ladder there (medians over that round's runs):

    python -m experiments.ladder.runs_report --grid experiments/ladder/results/runs_h100x4.json

A rows file is a JSON list of rows, or an object whose "rows" is that list.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

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


def table(runs: list[dict]) -> str:
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    text = table(runs)
    print(text)
    if a.md:
        a.md.write_text(text + "\n")
    if a.png:
        r0 = rows[0]
        plot(runs, a.png, a.bar, f"{r0['preset']}, TP {r0['tp']}, batch 1, {r0['device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
