"""Bridge to PyTorch serving: HF safetensors import/export and GGUF import.

    cfg, params, tokenizer = load_model("smollm2-135m")        # or an HF dir, or a .gguf file
    export_hf(params, cfg, "out/", tokenizer=tokenizer)         # transformers/vLLM load "out/"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jaxturbo.bridge.hf import DEFAULT_SHARD_BYTES, Params, load_hf, save_hf
from jaxturbo.bridge.registry import REGISTRY, cache_dir, resolve_model
from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig

__all__ = ["load_model", "export_hf", "load_hf", "save_hf", "resolve_model", "load_tokenizer",
           "REGISTRY", "cache_dir"]


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """transformers `AutoTokenizer` of an HF directory (UserError if it has none)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise UserError(f"no tokenizer files (tokenizer.json, tokenizer.model, vocab.json) in {path}")
    return AutoTokenizer.from_pretrained(str(path))


def load_model(name_or_dir: str | os.PathLike[str], dtype: Any = None, *,
               progress: bool = True) -> tuple[ModelConfig, Params, Any]:
    """Load a registry model, an HF directory or a `.gguf` file.

    Returns `(cfg, params, tokenizer)`: params are jax arrays (layers stacked, see
    `jaxturbo.bridge.hf`), floating ones cast to `dtype` if given; tokenizer is a transformers
    `AutoTokenizer`.
    """
    path = resolve_model(name_or_dir, progress=progress)
    cfg, params, _ = load_hf(path, dtype=dtype)
    return cfg, params, load_tokenizer(path)


def export_hf(params: Params, cfg: ModelConfig, out_dir: str | os.PathLike[str],
              tokenizer: str | os.PathLike[str] | Any | None = None, *,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Write params as an HF directory (see `save_hf`); `tokenizer` is a tokenizer object or a
    directory to copy tokenizer files from."""
    return save_hf(params, cfg, out_dir, tokenizer, max_shard_bytes=max_shard_bytes,
                   overwrite=overwrite)
