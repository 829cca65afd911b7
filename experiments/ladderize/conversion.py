"""SmolLM2-135M converted to hybrid Ladder-Residual: WikiText-2 perplexity before and after healing.

For each N, the last N of the 30 layers become Ladder-Residual layers with the same weights
(`jaxturbo.convert.ladderize.ladderize`; what `jaxturbo ladderize --ladder-layers N` writes),
then the converted model is healed by KL distillation toward the unchanged model
(`ladderize.heal`; `jaxturbo ladderize --heal-steps S`).  Data: WikiText-2 validation
(`jaxturbo/data/wikitext-2/valid.txt`, tokenized whole without special tokens; no training
split is shipped, so its first part serves as the training part): the last `eval_tokens` tokens
are held out and scored in disjoint windows of `eval_window`; healing trains on consecutive
`heal_len` windows from the start of the tokens before them (`split_held_out`,
`heal_batches`), never on a scored token.  Both token ranges are in the output's header.  N = 0
is the unchanged model: it is its own teacher (KL 0, a zero gradient), so it is scored, not
healed.  Float32.

    python -m experiments.ladderize.conversion                  # --preset cpu: ~15 min here
    python -m experiments.ladderize.conversion --preset gpu --model SmolLM2.gguf   # one H200
    python -m experiments.ladderize.conversion --preset tiny --out /tmp/l    # a smoke run

The N values run in the preset's order (the GPU preset's coarse ones first); `--budget-s`
starts no N that the slowest one so far would carry past the budget, so a short call keeps a
spread of N.  The tables list N ascending.  `--heal-steps 0 --eval-at start` scores the first
`eval_tokens` tokens without healing (how results/ppl_smollm2-135m.md was measured: `--preset
cpu --heal-steps 0 --eval-at start --eval-tokens 8192 --eval-window 1024 --layers
0,1,2,4,6,8,12,15,30`).  Writes OUT.{json,md,png} (OUT a path stem, default
experiments/ladderize/results/heal_smollm2_<preset>); the JSON is rewritten after every N, so
a run cut short keeps the finished rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np

from experiments.bench_util import device_name, write_table
from jaxturbo.bridge import load_model
from jaxturbo.convert.ladderize import heal, heal_batches, ladderize, split_held_out
from jaxturbo.data import WIKITEXT2_VALID
from jaxturbo.inference.scoring import perplexity

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Preset:
    layers: tuple[int, ...]
    heal_steps: int
    heal_batch: int
    heal_len: int
    heal_lr: float
    eval_tokens: int
    eval_window: int


PRESETS = {
    # a shared 2-core CPU in ~15 min (with --budget-s 840): 4 healed N x (compile + 40 steps
    # of 32 tokens + 2 scorings of 1024 tokens); N = 16 last, the first to go over budget
    "cpu": Preset(
        (0, 8, 30, 4, 16),
        heal_steps=40,
        heal_batch=1,
        heal_len=32,
        heal_lr=3e-4,
        eval_tokens=1024,
        eval_window=512,
    ),
    # one H200 in ~150 s (--budget-s): compile + 100 steps of 8 x 512 tokens per healed N,
    # coarse N first so that a cut run still spans 0..30
    "gpu": Preset(
        (0, 8, 30, 4, 16, 2, 12, 24, 1, 6, 10, 20),
        heal_steps=100,
        heal_batch=8,
        heal_len=512,
        heal_lr=3e-4,
        eval_tokens=16384,
        eval_window=1024,
    ),
    "tiny": Preset(
        (0, 30),
        heal_steps=2,
        heal_batch=1,
        heal_len=32,
        heal_lr=2e-4,
        eval_tokens=64,
        eval_window=32,
    ),
}
COLUMNS = [
    "ladder_layers",
    "ppl_converted",
    "x_converted",
    "ppl_healed",
    "x_healed",
    "gap_closed",
    "kl_first",
    "kl_last",
    "heal_seconds",
    "step_s",
]


def gap_closed(base: float, converted: float, healed: float) -> float:
    """Fraction of the conversion's log-perplexity loss that healing won back (1: all of it)."""
    lost = math.log(converted) - math.log(base)
    return (math.log(converted) - math.log(healed)) / lost if lost > 0 else float("nan")


