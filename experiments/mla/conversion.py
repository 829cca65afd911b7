"""GQA -> MLA conversion on SmolLM2-135M-Instruct: WikiText-2 perplexity by method and KV budget.

    python -m experiments.mla.conversion                      # the table (CPU: ~15 min)
    python -m experiments.mla.conversion --heal-steps 40      # plus healed care-adjusted @ 0.5
    python -m experiments.mla.conversion --preset tiny        # seconds, for a smoke run
    python -m experiments.mla.conversion --rope-study         # which RoPE pairs to keep (CPU: ~10 min)

Training-free rows: {svd-joint, svd, care-uniform, care-adjusted} x budget {1.0, 0.75, 0.5, 0.25}
(budget = (latent + rope key) / original 2*K*hd = 384 values per token per layer).
Calibration: the first N x L tokens of WikiText-2 valid; evaluation: the last W windows of
`window` tokens of the same file (disjoint from the calibration tokens).
Writes OUT.{json,md} and OUT.png (perplexity against budget); OUT is a path stem, default
experiments/mla/results/conversion_<preset>.  `--rope-criterion energy` reproduces the RoPE pair
choice the RESULTS.md levers table rejects.

`--rope-study` asks where the training-free loss comes from instead: care-uniform with the RoPE
key's {geometric, free} layout x {energy, rotation} pair criterion at budgets 1.0 and 0.5 (the
same calibration and evaluation tokens); it writes OUT.{json,md}, OUT default
experiments/mla/results/rope_study_<preset> (the table is kept in experiments/mla/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from jaxturbo.bridge import load_model
from jaxturbo.convert.mla.calibrate import attention_input_covariance, calibration_batches
from jaxturbo.convert.mla.convert import convert_to_mla
from jaxturbo.convert.mla.evaluate import mla_perplexity
from jaxturbo.data import WIKITEXT2_VALID
from jaxturbo.inference.scoring import perplexity

RESULTS = Path(__file__).resolve().parent / "results"

ROWS = [
    ("svd-joint", "svd-joint", "uniform"),
    ("svd", "svd", "uniform"),
    ("care-uniform", "care", "uniform"),
    ("care-adjusted", "care", "adjusted"),
]
PRESETS = {
    "full": dict(
        budgets=(1.0, 0.75, 0.5, 0.25), calib_samples=32, calib_len=256, eval_windows=8, window=512
    ),
    "tiny": dict(budgets=(0.5,), calib_samples=4, calib_len=64, eval_windows=1, window=128),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.mla.conversion",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(WIKITEXT2_VALID))
    ap.add_argument("--alpha", type=float, default=0.01, help="covariance shrinkage")
    ap.add_argument("--rope-criterion", choices=("energy", "rotation"), default="rotation")
    ap.add_argument("--heal-steps", type=int, default=0)
    ap.add_argument("--heal-batch", type=int, default=4)
    ap.add_argument("--heal-len", type=int, default=256)
    ap.add_argument("--heal-lr", type=float, default=1e-4)
    ap.add_argument(
        "--heal-eval-every",
        type=int,
        default=0,
        help="perplexity of the healing model every N steps (0: at the end only)",
    )
    ap.add_argument(
        "--rows", nargs="*", choices=[r[0] for r in ROWS], help="only these methods (default: all)"
    )
    ap.add_argument("--budgets", nargs="*", type=float, help="override the preset's budgets")
    ap.add_argument(
        "--rope-study",
        action="store_true",
        help="the RoPE layout x pair-criterion study (care-uniform) instead of the method table",
    )
    ap.add_argument(
        "--out",
        help="path stem of the .json/.md/.png (default "
        "experiments/mla/results/conversion_<preset>)",
    )
    args = ap.parse_args(argv)
    pr = PRESETS[args.preset]
    stem = "rope_study" if args.rope_study else "conversion"
    out = Path(args.out) if args.out else RESULTS / f"{stem}_{args.preset}"
    out.parent.mkdir(parents=True, exist_ok=True)

    cfg, params, tok = load_model(args.model, progress=False)
    params = jax.tree.map(np.asarray, params)  # the conversion works on host arrays
    ids = np.asarray(tok.encode(Path(args.data).read_text(), add_special_tokens=False), np.int32)
    n_eval = pr["eval_windows"] * pr["window"]
    eval_ids = ids[-n_eval:]
    calib = calibration_batches(ids, pr["calib_samples"], pr["calib_len"])
    assert pr["calib_samples"] * pr["calib_len"] <= len(ids) - n_eval, "calibration overlaps eval"
    meta = {
        "model": args.model,
        "data": Path(args.data).name,
        "tokens_in_file": int(len(ids)),
        "calibration": f"first {pr['calib_samples']} x {pr['calib_len']} tokens",
        "evaluation": f"last {pr['eval_windows']} disjoint windows of {pr['window']} tokens",
        "alpha": args.alpha,
        "rope_dim": cfg.head_dim // 2,
        "rope_layout": "geometric",
        "rope_criterion": args.rope_criterion,
        "kv_values_per_token_per_layer_original": 2 * cfg.num_key_value_heads * cfg.head_dim,
    }
    results: dict = {"meta": meta, "rows": []}

    def save() -> None:
        Path(f"{out}.json").write_text(json.dumps(results, indent=1))
        write_markdown(results, Path(f"{out}.md"))
        if results["rows"]:
            plot(results, Path(f"{out}.png"))

    t0 = time.time()
    base = perplexity(params, cfg, eval_ids, window=pr["window"], batch_size=4, attn_impl="xla")
    results["gqa_ppl"] = base.perplexity
    print(f"GQA original: ppl {base.perplexity:.3f} ({time.time() - t0:.0f}s)", flush=True)
    t0 = time.time()
    cov = attention_input_covariance(params, cfg, calib)
    print(f"calibration: {time.time() - t0:.0f}s", flush=True)
    meta["calibration_seconds"] = round(time.time() - t0, 1)
    if args.rope_study:
        rope_study(
            params, cfg, cov, eval_ids, pr["window"], args.budgets or (1.0, 0.5), args.alpha, out
        )
        return

    keep = {}
    rows = [r for r in ROWS if not args.rows or r[0] in args.rows]
    for budget in args.budgets or pr["budgets"]:
        for name, method, ranks in rows:
            t0 = time.time()
            res = convert_to_mla(
                params,
                cfg,
                cov,
                method=method,
                ranks=ranks,
                kv_budget=budget,
                alpha=args.alpha,
                rope_criterion=args.rope_criterion,
                context=pr["window"],
            )
            ppl = mla_perplexity(res.params, res.cfg, eval_ids, window=pr["window"]).perplexity
            row = {
                **res.summary(),
                "method": name,
                "factorisation": method,
                "budget": budget,
                "ppl": ppl,
                "seconds": round(time.time() - t0, 1),
            }
            results["rows"].append(row)
            print(
                f"{name:14s} budget {budget:.2f}: ppl {ppl:9.3f}  R={res.cfg.kv_lora_rank} "
                f"({row['seconds']}s)",
                flush=True,
            )
            save()
            if name == "care-adjusted" and budget == 0.5:
                keep = {"res": res}

    if args.heal_steps > 0 and keep:
        from jaxturbo.convert.mla.heal import heal

        res = keep["res"]
        hb = heal_batches(ids[:-n_eval], args.heal_batch, args.heal_len, seed=0)
        curve: list[dict] = []

        def eval_point(step: int, p) -> None:
            curve.append(
                {
                    "step": step,
                    "ppl": mla_perplexity(p, res.cfg, eval_ids, window=pr["window"]).perplexity,
                }
            )
            print(f"  heal step {step}: ppl {curve[-1]['ppl']:.3f}", flush=True)

        def progress(m: dict) -> None:
            if m["step"] % 50 == 0 or m["step"] <= 5:
                print(f"  heal step {m['step']}: kl {m['kl']:.4f}", flush=True)

        t0 = time.time()
        healed = heal(
            res.params,
            res.cfg,
            params,
            cfg,
            hb,
            steps=args.heal_steps,
            lr=args.heal_lr,
            progress=progress,
            every=args.heal_eval_every,
            on_every=eval_point,
        )
        ppl = mla_perplexity(healed, res.cfg, eval_ids, window=pr["window"]).perplexity
        curve.append({"step": args.heal_steps, "ppl": ppl})
        results["healed"] = {
            "method": "care-adjusted",
            "budget": 0.5,
            "ppl": ppl,
            "heal_steps": args.heal_steps,
            "lr": args.heal_lr,
            "heal_tokens": args.heal_steps * args.heal_batch * args.heal_len,
            "heal_data": f"WikiText-2 valid without the evaluation windows: "
            f"{len(hb) * args.heal_batch} shuffled windows of "
            f"{args.heal_len} tokens, cycled",
            "curve": curve,
            "device": jax.devices()[0].device_kind,
            "seconds": round(time.time() - t0, 1),
        }
        print(f"healed care-adjusted @0.5: ppl {ppl:.3f}", flush=True)
        save()
    save()


ROPE_CHOICES = (("geometric", "energy"), ("geometric", "rotation"), ("free", "rotation"))


def rope_study(params, cfg, cov, eval_ids, window, budgets, alpha, out: Path) -> list[dict]:
    """care-uniform at each budget with each RoPE (layout, criterion) of ROPE_CHOICES: the
    perplexity and the frequency pairs kept.  Writes OUT.{json,md} after every row."""
    rows: list[dict] = []
    for budget in budgets:
        for layout, crit in ROPE_CHOICES:
            res = convert_to_mla(
                params,
                cfg,
                cov,
                method="care",
                kv_budget=budget,
                alpha=alpha,
                rope_layout=layout,
                rope_criterion=crit,
                context=window,
            )
            ppl = mla_perplexity(res.params, res.cfg, eval_ids, window=window).perplexity
            rows.append(
                {
                    "budget": budget,
                    "layout": layout,
                    "criterion": crit,
                    "ppl": ppl,
                    "rope_freq_index": res.rope_freq_index,
                }
            )
            print(rows[-1], flush=True)
            Path(f"{out}.json").write_text(json.dumps(rows, indent=1))
            md = [
                "| budget | layout | criterion | ppl | kept frequencies |",
                "|---:|---|---|---:|---|",
            ]
            md += [
                f"| {r['budget']} | {r['layout']} | {r['criterion']} | {r['ppl']:.2f} | "
                f"{r['rope_freq_index']} |"
                for r in rows
            ]
            Path(f"{out}.md").write_text("\n".join(md) + "\n")
    return rows


def heal_batches(ids: np.ndarray, batch: int, length: int, seed: int) -> list[np.ndarray]:
    """Every disjoint `length`-token window of `ids`, shuffled once, in batches of `batch`."""
    n = (len(ids) // length // batch) * batch
    windows = np.asarray(ids[: n * length], np.int32).reshape(n, length)
    windows = windows[np.random.default_rng(seed).permutation(n)]
    return [windows[i : i + batch] for i in range(0, n, batch)]


def write_markdown(results: dict, path: Path) -> None:
    m = results["meta"]
    budgets = sorted({r["budget"] for r in results["rows"]}, reverse=True)
    lines = [
        f"# MLA conversion of {m['model']}: WikiText-2 perplexity",
        "",
        f"Calibration: {m['calibration']}; evaluation: {m['evaluation']} of {m['data']} "
        f"({m['tokens_in_file']} tokens). Shrinkage alpha={m['alpha']}, rope dim "
        f"{m['rope_dim']} ({m['rope_layout']}, criterion {m.get('rope_criterion', 'energy')}). Budget 1.0 = "
        f"{m['kv_values_per_token_per_layer_original']} values/token/layer "
        "(latent + rope key). Training-free unless stated.",
        "",
        f"GQA original: **{results.get('gqa_ppl', float('nan')):.3f}**",
        "",
        "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for name, _, _ in ROWS:
        cells = []
        for b in budgets:
            r = [x for x in results["rows"] if x["method"] == name and x["budget"] == b]
            cells.append(f"{r[0]['ppl']:.2f}" if r else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "healed" in results:
        h = results["healed"]
        lines += [
            "",
            f"Healed {h['method']} @ {h['budget']}: **{h['ppl']:.3f}** after "
            f"{h['heal_steps']} steps = {h['heal_tokens']} tokens of KL distillation "
            f"({h['heal_data']}).",
        ]
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, _, _ in ROWS:
        rs = sorted((r for r in results["rows"] if r["method"] == name), key=lambda r: r["budget"])
        ax.plot([r["budget"] for r in rs], [r["ppl"] for r in rs], marker="o", label=name)
    ax.axhline(results["gqa_ppl"], color="k", ls="--", label="GQA original")
    if "healed" in results:
        ax.scatter(
            [results["healed"]["budget"]],
            [results["healed"]["ppl"]],
            marker="*",
            s=120,
            color="k",
            label="care-adjusted, healed",
            zorder=5,
        )
    ax.set_yscale("log")
    ax.set_xlabel("KV budget (fraction of GQA cache)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
