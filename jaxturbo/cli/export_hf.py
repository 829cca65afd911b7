"""`jaxturbo export-hf`: write a model, or a training checkpoint, as an HF directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxturbo.cli.common import DTYPES
from jaxturbo.errors import UserError

NAME = "export-hf"
HELP = (
    "export a model (registry name, HF dir or GGUF; a DeepSeek-V3 / MLA model as DeepSeek-V3 "
    "again) or an sft/rl checkpoint as an HF safetensors directory"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="registry name (e.g. smollm2-135m), HF directory, or .gguf file to "
        "export; with --checkpoint, the base model whose tokenizer files go "
        "with it (default: the run's own copy, RUN/tokenizer)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        metavar="DIR",
        help="an orbax checkpoint of jaxturbo sft or rl: the run directory, its "
        "checkpoints/ (the newest step) or one step's directory; its metadata "
        "holds the model config (default: none, export --model)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="parameter and compute dtype: the weights are cast to it, and written "
        "so (default: the dtype they are stored in; checkpoints hold float32)",
    )
    p.add_argument("--out", required=True, help="output directory (must not exist yet)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    from jaxturbo.bridge import export_hf, load_params, resolve_model

    if args.checkpoint is None:
        if args.model is None:
            raise UserError(
                "give --model (a model to export) or --checkpoint (a training checkpoint)"
            )
        src = resolve_model(args.model)
        cfg, params = load_params(src, dtype=args.dtype)
        out = export_hf(params, cfg, args.out, tokenizer=src, overwrite=args.overwrite)
        print(f"wrote {out}")
        return 0

    import jax
    import numpy as np

    from jaxturbo.models.config import ModelConfig
    from jaxturbo.train.checkpoint import read_params

    saved = read_params(args.checkpoint)
    hf = saved.meta.get("model")
    if not isinstance(hf, dict) or hf.get("model_type") == "deepseek_v3":
        raise UserError(
            f"{saved.directory}: its metadata holds no GQA model config (model_type "
            f"{(hf or {}).get('model_type')!r}); only sft/rl checkpoints of llama, "
            "qwen2 or qwen3 models export"
        )
    cfg = ModelConfig.from_hf_dict(hf)
    params = saved.params.get("policy", saved.params)  # an rl ppo run: policy + value head
    if args.dtype is not None:
        import jax.numpy as jnp

        params = jax.tree.map(lambda x: np.asarray(x).astype(jnp.dtype(args.dtype)), params)
    if args.model is not None:
        tokenizer: Path = resolve_model(args.model)
    else:
        tokenizer = saved.directory.parent.parent / "tokenizer"
        if not tokenizer.is_dir():
            raise UserError(f"no tokenizer copy at {tokenizer}; name the base model with --model")
    out = export_hf(params, cfg, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"wrote {out} (step {saved.step} of {saved.directory.parent.parent})")
    return 0