def plot(rows: list[dict], base: float, path: Path, n_layers: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    n = [r["ladder_layers"] for r in rows]
    ax.plot(n, [r["ppl_converted"] for r in rows], marker="o", label="converted, no training")
    healed = [r for r in rows if r.get("ppl_healed") is not None]
    if healed:
        ax.plot(
            [r["ladder_layers"] for r in healed],
            [r["ppl_healed"] for r in healed],
            marker="s",
            label="after healing",
        )
    ax.axhline(base, color="grey", ls="--", lw=1, label="unchanged model")
    ax.set_yscale("log")
    ax.set_xlabel(f"ladder layers N (last N of {n_layers})")
    ax.set_ylabel("held-out WikiText-2 perplexity (log)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.ladderize.conversion",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(WIKITEXT2_VALID))
    p.add_argument("--layers", help="comma-separated N values (default: the preset's)")
    for name in ("heal_steps", "heal_batch", "heal_len", "eval_tokens", "eval_window"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help="default: the preset's")
    p.add_argument("--heal-lr", type=float, help="default: the preset's")
    p.add_argument(
        "--eval-at",
        choices=("end", "start"),
        default="end",
        help="score the last eval_tokens tokens (held out from healing), or the first "
        "ones (--heal-steps 0 only)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-time budget in seconds: start no N that the slowest finished one "
        "would carry past it (default: none)",
    )
    p.add_argument(
        "--out",
        help="path stem of the .json/.md/.png (default "
        "experiments/ladderize/results/heal_smollm2_<preset>)",
    )
    args = p.parse_args(argv)
    fields = ("heal_steps", "heal_batch", "heal_len", "heal_lr", "eval_tokens", "eval_window")
    pr = dataclasses.replace(
        PRESETS[args.preset],
        **{k: getattr(args, k) for k in fields if getattr(args, k) is not None},
    )
    if args.layers:
        pr = dataclasses.replace(pr, layers=tuple(int(s) for s in args.layers.split(",")))
    if args.eval_at == "start" and pr.heal_steps:
        p.error("--eval-at start scores tokens healing would train on; use it with --heal-steps 0")
    out = Path(args.out) if args.out else RESULTS / f"heal_smollm2_{args.preset}"

    t0 = time.perf_counter()
    cfg, params, tok = load_model(args.model)
    params = jax.tree.map(np.asarray, params)
    ids = np.asarray(
        tok.encode(Path(args.data).read_text(encoding="utf-8"), add_special_tokens=False), np.int32
    )
    if args.eval_at == "start":
        eval_ids, train_ids = ids[: pr.eval_tokens], ids[pr.eval_tokens :]
    else:
        train_ids, eval_ids = split_held_out(ids, pr.eval_tokens)
    hb = heal_batches(train_ids, pr.heal_steps, pr.heal_batch, pr.heal_len) if pr.heal_steps else []

    def score(prm, c) -> float:
        return perplexity(
            prm, c, eval_ids, window=pr.eval_window, batch_size=2, attn_impl="xla"
        ).perplexity

    base = score(params, cfg)
    print(f"unchanged model: ppl {base:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    heal_tokens = sum(b.size for b in hb)
    eval_range = [0, len(eval_ids)] if args.eval_at == "start" else [len(train_ids), len(ids)]
    scored = (
        f"first {len(eval_ids)} tokens"
        if args.eval_at == "start"
        else f"last {len(eval_ids)} tokens (held out from healing)"
    )
    meta = {
        "model": Path(args.model).name,
        "layers": cfg.num_hidden_layers,
        "preset": args.preset,
        "data": f"WikiText-2 valid ({Path(args.data).name}), {len(ids)} tokens",
        "scored": f"{scored}, tokens [{eval_range[0]}, {eval_range[1]}), disjoint windows "
        f"of {pr.eval_window}",
        "ppl_unchanged": base,
        "heal": (
            f"{pr.heal_steps} steps x {pr.heal_batch} x {pr.heal_len} tokens, KL toward "
            f"the unchanged model, AdamW peak lr {pr.heal_lr}, warm-up "
            f"{max(1, pr.heal_steps // 10)}, cosine, no weight decay"
            if pr.heal_steps
            else "none"
        ),
        "trained": (
            f"tokens [0, {heal_tokens}) of the file, every position (cycled when "
            "the steps need more)"
            if pr.heal_steps
            else "none"
        ),
        "dtype": "float32",
        "device": device_name(),
        "jax": jax.__version__,
    }
    rows: list[dict] = []
    curves: dict[int, list[float]] = {}

    skipped: list[int] = []

    def save() -> str:
        ordered = sorted(rows, key=lambda r: r["ladder_layers"])
        extra = {"seconds": round(time.perf_counter() - t0)}
        if skipped:
            extra["skipped"] = f"N = {', '.join(map(str, skipped))} (over --budget-s)"
        md = write_table(
            ordered,
            COLUMNS,
            out,
            "SmolLM2-135M hybrid Ladder-Residual: perplexity before and after healing",
            {**meta, **extra},
        )
        data = json.loads(Path(f"{out}.json").read_text())
        data["kl_curves"] = {str(k): v for k, v in sorted(curves.items())}
        Path(f"{out}.json").write_text(json.dumps(data, indent=2))
        plot(
            ordered,
            base,
            Path(f"{out}.png"),
            cfg.num_hidden_layers,
            f"SmolLM2-135M, last N layers Ladder-Residual; heal: {pr.heal_steps} steps x "
            f"{pr.heal_batch} x {pr.heal_len} tokens",
        )
        return md

    slowest = 0.0
    for n in pr.layers:
        if (
            args.budget_s is not None
            and slowest
            and time.perf_counter() - t0 + slowest > args.budget_s
        ):
            skipped.append(n)
            print(
                f"N={n:3d}  skipped: the slowest N took {slowest:.0f} s, the budget of "
                f"{args.budget_s:.0f} s would be passed",
                flush=True,
            )
            continue
        lcfg = ladderize(params, cfg, n)
        row: dict = {"ladder_layers": n}
        t1 = time.perf_counter()
        if n == 0 or not pr.heal_steps:
            # N = 0 is the teacher itself: nothing to heal
            row["ppl_converted"] = base if n == 0 else score(params, lcfg)
            if n == 0 and pr.heal_steps:
                row["ppl_healed"] = base
        else:
            res = heal(
                params,
                lcfg,
                cfg,
                hb,
                steps=pr.heal_steps,
                lr=pr.heal_lr,
                evaluate=lambda prm, step: {"perplexity": score(prm, lcfg)},
            )
            row["ppl_converted"] = res.evals[0]["perplexity"]
            row["ppl_healed"] = res.evals[-1]["perplexity"]
            row["kl_first"], row["kl_last"] = res.history[0]["loss"], res.history[-1]["loss"]
            # all steps with the first one's compilation; the median step without it
            times = [h["step_time_s"] for h in res.history]
            row["heal_seconds"] = round(sum(times), 1)
            row["step_s"] = float(np.median(times[1:] or times))
            curves[n] = [round(h["loss"], 5) for h in res.history]
        row["x_converted"] = row["ppl_converted"] / base
        if row.get("ppl_healed") is not None:
            row["x_healed"] = row["ppl_healed"] / base
            if n:
                row["gap_closed"] = gap_closed(base, row["ppl_converted"], row["ppl_healed"])
        rows.append(row)
        slowest = max(slowest, time.perf_counter() - t1)
        print(
            f"N={n:3d}  converted {row['ppl_converted']:10.3f}"
            + (f"  healed {row['ppl_healed']:10.3f}" if "ppl_healed" in row else "")
            + f"  ({time.perf_counter() - t1:.0f} s)",
            flush=True,
        )
        md = save()
    if skipped:
        md = save()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
