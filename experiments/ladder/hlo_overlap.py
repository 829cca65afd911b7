"""Read a compiled (scheduled) HLO module and report whether its all-reduces overlap compute.

In a scheduled module the instruction order of each computation is the execution order.  An
async all-reduce is an `all-reduce-start` / `all-reduce-done` pair; the compute kernels that sit
between the two run while the collective is in flight.  A synchronous `all-reduce` overlaps
nothing.  A tuple all-reduce with several operands means XLA combined independent reductions,
which in `ladder` makes the attention all-reduce wait for the MLP (no overlap left to win).

    python -m experiments.ladder.hlo_overlap runs/hlo/decode_8b_ladder_tp2_b1_p2p.hlo.txt [--excerpt]
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
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
        m = _COMPUTATION.match(line)
        if m:
            comp, order = m.group(1), []
            continue
        if line.startswith("}") and comp is not None:
            rep = _pairs(comp, order)
            if rep.sync or rep.pairs:
                reports.append(rep)
            comp = None
            continue
        im = _INSTR.match(line)
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
        if _COMPUTATION.match(l) and _COMPUTATION.match(l).group(1) == computation
    )
    i = next(k for k in range(start, len(lines)) if re.search(rf"%{re.escape(name)} = ", lines[k]))
    return "\n".join(
        re.sub(r", metadata=\{.*", "", l)[:200]
        for l in lines[max(0, i - context) : i + context + 1]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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


if __name__ == "__main__":
    sys.exit(main())
