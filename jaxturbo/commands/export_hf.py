"""`jaxturbo export-hf`: write a model as an HF directory that transformers loads."""

from __future__ import annotations

import argparse

from jaxturbo.commands._common import add_model_arguments

NAME = "export-hf"
HELP = "export a model (registry name, HF dir, GGUF, checkpoint) as an HF safetensors directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")


def run(args: argparse.Namespace) -> int:
    from jaxturbo.bridge import export_hf

    out = export_hf(args.model, args.out, dtype=args.dtype)
    print(f"wrote {out}")
    return 0
