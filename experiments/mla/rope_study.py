"""Where the training-free loss comes from: the RoPE selection, at budget 1.0 and 0.5.

care-uniform on SmolLM2 with {geometric, free} layouts x {energy, rotation} criteria (same
calibration and evaluation tokens as experiments/mla_conversion.py).  Writes rope_study.json/md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from jaxturbo.bridge import load_model  # noqa: E402
from jaxturbo.convert.mla.calibrate import attention_input_covariance, calibration_batches  # noqa: E402
from jaxturbo.convert.mla.convert import convert_to_mla  # noqa: E402
from jaxturbo.convert.mla.evaluate import mla_perplexity  # noqa: E402
from jaxturbo.data import WIKITEXT2_VALID  # noqa: E402


def main() -> None:
    cfg, params, tok = load_model("smollm2-135m", progress=False)
    params = jax.tree.map(np.asarray, params)
    ids = np.asarray(tok.encode(WIKITEXT2_VALID.read_text(),
                                add_special_tokens=False), np.int32)
    eval_ids = ids[-8 * 512:]
    cov = attention_input_covariance(params, cfg, calibration_batches(ids, 32, 256))
    rows = []
    for budget in (1.0, 0.5):
        for layout, crit in (("geometric", "energy"), ("geometric", "rotation"), ("free", "rotation")):
            res = convert_to_mla(params, cfg, cov, method="care", kv_budget=budget,
                                 rope_layout=layout, rope_criterion=crit, context=512)
            ppl = mla_perplexity(res.params, res.cfg, eval_ids, window=512).perplexity
            rows.append({"budget": budget, "layout": layout, "criterion": crit, "ppl": ppl,
                         "rope_freq_index": res.rope_freq_index})
            print(rows[-1], flush=True)
            out = ROOT / "experiments/mla"
            (out / "rope_study.json").write_text(json.dumps(rows, indent=1))
            md = ["| budget | layout | criterion | ppl | kept frequencies |", "|---:|---|---|---:|---|"]
            md += [f"| {r['budget']} | {r['layout']} | {r['criterion']} | {r['ppl']:.2f} | "
                   f"{r['rope_freq_index']} |" for r in rows]
            (out / "rope_study.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
