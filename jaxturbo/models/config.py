"""Model configuration: a frozen dataclass read from (and written back to) HF `config.json`.

One `ModelConfig` describes every supported decoder family: Llama (incl. llama3 RoPE scaling,
tied embeddings), Qwen2 (QKV bias) and Qwen3 (per-head q/k RMSNorm).  Validation happens here,
before anything is compiled, with messages that name the bad value.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxturbo.errors import UserError

# model_type -> (architectures entry, qkv bias default, per-head q/k norm)
FAMILIES: dict[str, tuple[str, bool, bool]] = {
    "llama": ("LlamaForCausalLM", False, False),
    "qwen2": ("Qwen2ForCausalLM", True, False),
    "qwen3": ("Qwen3ForCausalLM", False, True),
}

# model_types of jaxturbo's own HF exports that read back as a family (the residual mode is in
# the config's "jaxturbo" block): ladder/hybrid checkpoints carry their own modeling file.
MODEL_TYPE_ALIASES = {"ladder_llama": "llama"}

RESIDUAL_MODES = ("standard", "ladder", "hybrid", "parallel")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer (HF field names where HF has one)."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # llama3 scaling: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # jaxturbo-only fields (kept out of the HF fields when they have their default value)
    residual_mode: str = "standard"
    ladder_layers: int = 0  # for residual_mode="hybrid": ladder on the last N layers

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if self.model_type not in FAMILIES:
            raise UserError(
                f"unsupported architecture model_type={self.model_type!r}; "
                f"supported: {', '.join(sorted(FAMILIES))}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"config {name}={getattr(self, name)} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.hidden_act not in ("silu", "swish"):
            raise UserError(f"unsupported hidden_act={self.hidden_act!r}; supported: silu")
        if self.residual_mode not in RESIDUAL_MODES:
            raise UserError(
                f"unknown residual mode {self.residual_mode!r}; choose one of {', '.join(RESIDUAL_MODES)}"
            )
        if not 0 <= self.ladder_layers <= self.num_hidden_layers:
            raise UserError(
                f"ladder_layers={self.ladder_layers} must be in [0, {self.num_hidden_layers}]"
            )
        if self.rope_scaling is not None and self.rope_scaling_dict.get("rope_type") not in (
            "llama3", "default", "linear"):
            raise UserError(
                f"unsupported rope scaling {self.rope_scaling_dict.get('rope_type')!r}; "
                "supported: default, linear, llama3"
            )

    # ------------------------------------------------------------------ derived
    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def layer_is_ladder(self, i: int) -> bool:
        """Whether layer i reads the residual stream one module late (Ladder-Residual)."""
        if self.residual_mode == "ladder":
            return True
        if self.residual_mode == "hybrid":
            return i >= self.num_hidden_layers - self.ladder_layers
        return False

    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        hq, hk, hd = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        attn = d * hd * (hq + 2 * hk) + hq * hd * d
        if self.attention_bias:
            attn += hd * (hq + 2 * hk)
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * d * f + 2 * d
        emb = v * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + emb + d

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a HF config dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
        `rope_parameters`)."""
        model_type = MODEL_TYPE_ALIASES.get(d.get("model_type"), d.get("model_type"))
        if model_type not in FAMILIES:
            archs = d.get("architectures") or []
            raise UserError(
                f"unsupported architecture model_type={model_type!r} (architectures={archs}); "
                f"supported: {', '.join(sorted(FAMILIES))}"
            )
        _, bias_default, qk_norm = FAMILIES[model_type]
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
        except KeyError as e:
            raise UserError(f"config.json lacks required field {e.args[0]!r}") from None
        rope = dict(d.get("rope_parameters") or {})
        legacy = d.get("rope_scaling") or {}
        rope.update({k: v for k, v in legacy.items() if k not in rope})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", "default")
        scaling = None if rope_type == "default" else tuple(sorted(rope.items()))
        eos = d.get("eos_token_id")
        eos_t = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        jt = d.get("jaxturbo", {})
        return cls(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", bias_default)),
            qk_norm=qk_norm,
            hidden_act=d.get("hidden_act", "silu"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos_t,
            pad_token_id=d.get("pad_token_id"),
            residual_mode=jt.get("residual_mode", "standard"),
            ladder_layers=int(jt.get("ladder_layers", 0)),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF config dict transformers' AutoConfig reads."""
        arch, _, _ = FAMILIES[self.model_type]
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        rope.update(self.rope_scaling_dict)
        d: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_id) if len(self.eos_token_id) > 1
                             else (self.eos_token_id[0] if self.eos_token_id else None)),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = False
        if self.residual_mode != "standard":
            d["jaxturbo"] = {"residual_mode": self.residual_mode, "ladder_layers": self.ladder_layers}
        return d
