"""`jaxturbo export-hf`: write a model as an HF directory that transformers loads."""

from __future__ import annotations

import argparse

from jaxturbo.cli.common import add_model_arguments

NAME = "export-hf"
HELP = ("export a model (registry name, HF dir or GGUF) as an HF safetensors directory "
        "(a DeepSeek-V3 / MLA model as DeepSeek-V3 again)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="output directory (must not exist yet)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    from jaxturbo.bridge import export_hf, load_params, resolve_model

    src = resolve_model(args.model)
    cfg, params = load_params(src, dtype=None if args.dtype == "float32" else args.dtype)
    out = export_hf(params, cfg, args.out, tokenizer=src, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
