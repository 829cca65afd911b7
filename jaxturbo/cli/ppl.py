"""`jaxturbo ppl`: sliding-window perplexity of a model on a text file."""

from __future__ import annotations

import argparse

import numpy as np
from tqdm import tqdm

from jaxturbo.cli.common import (
    add_mesh_argument,
    add_model_arguments,
    read_text_file,
    tensor_parallel_setup,
)
from jaxturbo.errors import UserError

NAME = "ppl"
HELP = "perplexity of a model on a text file (sliding windows), ends with 'perplexity: <float>'"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_mesh_argument(p)
    p.add_argument("--data", required=True, help="UTF-8 text file")
    p.add_argument("--window", type=int, default=1024, help="tokens per window")
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens between window starts (default: window, i.e. disjoint windows)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="score only the first N tokens of the file (default: all)",
    )
    p.add_argument("--windows-per-batch", type=int, default=4, help="windows per forward pass")


def run(args: argparse.Namespace) -> int:
    from jaxturbo.bridge import load_model
    from jaxturbo.inference import perplexity, window_plan
    from jaxturbo.models.dispatch import check_mesh_supported
    from jaxturbo.parallel.tensor import TensorParallel

    text = read_text_file(args.data)
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UserError(f"--max-tokens {args.max_tokens} must be >= 2")
    if args.windows_per_batch < 1:
        raise UserError(f"--windows-per-batch {args.windows_per_batch} must be >= 1")
    cfg, params, tokenizer = load_model(args.model, dtype=args.dtype)
    check_mesh_supported(cfg, args.mesh)  # MLA: one device only
    params, mesh = tensor_parallel_setup(args.mesh, cfg, params, args.windows_per_batch)
    if args.window > cfg.max_position_embeddings:
        raise UserError(
            f"--window {args.window} is larger than the model's context of "
            f"{cfg.max_position_embeddings} tokens; choose a window <= "
            f"{cfg.max_position_embeddings}"
        )
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    stride = args.window if args.stride is None else args.stride
    n_windows = len(window_plan(len(ids), args.window, stride)) if 1 <= stride else 0
    with tqdm(total=n_windows, desc="perplexity", unit="window") as bar:
        res = perplexity(
            params,
            cfg,
            ids,
            window=args.window,
            stride=stride,
            batch_size=args.windows_per_batch,
            progress=bar.update,
            model_fn=None if mesh is None else TensorParallel(mesh),
        )
    print(f"tokens scored: {res.tokens_scored} in {res.windows} windows of {args.window}")
    print(f"perplexity: {res.perplexity:.4f}")
    return 0
