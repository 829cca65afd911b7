"""Ladder-Residual checkpoints as HF directories that transformers loads with `trust_remote_code`.

Converting a pretrained model is a config change only (the weights are the same tensors;
`jaxturbo.convert.ladderize`, which also heals it).  transformers has no such architecture, so
`save_ladder_hf` writes the usual safetensors directory plus two Python files copied from
`jaxturbo/bridge/templates/`:

    configuration_ladder_llama.py   LadderLlamaConfig(LlamaConfig) + `ladder_layers`
    modeling_ladder_llama.py        LadderLlamaForCausalLM(LlamaForCausalLM): the recurrence in
                                    PyTorch, same parameter names as Llama

and points `auto_map` in config.json at them.  `model_type` is `ladder_llama`, not `llama`, so
a loader without `trust_remote_code=True` fails loudly instead of silently running the standard
residual stream on these weights (wrong logits).  The `jaxturbo` block of config.json still
records `residual_mode`/`ladder_layers` (see ModelConfig.to_hf_dict).

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxturbo.bridge.hf import Params, _commit, save_hf
from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
CONFIG_FILE = "configuration_ladder_llama.py"
MODELING_FILE = "modeling_ladder_llama.py"
MODEL_TYPE = "ladder_llama"
AUTO_MAP = {
    "AutoConfig": "configuration_ladder_llama.LadderLlamaConfig",
    "AutoModel": "modeling_ladder_llama.LadderLlamaModel",
    "AutoModelForCausalLM": "modeling_ladder_llama.LadderLlamaForCausalLM",
}


def ladder_layers_of(cfg: ModelConfig) -> int:
    """How many trailing layers are ladder layers (ladder = all, standard = 0)."""
    return sum(cfg.layer_is_ladder(i) for i in range(cfg.num_hidden_layers))


def ladder_hf_config(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """config.json of a ladder/hybrid Llama: Llama fields + ladder_layers + auto_map."""
    if cfg.model_type != "llama":
        raise UserError(
            f"Ladder-Residual HF export supports Llama models; this one is "
            f"model_type={cfg.model_type!r}"
        )
    if cfg.residual_mode not in ("standard", "hybrid", "ladder"):
        raise UserError(
            f"residual mode {cfg.residual_mode!r} has no HF export; use standard, ladder or hybrid"
        )
    d = cfg.to_hf_dict()
    d.update(
        model_type=MODEL_TYPE,
        architectures=["LadderLlamaForCausalLM"],
        auto_map=AUTO_MAP,
        ladder_layers=ladder_layers_of(cfg),
        torch_dtype=torch_dtype,
    )
    return d


def save_ladder_hf(
    params: Params,
    cfg: ModelConfig,
    out_dir: str | os.PathLike[str],
    tokenizer_src: str | os.PathLike[str] | Any | None = None,
    *,
    overwrite: bool = False,
    extra_files: Mapping[str, str] | None = None,
    extra_dirs: Mapping[str, str | os.PathLike[str]] | None = None,
) -> Path:
    """Write a ladder/hybrid (or standard) Llama as an HF `trust_remote_code` directory.

    Weights, generation config and tokenizer are written by `save_hf` (same tensors, same
    names); then config.json is replaced by `ladder_hf_config` and the two template files are
    added, with extra_files (name -> text) and copies of extra_dirs (name -> a directory, e.g.
    a heal run's metrics).  Atomic like `save_hf`: built in a sibling temporary directory,
    then renamed.
    """
    out = Path(out_dir)
    if not overwrite and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"output directory {out} already exists and is not empty; choose another --out"
        )
    ladder_hf_config(cfg)  # unsupported models fail before any weights are written
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        built = save_hf(params, cfg, tmp_root / out.name, tokenizer_src)
        written = json.loads((built / "config.json").read_text())
        hf_cfg = ladder_hf_config(cfg, torch_dtype=written["torch_dtype"])
        (built / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        for name in (CONFIG_FILE, MODELING_FILE):
            shutil.copyfile(TEMPLATE_DIR / name, built / name)
        for name, text in (extra_files or {}).items():
            (built / name).write_text(text)
        for name, src in (extra_dirs or {}).items():
            shutil.copytree(src, built / name)
        _commit(built, out, "overwrite" if overwrite else "error")
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return out
