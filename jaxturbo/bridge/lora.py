"""LoRA adapters on disk, and merged models through the HF export (`jaxturbo.models.lora`).

Adapter directory (PEFT's layout):
  adapter_model.safetensors  one tensor per layer and projection, per expert for the experts,
                             float32, PEFT's names: `base_model.model.model.layers.{i}.
                             self_attn.q_proj.lora_A.weight` [r, in], `...lora_B.weight`
                             [out, r], `base_model.model.model.layers.{i}.mlp.experts.{j}.
                             gate_proj.lora_A.weight` (`models.lora.adapter_tensors`);
  adapter_config.json        peft_type "LORA", r, lora_alpha, lora_dropout, target_modules,
                             bias "none", base_model_name_or_path, and jaxturbo_targets (the
                             LoRAConfig targets, to read the adapters back exactly).
The delta of a projection is (lora_alpha / r) B A, as PEFT applies it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxturbo.bridge.safetensors_io import read_safetensors, write_safetensors
from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.lora import (
    Adapters,
    LoRAConfig,
    adapter_config,
    adapter_tensors,
    adapters_from_tensors,
    merge,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def save_adapters(
    adapters: Adapters, params: Any, lora: LoRAConfig, out_dir: str | Path, *, base_model: str = ""
) -> Path:
    """Write `adapters` (trained on the model `params`) as an adapter directory (module
    docstring); returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.asarray(v, np.float32) for k, v in adapter_tensors(adapters).items()}
    write_safetensors(out / ADAPTER_WEIGHTS, tensors)
    cfg = adapter_config(lora, params["layers"], base_model)
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=1))
    return out


def load_adapters(path: str | Path, params: Any) -> tuple[LoRAConfig, Adapters]:
    """An adapter directory written by `save_adapters`, for the model `params`."""
    path = Path(path)
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise UserError(f"{path} holds no {ADAPTER_CONFIG}; is it an adapter directory?")
    cfg = json.loads(cfg_file.read_text())
    targets = cfg.get("jaxturbo_targets")
    lora = LoRAConfig(
        rank=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
        targets=None if targets is None else tuple(targets),
        dropout=float(cfg.get("lora_dropout", 0.0)),
    )
    return lora, adapters_from_tensors(read_safetensors(path / ADAPTER_WEIGHTS), params, lora)


def export_merged_hf(
    params: Any,
    adapters: Adapters,
    lora: LoRAConfig,
    cfg: ModelConfig,
    out_dir: str | Path,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
) -> Path:
    """The base model with every adapter merged in (W + (alpha/r) B A, per expert) as an HF
    directory (`jaxturbo.bridge.export_hf`)."""
    from jaxturbo.bridge import export_hf

    return export_hf(merge(params, adapters, lora), cfg, out_dir, tokenizer, overwrite=overwrite)
