"""LoRA (Hu et al., 2021) on the attention projections and on every expert of the MoE layers.

Why here (models/, not train/): the forward applies the adapters (`lora_linear` in attention,
`models.moe.expert_swiglu` in the experts), and models import nothing from train; the HF bridge,
which may import only models, exports the adapters and the merged weights from this module too
(`jaxturbo.bridge.lora`).  The train step (`jaxturbo.train.step`) differentiates only the
adapter pytree.

A projection W [out, in] (stacked [L, out, in]; an expert stack [L, E, out, in]) gets
A [r, in] and B [out, r] (per expert: [L, E, r, in] and [L, E, out, r]) and computes

    y = x W^T + (alpha / r) (x A^T) B^T        (dropout on x before A: see LoRAConfig)

A is drawn uniform in +-1/sqrt(in) (PEFT's Kaiming-uniform default), B is zero, so training
starts from the base model.  Adapters are a pytree {"layers": {name: array}} with the layer
parameters' naming: `self_attn.q_proj.lora_A.weight` [L, r, D],
`mlp.experts.gate_proj.lora_B.weight` [L, E, F, r], ...  `attach` puts them beside the frozen
weights with B scaled by alpha / r (the forward then needs no hyper-parameters); `merge` folds
them into the weights (W + (alpha/r) B A, per expert) for export and inference.

Targets (`LoRAConfig.targets`): "attn" (q, k, v, o projections), "experts" (gate, up, down of
every expert), or module names: short ("q_proj", "gate_proj": the experts' on an MoE model) or
full ("self_attn.v_proj", "mlp.experts.down_proj"); None (the default): "attn" and, on an MoE
model, "experts".  Dense MLPs and the router are not targets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxturbo.errors import UserError
from jaxturbo.models.layers import linear

Params = dict[str, Any]
Adapters = dict[str, Any]

LORA_A = "lora_A.weight"
LORA_B = "lora_B.weight"
ATTN_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
EXPERT_PREFIX = "mlp.experts."  # the expert stacks [L, E, out, in] (`models.moe`)
EXPERT_MODULES = ("mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj")
TARGET_GROUPS = ("attn", "experts")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r, alpha (scale alpha / r; default alpha = r, scale 1), the targets (module
    docstring; None: attention and experts where present), dropout on the adapters' input (0
    only: the train step carries no per-step randomness into the loss yet)."""

    rank: int
    alpha: float | None = None
    targets: tuple[str, ...] | None = None
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def validate(self) -> None:
        if self.rank < 1:
            raise UserError(f"LoRA rank {self.rank} must be >= 1")
        if self.alpha is not None and not self.alpha > 0:
            raise UserError(f"LoRA alpha {self.alpha} must be > 0")
        if self.targets is not None and not self.targets:
            raise UserError(f"LoRA targets are empty; choose from {_choices(TARGETABLE)}")
        for t in self.targets or ():
            # model-independent: a name no supported model has (which projections this model
            # has is checked against its weights, `target_weights`)
            if t not in TARGET_GROUPS and not any(_matches(m, t) for m in TARGETABLE):
                raise UserError(
                    f"LoRA target {t!r} is not a projection LoRA adapts; choose from "
                    f"{_choices(TARGETABLE)}"
                )
        if self.dropout != 0.0:
            raise UserError(
                f"LoRA dropout {self.dropout} is not implemented (the train step "
                "passes no randomness to the loss); use 0"
            )


TARGETABLE = ATTN_MODULES + EXPERT_MODULES


def _matches(module: str, target: str) -> bool:
    """Whether `target` (a short or full module name) names `module` ("self_attn.q_proj")."""
    return module == target or module.endswith("." + target)


def _choices(modules: tuple[str, ...] | list[str]) -> str:
    """The targets that select something among `modules` (full names): the groups, then the
    short names."""
    groups = [
        g
        for g, ms in (("attn", ATTN_MODULES), ("experts", EXPERT_MODULES))
        if set(ms) & set(modules)
    ]
    return ", ".join(groups + sorted({m.rsplit(".", 1)[-1] for m in modules}))


def adapter_names(weight: str) -> tuple[str, str]:
    """`self_attn.q_proj.weight` -> (`self_attn.q_proj.lora_A.weight`, `...lora_B.weight`)."""
    module = weight.removesuffix(".weight")
    return f"{module}.{LORA_A}", f"{module}.{LORA_B}"


def is_adapter(name: str) -> bool:
    return name.endswith(LORA_A) or name.endswith(LORA_B)


def target_weights(layers: Params, lora: LoRAConfig) -> list[str]:
    """The stacked layer weights (names in `layers`) that `lora.targets` selects, in
    `layers`' order; UserError for a target that names nothing here."""
    attn = [f"{m}.weight" for m in ATTN_MODULES if f"{m}.weight" in layers]
    experts = [f"{m}.weight" for m in EXPERT_MODULES if f"{m}.weight" in layers]
    if lora.targets is None:
        return [n for n in layers if n in set(attn + experts)]
    chosen: set[str] = set()
    for t in lora.targets:
        if t == "attn":
            hit = attn
        elif t == "experts":
            hit = experts
        else:
            hit = [n for n in attn + experts if _matches(n.removesuffix(".weight"), t)]
        if not hit:
            have = [n.removesuffix(".weight") for n in attn + experts]
            raise UserError(
                f"LoRA target {t!r} matches no projection of this model; choose from "
                f"{_choices(have)}"
                + ("" if experts else " (a dense model: its MLP takes no adapters)")
            )
        chosen.update(hit)
    return [n for n in layers if n in chosen]


