"""Where a tensor-parallel decode step's time goes, per GPU and stream, from a profiler trace.

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
slower beside the collectives (contention); idle@comm means it waited for them.

    python -m experiments.ladder.trace_streams DIR/ladder_tp2_b1 DIR/desync_tp2_b1 --layers 32
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
from pathlib import Path

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


def table(rows: list[dict]) -> str:
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
