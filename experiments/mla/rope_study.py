"""Where the training-free loss comes from: the RoPE selection, at budget 1.0 and 0.5.

care-uniform on SmolLM2-135M-Instruct with {geometric, free} layouts x {energy, rotation}
criteria (the same calibration and evaluation tokens as experiments.mla.conversion's full
preset).  Writes OUT.{json,md} after every row (OUT a path stem, default
experiments/mla/results/rope_study; its table is kept in experiments/mla/RESULTS.md).  CPU, ~10 minutes:

  python -m experiments.mla.rope_study
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from jaxturbo.bridge import load_model
from jaxturbo.convert.mla.calibrate import attention_input_covariance, calibration_batches
from jaxturbo.convert.mla.convert import convert_to_mla
from jaxturbo.convert.mla.evaluate import mla_perplexity
from jaxturbo.data import WIKITEXT2_VALID


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.mla.rope_study", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results" / "rope_study"),
        help="path stem of the .json/.md (default experiments/mla/results/rope_study)",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg, params, tok = load_model(args.model, progress=False)
    params = jax.tree.map(np.asarray, params)
    ids = np.asarray(tok.encode(WIKITEXT2_VALID.read_text(), add_special_tokens=False), np.int32)
    eval_ids = ids[-8 * 512 :]
    cov = attention_input_covariance(params, cfg, calibration_batches(ids, 32, 256))
    rows = []
    for budget in (1.0, 0.5):
        for layout, crit in (
            ("geometric", "energy"),
            ("geometric", "rotation"),
            ("free", "rotation"),
        ):
            res = convert_to_mla(
                params,
                cfg,
                cov,
                method="care",
                kv_budget=budget,
                rope_layout=layout,
                rope_criterion=crit,
                context=512,
            )
            ppl = mla_perplexity(res.params, res.cfg, eval_ids, window=512).perplexity
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


if __name__ == "__main__":
    main()
