"""WikiText-2 perplexity of SmolLM2-135M converted to Ladder-Residual without retraining.

`hybrid` with N ladder layers = Ladder-Residual on the last N of the 30 layers, same weights
(`jaxturbo.bridge.ladder_hf.ladder_config`; what `jaxturbo ladderize` writes).  N = 0 is the
unchanged model.  Scored on the first `--windows` disjoint windows of `--window` tokens of
WikiText-2 valid (`jaxturbo/data/wikitext-2/valid.txt`, tokenized whole without special tokens),
float32 on CPU.  Writes `results.json`, `results.md` and `perplexity.png` to `--out`.

    python experiments/ladder_conversion.py                   # N in 0,4,8,15,30; 8 x 1024 tokens
    python experiments/ladder_conversion.py --layers 0,30 --windows 2 --window 256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import device_name, write_table  # noqa: E402

from jaxturbo.bridge import load_model  # noqa: E402
from jaxturbo.bridge.ladder_hf import ladder_config  # noqa: E402
from jaxturbo.inference.perplexity import perplexity  # noqa: E402
from jaxturbo.data import WIKITEXT2_VALID  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = WIKITEXT2_VALID


def _plot(rows: list[dict], path: Path, n_layers: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["ladder_layers"] for r in rows], [r["perplexity"] for r in rows], marker="o")
    ax.set_yscale("log")
    ax.set_xlabel(f"ladder layers N (last N of {n_layers})")
    ax.set_ylabel("WikiText-2 valid perplexity (log)")
    ax.set_title("SmolLM2-135M, hybrid Ladder-Residual, no retraining")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="0,4,8,15,30", help="comma-separated N values")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--windows", type=int, default=8, help="disjoint windows scored")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "experiments" / "ladder_conversion"))
    args = p.parse_args(argv)

    cfg, params, tok = load_model(args.model)
    ids = np.asarray(tok.encode(DATA.read_text(encoding="utf-8"), add_special_tokens=False), np.int32)
    ids = ids[: args.window * args.windows]
    rows = []
    for n in [int(s) for s in args.layers.split(",")]:
        t0 = time.perf_counter()
        res = perplexity(params, ladder_config(cfg, n), ids, window=args.window,
                         batch_size=args.batch_size)
        rows.append({"ladder_layers": n, "perplexity": res.perplexity, "nll": res.nll,
                     "tokens_scored": res.tokens_scored, "seconds": time.perf_counter() - t0})
        print(f"N={n:3d}  ppl={res.perplexity:10.3f}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    base = next((r["perplexity"] for r in rows if r["ladder_layers"] == 0), None)
    if base is not None:  # without an N=0 row the column stays empty
        for r in rows:
            r["vs_N0"] = r["perplexity"] / base

    out = Path(args.out)
    meta = {"model": args.model, "layers": cfg.num_hidden_layers,
            "data": "WikiText-2 valid (jaxturbo/data/wikitext-2/valid.txt)",
            "tokens": f"first {len(ids)} tokens = {args.windows} disjoint windows of {args.window}",
            "dtype": "float32", "device": device_name(), "jax": jax.__version__}
    md = write_table(rows, ["ladder_layers", "perplexity", "vs_N0", "nll", "tokens_scored", "seconds"],
                     out / "results", "SmolLM2 hybrid Ladder-Residual conversion, no retraining", meta)
    _plot(rows, out / "perplexity.png", cfg.num_hidden_layers)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
