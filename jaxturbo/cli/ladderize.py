"""`jaxturbo ladderize`: convert a pretrained Llama to hybrid Ladder-Residual (same weights).

The last N layers read the residual stream one module late (Ladder-Residual, Zhang et al.
2025), which lets tensor parallelism overlap each all-reduce with the next module.  No weight
changes: without retraining, quality drops as N grows (experiments/ladder_conversion/NOTES.md).
Written as an HF directory that transformers loads with `trust_remote_code=True`
(jaxturbo.bridge.ladder_hf).
"""

from __future__ import annotations

import argparse

from jaxturbo.cli.common import add_model_arguments

NAME = "ladderize"
HELP = "convert a Llama to hybrid Ladder-Residual on its last N layers; write an HF directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--layers", type=int, required=True,
                   help="N: Ladder-Residual on the last N layers (0 .. number of layers)")
    p.add_argument("--out", required=True, help="output directory (must not exist yet)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from jaxturbo.bridge import load_hf, resolve_model
    from jaxturbo.bridge.ladder_hf import ladder_config, save_ladder_hf
    from jaxturbo.models.config import ModelConfig

    src = resolve_model(args.model)
    # the range check needs only config.json: fail before reading weights or drawing a bar
    ladder_config(ModelConfig.from_json(src / "config.json"), args.layers)
    with tqdm(total=3, desc="ladderize", unit="step") as bar:
        bar.set_postfix_str("load")
        cfg, params, _ = load_hf(src, dtype=None if args.dtype == "float32" else args.dtype)
        bar.update()
        bar.set_postfix_str("convert")
        cfg = ladder_config(cfg, args.layers)
        bar.update()
        bar.set_postfix_str("write")
        out = save_ladder_hf(params, cfg, args.out, tokenizer_src=src, overwrite=args.overwrite)
        bar.update()
    print(f"wrote {out} (Ladder-Residual on the last {cfg.ladder_layers} of "
          f"{cfg.num_hidden_layers} layers; load with trust_remote_code=True)")
    return 0