def init_adapters(
    params: Params, lora: LoRAConfig, key: jax.Array, dtype: Any = jnp.float32
) -> Adapters:
    """Fresh adapters for `params` (arrays or ShapeDtypeStructs): A uniform in +-1/sqrt(in), B
    zero (module docstring).  Expert stacks [L, E, out, in] get per-expert A and B."""
    lora.validate()
    layers = params["layers"]
    out: dict[str, jax.Array] = {}
    for i, name in enumerate(target_weights(layers, lora)):
        shape = layers[name].shape  # [L, (E,) out, in]
        lead, (n_out, n_in) = shape[:-2], shape[-2:]
        a_name, b_name = adapter_names(name)
        bound = 1.0 / math.sqrt(n_in)
        out[a_name] = jax.random.uniform(
            jax.random.fold_in(key, i), (*lead, lora.rank, n_in), dtype, -bound, bound
        )
        out[b_name] = jnp.zeros((*lead, n_out, lora.rank), dtype)
    return {"layers": out}


def attach(params: Params, adapters: Adapters, lora: LoRAConfig) -> Params:
    """params with the adapters beside their weights, B scaled by alpha / r (differentiable in
    `adapters`; what the forward reads)."""
    scaled = {
        n: (a * jnp.asarray(lora.scale, a.dtype) if n.endswith(LORA_B) else a)
        for n, a in adapters["layers"].items()
    }
    return {**params, "layers": {**params["layers"], **scaled}}


def merge(params: Params, adapters: Adapters, lora: LoRAConfig) -> Params:
    """params with every adapted weight replaced by W + (alpha / r) B A (float32 sums, W's
    dtype), per layer and per expert: a plain model for export and inference."""
    layers = dict(params["layers"])
    for name in target_weights(layers, lora):
        a_name, b_name = adapter_names(name)
        if a_name not in adapters["layers"]:
            continue
        a = adapters["layers"][a_name].astype(jnp.float32)
        b = adapters["layers"][b_name].astype(jnp.float32)
        w = layers[name]
        delta = jnp.einsum("...or,...ri->...oi", b, a) * lora.scale
        layers[name] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return {**params, "layers": layers}


def lora_linear(x: jax.Array, lp: Params, module: str) -> jax.Array:
    """`linear(x, W, b)` of `module` (e.g. "self_attn.q_proj") in one layer's parameters `lp`,
    plus (x A^T) B^T when `attach` put adapters there.  x [..., in] -> [..., out]."""
    y = linear(x, lp[f"{module}.weight"], lp.get(f"{module}.bias"))
    a = lp.get(f"{module}.{LORA_A}")
    if a is None:
        return y
    return y + linear(linear(x, a.astype(x.dtype)), lp[f"{module}.{LORA_B}"].astype(x.dtype))


# ----------------------------------------------------------------------------- files
PEFT_PREFIX = "base_model.model.model.layers"


def _peft_name(name: str, layer: int, expert: int | None) -> str:
    if expert is None:
        return f"{PEFT_PREFIX}.{layer}.{name}"
    return f"{PEFT_PREFIX}.{layer}.{EXPERT_PREFIX}{expert}.{name.removeprefix(EXPERT_PREFIX)}"


def _blocks(name: str, shape: tuple[int, ...]) -> list[tuple[int, int | None]]:
    """(layer, expert or None) of every per-layer (per-expert) tensor of a stacked adapter."""
    if name.startswith(EXPERT_PREFIX):
        return [(i, j) for i in range(shape[0]) for j in range(shape[1])]
    return [(i, None) for i in range(shape[0])]


def adapter_tensors(adapters: Adapters) -> dict[str, Any]:
    """The adapters under PEFT's names, one tensor per layer (and per expert):
    `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in],
    `base_model.model.model.layers.{i}.mlp.experts.{j}.gate_proj.lora_B.weight` [out, r]."""
    return {
        _peft_name(n, i, j): (a[i] if j is None else a[i, j])
        for n, a in adapters["layers"].items()
        for i, j in _blocks(n, a.shape)
    }


def adapters_from_tensors(tensors: dict[str, Any], params: Params, lora: LoRAConfig) -> Adapters:
    """Inverse of `adapter_tensors` for the model `params` and `lora`: UserError naming a
    missing or misshapen tensor."""
    want = jax.eval_shape(lambda: init_adapters(params, lora, jax.random.key(0)))["layers"]
    out = {}
    for name, s in want.items():
        blocks = []
        for i, j in _blocks(name, s.shape):
            key = _peft_name(name, i, j)
            if key not in tensors:
                raise UserError(
                    f"adapter tensor {key} is missing; were the adapters saved for "
                    "this model, rank and targets?"
                )
            t = jnp.asarray(tensors[key], jnp.float32)
            if t.shape != tuple(s.shape[-2:]):
                raise UserError(
                    f"adapter tensor {key} has shape {list(t.shape)}; this model and "
                    f"rank need {list(s.shape[-2:])}"
                )
            blocks.append(t)
        out[name] = jnp.stack(blocks).reshape(s.shape)
    return {"layers": out}


def adapter_config(lora: LoRAConfig, layers: Params, base_model: str = "") -> dict[str, Any]:
    """adapter_config.json in PEFT's field names (peft_type LORA, r, lora_alpha, lora_dropout,
    target_modules as module short names, bias none)."""
    modules = sorted(
        {n.removesuffix(".weight").rsplit(".", 1)[-1] for n in target_weights(layers, lora)}
    )
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.rank if lora.alpha is None else lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": modules,
        "bias": "none",
        "base_model_name_or_path": base_model,
        "jaxturbo_targets": None if lora.targets is None else list(lora.targets),
    }
