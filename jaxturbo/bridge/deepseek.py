"""DeepSeek-V3 HF directories (dense MLP, no q LoRA) <-> jaxturbo MLA params.

Params follow `jaxturbo.models.mla` (HF names, layers stacked).  Two differences from the HF
tensors, both undone on export:

* RoPE layout.  DeepSeek stores the rope rows of q_proj and kv_a_proj_with_mqa as interleaved
  pairs (x0, x1), (x2, x3), ... (`rope_interleave`, default True); jaxturbo rotates halves,
  so those rows are permuted (evens then odds) on import.
* Latent norm.  CARE conversions have no RMSNorm on the latent, but a stock DeepSeek loader
  always applies `kv_a_layernorm` (eps 1e-6, hard-coded in transformers).  Export makes that
  norm work in its linear regime: the latent rows of kv_a_proj are scaled by a tiny sigma and the
  norm weight is sqrt(eps)/sigma, so norm(sigma*c) = c*sqrt(eps)/sqrt(sigma^2*mean(c^2)+eps)
  = c*(1 - O(sigma^2*mean(c^2)/eps)).  sigma comes from a bound on |c| that holds for every
  input (the input is RMS-normed, so |x| <= sqrt(D)*max|w_norm|; |c| <= ||W_a||_2*|x|), which
  puts the relative error below 5e-7 whatever the tokens.  Importing such a directory gives
  latent_norm=True params that compute the same function.

Converted models may have frequencies chosen by CARE; those export when they form a geometric
sequence (theta'^(-2i/dr) / factor: rope_type "linear"), which the converter arranges.

Supported: what `jaxturbo convert-mla` writes and any DeepSeek-V3 checkpoint of the same shape
(q_proj without q-LoRA, a dense MLP in every layer, the latent norm, default or linear rope,
interleaved rope rows, per-layer ranks zero-padded to kv_lora_rank).  Anything else DeepSeek-V3
can be (q-LoRA, MoE layers, yarn and other rope types, attention biases, half-layout rope rows)
is refused with a UserError naming the field.

Round trips.  HF -> jaxturbo -> HF gives back every tensor bit for bit (the rope permutation is
a row shuffle, the latent norm is kept as stored); tensors the model does not use (a tied
checkpoint's duplicate lm_head, rotary buffers) are dropped and config.json is rewritten in
jaxturbo's form (same model).  jaxturbo -> HF -> jaxturbo is bitwise for latent_norm=True params;
for latent_norm=False (CARE) params the export applies the latent-norm trick above, so the
re-imported params are latent_norm=True with scaled latent rows: the same function within a
relative 5e-7, not the same tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxturbo.bridge.hf import (
    DEFAULT_SHARD_BYTES,
    generation_config,
    read_hf_tensors,
    tokenizer_writer,
    write_hf_dir,
)
from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.mla import MLAConfig

Params = dict[str, Any]
_LAYER_KEYS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.kv_a_proj_with_mqa.weight",
    "self_attn.kv_b_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
_NORM = "self_attn.kv_a_layernorm.weight"
LATENT_NORM_EPS = 1e-6  # transformers' DeepseekV3RMSNorm default, used for kv_a_layernorm


def _interleaved_to_half(dr: int) -> np.ndarray:
    """Row order taking DeepSeek's interleaved rope rows to jaxturbo's half layout."""
    return np.concatenate([np.arange(0, dr, 2), np.arange(1, dr, 2)])


def _permute_rope_rows(w: np.ndarray, heads: int, dn: int, dr: int, perm: np.ndarray) -> np.ndarray:
    """Reorder the rope rows of q_proj [H*(dn+dr), D] (heads>0) or of kv_a [R+dr, D] (heads=0)."""
    w = np.array(w)
    if heads:
        w3 = w.reshape(heads, dn + dr, -1)
        w3[:, dn:] = w3[:, dn:][:, perm]
        return w3.reshape(w.shape)
    w[-dr:] = w[-dr:][perm]
    return w


# ----------------------------------------------------------------------------- config
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)


def is_deepseek_config(d: dict[str, Any]) -> bool:
    """Whether an HF config dict describes a DeepSeek-V3 model (this module's format)."""
    return d.get("model_type") == "deepseek_v3"


def _refuse_unsupported(d: dict[str, Any], layers: int) -> None:
    """UserError for the DeepSeek-V3 variants jaxturbo's MLA model does not implement.
    Absent fields take transformers' DeepseekV3Config defaults (q_lora_rank 1536,
    first_k_dense_replace 3, rope_interleave true), as transformers would build the model."""
    q_lora = d.get("q_lora_rank", 1536)
    if q_lora is not None:
        why = "" if "q_lora_rank" in d else " (the default when absent)"
        raise UserError(
            f"q_lora_rank={q_lora}{why}: q-LoRA (q_a_proj, q_a_layernorm, q_b_proj) "
            "is not supported; supported: q_lora_rank null (one q_proj)"
        )
    dense = d.get("first_k_dense_replace", 3)
    if dense is None or int(dense) < layers:
        raise UserError(
            f"first_k_dense_replace={dense} with num_hidden_layers={layers}: layers "
            f"{dense}..{layers - 1} are mixture-of-experts, which is not supported; "
            f"supported: a dense MLP in every layer (first_k_dense_replace >= {layers})"
        )
    if d.get("attention_bias", False):
        raise UserError(
            "attention_bias=true: biases on kv_a_proj_with_mqa / o_proj are not "
            "supported; supported: attention_bias false"
        )
    if not d.get("rope_interleave", True):
        raise UserError(
            "rope_interleave=false (rope rows in halves) is not supported; "
            "supported: rope_interleave true (DeepSeek's interleaved pairs)"
        )


def _rope_inv_freq(d: dict[str, Any], dr: int) -> tuple[float, tuple[float, ...] | None]:
    """(rope_theta, inverse frequencies or None for theta's default schedule) of a config dict;
    UserError for rope types other than default and linear."""
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "linear":
        raise UserError(f"unsupported DeepSeek rope type {kind!r}; supported: default, linear")
    if "factor" not in rope:
        raise UserError("rope_type 'linear' without a 'factor' in rope_parameters")
    factor = float(rope["factor"])
    if rope.get("mscale_all_dim") and factor > 1:
        # transformers then multiplies the softmax scale by yarn_get_mscale(factor, m)^2
        raise UserError(
            f"rope mscale_all_dim={rope['mscale_all_dim']} (with factor {factor}) "
            "rescales the attention scores, which is not supported; supported: "
            "mscale_all_dim 0 or absent"
        )
    inv = (1.0 / theta ** (np.arange(0, dr, 2) / dr)) / factor
    return theta, tuple(float(f) for f in inv)


def mla_config_from_hf(d: dict[str, Any]) -> MLAConfig:
    """MLAConfig from a DeepSeek-V3 config dict; UserError for what is not supported (module
    docstring) or a missing field."""
    if not is_deepseek_config(d):
        raise UserError(f"expected model_type 'deepseek_v3', got {d.get('model_type')!r}")
    missing = [k for k in _REQUIRED if d.get(k) is None]
    if missing:
        raise UserError(f"config.json lacks required DeepSeek-V3 field(s) {', '.join(missing)}")
    L = int(d["num_hidden_layers"])
    _refuse_unsupported(d, L)
    dn, dr = int(d["qk_nope_head_dim"]), int(d["qk_rope_head_dim"])
    theta, inv = _rope_inv_freq(d, dr)
    heads = int(d["num_attention_heads"])
    base = ModelConfig(
        model_type="llama",
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_hidden_layers=L,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=dn + dr + (dn + dr) % 2,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        hidden_act=d.get("hidden_act", "silu"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=()
        if d.get("eos_token_id") is None
        else (
            tuple(d["eos_token_id"])
            if isinstance(d["eos_token_id"], list)
            else (int(d["eos_token_id"]),)
        ),
        pad_token_id=d.get("pad_token_id"),
    )
    jt = d.get("jaxturbo", {})
    ranks = jt.get("layer_ranks")
    return MLAConfig(
        base=base,
        kv_lora_rank=int(d["kv_lora_rank"]),
        qk_nope_head_dim=dn,
        qk_rope_head_dim=dr,
        v_head_dim=int(d["v_head_dim"]),
        layer_ranks=tuple(ranks) if ranks else None,
        rope_inv_freq=inv,
        latent_norm=True,
        latent_norm_eps=LATENT_NORM_EPS,
    )


def _digits(x: float) -> float:
    """x to 12 significant digits: exported rope numbers read back to the same config."""
    return float(f"{x:.12g}")


def _rope_parameters(cfg: MLAConfig) -> dict[str, Any]:
    """HF rope parameters reproducing cfg's rope frequencies, or a UserError if none can."""
    theta = cfg.base.rope_theta
    if cfg.rope_inv_freq is None:
        return {"rope_theta": theta, "rope_type": "default"}
    f = np.asarray(cfg.rope_inv_freq, np.float64)
    dr = cfg.qk_rope_head_dim
    ratio = f[1:] / f[:-1] if len(f) > 1 else np.array([theta ** (-2.0 / dr)])
    if not np.allclose(ratio, ratio[0], rtol=1e-5) or ratio[0] >= 1:
        raise UserError(
            "the rope frequencies are not a decreasing geometric sequence, which "
            "DeepSeek-V3's config cannot express; convert with rope_layout='geometric'"
        )
    if not np.allclose(ratio, theta ** (-2.0 / dr), rtol=1e-9):
        theta = _digits(float(ratio[0] ** (-dr / 2)))  # the base's theta has another schedule
    factor = _digits(float(1.0 / f[0]))
    if abs(factor - 1.0) < 1e-7:
        return {"rope_theta": theta, "rope_type": "default"}
    return {"rope_theta": theta, "rope_type": "linear", "factor": factor}


def mla_config_to_hf(cfg: MLAConfig) -> dict[str, Any]:
    """The DeepSeek-V3 config dict for a dense, q_proj-only MLA model."""
    b = cfg.base
    rope = _rope_parameters(cfg)
    d: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": b.vocab_size,
        "hidden_size": b.hidden_size,
        "intermediate_size": b.intermediate_size,
        "moe_intermediate_size": b.intermediate_size,
        "num_hidden_layers": b.num_hidden_layers,
        "num_attention_heads": b.num_attention_heads,
        "num_key_value_heads": b.num_attention_heads,
        "n_shared_experts": 1,
        "n_routed_experts": 1,
        "num_experts_per_tok": 1,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": b.num_hidden_layers,
        "q_lora_rank": None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "head_dim": cfg.qk_rope_head_dim,
        "rope_interleave": True,
        "hidden_act": b.hidden_act,
        "rms_norm_eps": b.rms_norm_eps,
        "rope_theta": rope["rope_theta"],
        "rope_parameters": rope,
        "max_position_embeddings": b.max_position_embeddings,
        "tie_word_embeddings": b.tie_word_embeddings,
        "attention_bias": False,
        "bos_token_id": b.bos_token_id,
        "pad_token_id": b.pad_token_id,
        "eos_token_id": (
            list(b.eos_token_id)
            if len(b.eos_token_id) > 1
            else (b.eos_token_id[0] if b.eos_token_id else None)
        ),
        "torch_dtype": "float32",
    }
    if cfg.layer_ranks is not None and len(set(cfg.layer_ranks)) > 1:
        d["jaxturbo"] = {
            "layer_ranks": list(cfg.layer_ranks)
        }  # padded to kv_lora_rank in the weights
    return d


# ----------------------------------------------------------------------------- tensors
def mla_tensor_shapes(
    cfg: MLAConfig,
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(global HF names -> shape, per-layer suffixes -> shape) of a DeepSeek-V3 checkpoint."""
    b = cfg.base
    D, V, F, H, R = (
        b.hidden_size,
        b.vocab_size,
        b.intermediate_size,
        cfg.num_heads,
        cfg.kv_lora_rank,
    )
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    glob = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not b.tie_word_embeddings:
        glob["lm_head.weight"] = (V, D)
    layer = {
        "input_layernorm.weight": (D,),
        "post_attention_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (H * (dn + dr), D),
        "self_attn.kv_a_proj_with_mqa.weight": (R + dr, D),
        _NORM: (R,),
        "self_attn.kv_b_proj.weight": (H * (dn + dv), R),
        "self_attn.o_proj.weight": (D, H * dv),
        "mlp.gate_proj.weight": (F, D),
        "mlp.up_proj.weight": (F, D),
        "mlp.down_proj.weight": (D, F),
    }
    return glob, layer


def mla_params_from_hf(tensors: dict[str, np.ndarray], cfg: MLAConfig) -> Params:
    """HF tensors -> stacked jaxturbo MLA params (numpy), rope rows to half layout.

    Every tensor must be one the config implies, with its shape (UserError naming it
    otherwise); a tied checkpoint's lm_head and rotary buffers are ignored."""
    L, H = cfg.base.num_hidden_layers, cfg.num_heads
    dn, dr = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    glob, layer = mla_tensor_shapes(cfg)
    want = dict(glob)
    want.update({f"model.layers.{i}.{k}": s for i in range(L) for k, s in layer.items()})
    for name, a in tensors.items():
        if name not in want:
            if name.endswith("rotary_emb.inv_freq") or (
                name == "lm_head.weight" and cfg.base.tie_word_embeddings
            ):
                continue
            raise UserError(
                f"unexpected tensor {name} for a dense, q_proj-only DeepSeek-V3 model "
                f"with {L} layers; config.json and the weights do not match"
            )
        if tuple(a.shape) != want[name]:
            raise UserError(
                f"tensor {name} has shape {list(a.shape)} but config.json implies "
                f"{list(want[name])}; config.json and the weights do not match"
            )
    absent = [n for n in want if n not in tensors]
    if absent:
        more = f" (and {len(absent) - 3} more)" if len(absent) > 3 else ""
        raise UserError(f"checkpoint lacks {', '.join(absent[:3])}{more}")
    perm = _interleaved_to_half(dr)
    out: Params = {k: tensors[k] for k in glob}
    layers: dict[str, list[np.ndarray]] = {k: [] for k in layer}
    for i in range(L):
        for k in layers:
            w = tensors[f"model.layers.{i}.{k}"]
            if k == "self_attn.q_proj.weight":
                w = _permute_rope_rows(w, H, dn, dr, perm)
            elif k == "self_attn.kv_a_proj_with_mqa.weight":
                w = _permute_rope_rows(w, 0, dn, dr, perm)
            layers[k].append(np.asarray(w))
    out["layers"] = {k: np.stack(v) for k, v in layers.items()}
    return out


def _latent_scale(lp: dict[str, np.ndarray], cfg: MLAConfig) -> float:
    """sigma for the linear-regime latent norm (module docstring): 1e-3*sqrt(eps)/max rms(c)."""
    r = cfg.kv_lora_rank
    wa = np.asarray(lp["self_attn.kv_a_proj_with_mqa.weight"][:r], np.float64)
    x_norm = np.sqrt(cfg.base.hidden_size) * np.abs(np.asarray(lp["input_layernorm.weight"])).max()
    c_rms = np.linalg.norm(wa, 2) * x_norm / np.sqrt(r)
    return float(1e-3 * np.sqrt(LATENT_NORM_EPS) / max(c_rms, 1e-30))


def mla_params_to_hf(params: Params, cfg: MLAConfig) -> dict[str, np.ndarray]:
    """jaxturbo MLA params -> HF DeepSeek-V3 tensors (interleaved rope rows, latent norm)."""
    H, dn, dr, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    inv = np.argsort(_interleaved_to_half(dr))
    out = {k: np.asarray(v) for k, v in params.items() if k != "layers"}
    layers = {k: np.asarray(v) for k, v in params["layers"].items()}
    for i in range(cfg.base.num_hidden_layers):
        lp = {k: v[i] for k, v in layers.items()}
        q = _permute_rope_rows(lp["self_attn.q_proj.weight"], H, dn, dr, inv)
        kva = _permute_rope_rows(lp["self_attn.kv_a_proj_with_mqa.weight"], 0, dn, dr, inv)
        if cfg.latent_norm:
            if abs(cfg.latent_norm_eps - LATENT_NORM_EPS) > 1e-12:
                raise UserError(
                    f"latent_norm_eps={cfg.latent_norm_eps}: DeepSeek-V3 in "
                    f"transformers uses {LATENT_NORM_EPS}"
                )
            norm = lp[_NORM]
        else:
            sigma = _latent_scale(lp, cfg)
            kva = kva.copy()
            kva[:r] = (kva[:r].astype(np.float64) * sigma).astype(kva.dtype)
            norm = np.full((r,), np.sqrt(LATENT_NORM_EPS) / sigma, dtype=kva.dtype)
        for k in _LAYER_KEYS:
            out[f"model.layers.{i}.{k}"] = lp[k]
        out[f"model.layers.{i}.self_attn.q_proj.weight"] = q
        out[f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight"] = kva
        out[f"model.layers.{i}.{_NORM}"] = norm
    return out


# ----------------------------------------------------------------------------- directories
def load_deepseek(path: str | Path, dtype: Any = None) -> tuple[MLAConfig, Params]:
    """Load a DeepSeek-V3 (dense, q_proj) HF directory as (MLAConfig, jax params)."""
    import json

    import jax
    import jax.numpy as jnp

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"no config.json in {path}")
    cfg = mla_config_from_hf(json.loads((path / "config.json").read_text()))
    host = mla_params_from_hf(read_hf_tensors(path), cfg)
    to = (lambda a: jnp.asarray(a, dtype)) if dtype is not None else jnp.asarray
    return cfg, jax.tree.map(to, host)


def save_deepseek(
    params: Params,
    cfg: MLAConfig,
    out_dir: str | Path,
    tokenizer: str | Path | Any | None = None,
    *,
    extra_files: dict[str, str] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write a DeepSeek-V3 HF directory transformers loads: weights, config.json,
    generation_config.json, the tokenizer (an object with save_pretrained, or a directory whose
    tokenizer files are copied, as `save_hf`) and extra_files (name -> text)."""
    write_tokenizer = tokenizer_writer(tokenizer)
    hf_cfg = mla_config_to_hf(cfg)
    tensors = mla_params_to_hf(params, cfg)
    dt = str(next(iter(tensors.values())).dtype)
    hf_cfg["torch_dtype"] = "bfloat16" if "bfloat16" in dt else dt

    def extra(tmp: Path) -> None:
        write_tokenizer(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return write_hf_dir(
        out_dir,
        tensors,
        hf_cfg,
        generation_config(hf_cfg),
        extra=extra,
        max_shard_bytes=max_shard_bytes,
        exists="overwrite" if overwrite else "error",
    )
