"""Bridge to PyTorch serving: HF safetensors import/export and GGUF import.

    cfg, params, tokenizer = load_model("smollm2-135m")        # or an HF dir, or a .gguf file
    export_hf(params, cfg, "out/", tokenizer=tokenizer)         # transformers/vLLM load "out/"

A DeepSeek-V3 directory (what `jaxturbo convert-mla` writes) loads as an `MLAConfig` and its
params (`bridge.deepseek`); `export_hf` writes an `MLAConfig` model as DeepSeek-V3 again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jaxturbo.bridge.deepseek import is_deepseek_config, load_deepseek, save_deepseek
from jaxturbo.bridge.hf import DEFAULT_SHARD_BYTES, Params, load_hf, save_hf
from jaxturbo.bridge.registry import REGISTRY, cache_dir, resolve_model
from jaxturbo.errors import UserError
from jaxturbo.models.config import FAMILIES, MODEL_TYPE_ALIASES
from jaxturbo.models.dispatch import AnyConfig
from jaxturbo.models.mla import MLAConfig

__all__ = [
    "load_model",
    "load_params",
    "export_hf",
    "load_hf",
    "save_hf",
    "load_deepseek",
    "save_deepseek",
    "resolve_model",
    "load_tokenizer",
    "REGISTRY",
    "cache_dir",
]

SUPPORTED_MODEL_TYPES = (*sorted(FAMILIES), "deepseek_v3")


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """transformers `AutoTokenizer` of an HF directory (UserError if it has none)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise UserError(
            f"no tokenizer files (tokenizer.json, tokenizer.model, vocab.json) in {path}"
        )
    return AutoTokenizer.from_pretrained(str(path))


def _config_dict(path: Path) -> dict[str, Any]:
    f = path / "config.json"
    if not f.is_file():
        raise UserError(f"no config.json at {f}")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{f} is not valid JSON: {e}") from None
    return d if isinstance(d, dict) else {}


def load_params(path: str | os.PathLike[str], dtype: Any = None) -> tuple[AnyConfig, Params]:
    """`(cfg, params)` of an HF directory: a `ModelConfig` for llama/qwen2/qwen3 (`load_hf`), an
    `MLAConfig` for DeepSeek-V3 (`bridge.deepseek.load_deepseek`); floating tensors cast to
    `dtype` if given, else kept in their stored dtype."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model directory {path} does not exist")
    d = _config_dict(path)
    if is_deepseek_config(d):
        return load_deepseek(path, dtype=dtype)
    model_type = MODEL_TYPE_ALIASES.get(d.get("model_type"), d.get("model_type"))
    if model_type not in FAMILIES:
        raise UserError(
            f"unsupported architecture model_type={d.get('model_type')!r} "
            f"(architectures={d.get('architectures') or []}); supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    cfg, params, _ = load_hf(path, dtype=dtype)
    return cfg, params


def load_model(
    name_or_dir: str | os.PathLike[str], dtype: Any = None, *, progress: bool = True
) -> tuple[AnyConfig, Params, Any]:
    """Load a registry model, an HF directory or a `.gguf` file.

    Returns `(cfg, params, tokenizer)`: cfg a `ModelConfig` (GQA) or an `MLAConfig`
    (DeepSeek-V3 directories); params are jax arrays (layers stacked, see `jaxturbo.bridge.hf`
    and `jaxturbo.models.mla`), floating ones cast to `dtype` if given; tokenizer is a
    transformers `AutoTokenizer`.
    """
    path = resolve_model(name_or_dir, progress=progress)
    cfg, params = load_params(path, dtype=dtype)
    return cfg, params, load_tokenizer(path)


def export_hf(
    params: Params,
    cfg: AnyConfig,
    out_dir: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | Any | None = None,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write params as an HF directory (`save_hf`; an `MLAConfig` model as DeepSeek-V3,
    `save_deepseek`); `tokenizer` is a tokenizer object or a directory to copy tokenizer files
    from."""
    if isinstance(cfg, MLAConfig):
        return save_deepseek(
            params, cfg, out_dir, tokenizer, max_shard_bytes=max_shard_bytes, overwrite=overwrite
        )
    return save_hf(
        params, cfg, out_dir, tokenizer, max_shard_bytes=max_shard_bytes, overwrite=overwrite
    )
