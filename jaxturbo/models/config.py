"""Model configuration: a frozen dataclass read from (and written back to) HF `config.json`.

One `ModelConfig` describes every supported decoder family: Llama (incl. llama3 RoPE scaling,
tied embeddings), Qwen2 (QKV bias), Qwen3 (per-head q/k RMSNorm), and the mixture-of-experts
Qwen3-MoE and Qwen2-MoE (their router and experts in `MoEConfig`, held as `ModelConfig.moe`).
Validation happens here, before anything is compiled, with messages that name the bad value.
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
    "qwen3_moe": ("Qwen3MoeForCausalLM", False, True),
    "qwen2_moe": ("Qwen2MoeForCausalLM", True, False),
}

# mixture-of-experts families -> whether their sparse layers add a gated shared expert
MOE_FAMILIES: dict[str, bool] = {"qwen3_moe": False, "qwen2_moe": True}

# model_types of jaxturbo's own HF exports that read back as a family (the residual mode is in
# the config's "jaxturbo" block): ladder/hybrid checkpoints carry their own modeling file.
MODEL_TYPE_ALIASES = {"ladder_llama": "llama"}

RESIDUAL_MODES = ("standard", "ladder", "hybrid", "parallel")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """The sparse MLP of Qwen3-MoE / Qwen2-MoE (HF field names): a softmax router picks
    `num_experts_per_tok` of `num_experts` SwiGLU experts of width `moe_intermediate_size` per
    token (their probabilities renormalised to sum 1 when `norm_topk_prob`); Qwen2-MoE adds a
    shared expert of width `shared_expert_intermediate_size` behind a sigmoid gate.

    Layer i is sparse when i is not in `mlp_only_layers` and (i + 1) % decoder_sparse_step == 0
    (HF's rule); jaxturbo runs models whose every layer is sparse (Qwen3-30B-A3B,
    Qwen1.5-MoE-A2.7B) and refuses mixed ones.  Training adds `router_aux_loss_coef` times the
    load-balancing loss and `router_z_loss_coef` times the router z-loss."""

    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 1024
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer `layer` has the sparse MLP (HF's Qwen-MoE rule)."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    def validate(self, num_layers: int) -> None:
        for name in (
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "decoder_sparse_step",
        ):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"config {name}={getattr(self, name)} must be a positive integer")
        if self.num_experts_per_tok > self.num_experts:
            raise UserError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be at most "
                f"num_experts={self.num_experts}"
            )
        if self.shared_expert_intermediate_size < 0:
            raise UserError(
                f"shared_expert_intermediate_size={self.shared_expert_intermediate_size}"
                " must be >= 0 (0: no shared expert)"
            )
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if not float(getattr(self, name)) >= 0:
                raise UserError(f"config {name}={getattr(self, name)} must be >= 0")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < num_layers]
        if bad:
            raise UserError(
                f"mlp_only_layers={list(self.mlp_only_layers)} holds layer {bad[0]}, "
                f"outside [0, {num_layers})"
            )
        dense = [i for i in range(num_layers) if not self.is_sparse(i)]
        if dense:
            field = (
                f"mlp_only_layers={list(self.mlp_only_layers)}"
                if self.mlp_only_layers
                else f"decoder_sparse_step={self.decoder_sparse_step}"
            )
            raise UserError(
                f"{field} makes layer(s) {dense[:4]} dense: models with dense MLP "
                "layers are not supported by the mixture-of-experts families; every "
                "layer must be sparse (decoder_sparse_step=1, mlp_only_layers=[])"
            )


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
    moe: MoEConfig | None = None  # the sparse MLP of the MoE families (None: dense SwiGLU)
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
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"config {name}={getattr(self, name)} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if (self.moe is None) == (self.model_type in MOE_FAMILIES):
            raise UserError(
                f"model_type={self.model_type!r} "
                + (
                    "needs its mixture-of-experts fields (moe=MoEConfig(...))"
                    if self.moe is None
                    else "is dense: moe must be None; "
                    f"mixture-of-experts families: {', '.join(sorted(MOE_FAMILIES))}"
                )
            )
        if self.moe is not None:
            self.moe.validate(self.num_hidden_layers)
            shared = self.moe.shared_expert_intermediate_size
            if MOE_FAMILIES[self.model_type] != (shared > 0):
                raise UserError(
                    f"shared_expert_intermediate_size={shared}: {self.model_type} "
                    + (
                        "has a shared expert (must be > 0)"
                        if MOE_FAMILIES[self.model_type]
                        else "has no shared expert (must be 0)"
                    )
                )
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
            "llama3",
            "default",
            "linear",
        ):
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
        mlp = 3 * d * f
        if self.moe is not None:  # router + experts (+ shared expert and its gate)
            m = self.moe
            mlp = m.num_experts * (d + 3 * d * m.moe_intermediate_size)
            if m.shared_expert_intermediate_size:
                mlp += 3 * d * m.shared_expert_intermediate_size + d
        layer = attn + mlp + 2 * d
        emb = v * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + emb + d

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
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
            # Qwen2-MoE names its q/k/v bias switch qkv_bias
            attention_bias=bool(d.get("attention_bias", d.get("qkv_bias", bias_default))),
            qk_norm=qk_norm,
            hidden_act=d.get("hidden_act", "silu"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos_t,
            pad_token_id=d.get("pad_token_id"),
            moe=moe_from_hf_dict(d) if model_type in MOE_FAMILIES else None,
            residual_mode=jt.get("residual_mode", "standard"),
            ladder_layers=int(jt.get("ladder_layers", 0)),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
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
            "eos_token_id": (
                list(self.eos_token_id)
                if len(self.eos_token_id) > 1
                else (self.eos_token_id[0] if self.eos_token_id else None)
            ),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = False
        if self.moe is not None:
            d.update(moe_to_hf_dict(self.moe, self.model_type, self.attention_bias))
        if self.residual_mode != "standard":
            d["jaxturbo"] = {
                "residual_mode": self.residual_mode,
                "ladder_layers": self.ladder_layers,
            }
        return d


# ---------------------------------------------------------------------------------- MoE fields
def moe_from_hf_dict(d: dict[str, Any]) -> MoEConfig:
    """The MoEConfig of a Qwen3-MoE / Qwen2-MoE config dict (transformers' field names;
    Qwen3MoeConfig.to_dict writes the expert count as `num_local_experts`)."""
    n = d.get("num_experts", d.get("num_local_experts"))
    for name, v in (
        ("num_experts", n),
        ("num_experts_per_tok", d.get("num_experts_per_tok")),
        ("moe_intermediate_size", d.get("moe_intermediate_size")),
    ):
        if v is None:
            raise UserError(
                f"config.json of a {d.get('model_type')} model lacks required field {name!r}"
            )
    return MoEConfig(
        num_experts=int(n),
        num_experts_per_tok=int(d["num_experts_per_tok"]),
        moe_intermediate_size=int(d["moe_intermediate_size"]),
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        decoder_sparse_step=int(d.get("decoder_sparse_step") or 1),
        mlp_only_layers=tuple(int(i) for i in d.get("mlp_only_layers") or ()),
        shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0)
        if MOE_FAMILIES.get(d.get("model_type"), False)
        else 0,
        router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
        router_z_loss_coef=float(d.get("router_z_loss_coef") or 0.0),
    )


def moe_to_hf_dict(moe: MoEConfig, model_type: str, attention_bias: bool) -> dict[str, Any]:
    """The MoE fields of an HF config dict (and the family's own name for the q/k/v bias)."""
    d: dict[str, Any] = {
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.num_experts_per_tok,
        "moe_intermediate_size": moe.moe_intermediate_size,
        "norm_topk_prob": moe.norm_topk_prob,
        "decoder_sparse_step": moe.decoder_sparse_step,
        "mlp_only_layers": list(moe.mlp_only_layers),
        "router_aux_loss_coef": moe.router_aux_loss_coef,
        "output_router_logits": False,
    }
    if moe.router_z_loss_coef:
        d["router_z_loss_coef"] = moe.router_z_loss_coef
    if model_type == "qwen2_moe":
        d["shared_expert_intermediate_size"] = moe.shared_expert_intermediate_size
        d["qkv_bias"] = attention_bias
    else:
        d["attention_bias"] = attention_bias
    return d
