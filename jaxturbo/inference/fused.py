"""Fused projection weights: q/k/v as one matrix and gate/up as one, for decode.

At batch 1 each projection is a GEMV that streams its weight, and cuBLAS pays a floor per call.
On an H100, a k or v projection of the 8B model takes 2.2 us at any size, and the TP-4 q
projection takes as long as the twice-larger TP-2 one (docs/findings.md, XLA on GPU: decode).
One [q; k; v] GEMV and one [gate; up] GEMV per layer read the same bytes in two calls instead of
five.  XLA's dot merger fuses these dots too, but it concatenates the weights again on every
step; this layout stores them fused once.

Layout, for `tensor`-way tensor parallelism (KV heads already replicated up to `tensor`, as
`jaxturbo.parallel.tensor.replicate_kv_heads` does): the rows are grouped shard by shard, so
that the contiguous slice a column-parallel split gives shard i is [q_i; k_i; v_i] (and
[gate_i; up_i]).  The model then splits its local rows without knowing `tensor`:

    self_attn.qkv_proj.weight [L, tensor * (Hl + 2 Kl) * hd, D]   (and .bias [L, ...])
    mlp.gate_up_proj.weight   [L, tensor * 2 Fl, D]

with Hl, Kl, Fl the per-shard query heads, KV heads and FFN width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxturbo.models.config import ModelConfig
from jaxturbo.models.layers import GATE_UP_W, QKV_B, QKV_W

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj.weight", "mlp.up_proj.weight")

Params = dict


def _interleave(parts: list[jax.Array], tensor: int) -> jax.Array:
    """Concatenate [L, n_j, ...] arrays along axis 1, shard by shard: [p0_0; p1_0; ...; p0_1; ...]."""
    chunks = []
    for i in range(tensor):
        for p in parts:
            n = p.shape[1] // tensor
            chunks.append(p[:, i * n : (i + 1) * n])
    return jnp.concatenate(chunks, axis=1)


def _deinterleave(fused: jax.Array, sizes: list[int], tensor: int) -> list[jax.Array]:
    """Inverse of `_interleave` for parts of global sizes `sizes` along axis 1."""
    per = [s // tensor for s in sizes]
    shard = sum(per)
    out: list[list[jax.Array]] = [[] for _ in sizes]
    for i in range(tensor):
        at = i * shard
        for j, n in enumerate(per):
            out[j].append(fused[:, at : at + n])
            at += n
    return [jnp.concatenate(o, axis=1) for o in out]


def is_fused(layers: Params) -> bool:
    return QKV_W in layers or GATE_UP_W in layers


def can_fuse(layers: Params) -> bool:
    """Whether `fuse_projections` applies: separate q/k/v and gate/up weights (not MLA)."""
    return all(n in layers for n in (*(f"{p}.weight" for p in _QKV), *_GATE_UP))


def fuse_projections(params: Params, cfg: ModelConfig, tensor: int = 1) -> Params:
    """`params` with q/k/v (weights and biases) and gate/up stored fused, laid out for
    `tensor`-way tensor parallelism (see the module docstring).  The KV heads must already
    number at least `tensor` (replicate them first when tensor > KV heads)."""
    layers = dict(params["layers"])
    if is_fused(layers):
        raise ValueError("the projections are already fused")
    missing = [n for n in (*(f"{p}.weight" for p in _QKV), *_GATE_UP) if n not in layers]
    if missing:
        raise ValueError(
            f"fuse_projections needs the q/k/v and gate/up weights of a GQA model; "
            f"missing {missing}"
        )
    kv = layers["self_attn.k_proj.weight"].shape[1] // cfg.head_dim
    if tensor > 1 and kv % tensor:
        raise ValueError(
            f"{kv} KV heads do not split {tensor} ways; replicate them first "
            "(jaxturbo.parallel.tensor.replicate_kv_heads)"
        )
    layers[QKV_W] = _interleave([layers.pop(f"{n}.weight") for n in _QKV], tensor)
    if f"{_QKV[0]}.bias" in layers:
        layers[QKV_B] = _interleave([layers.pop(f"{n}.bias") for n in _QKV], tensor)
    layers[GATE_UP_W] = _interleave([layers.pop(n) for n in _GATE_UP], tensor)
    return {**params, "layers": layers}


def unfuse_projections(params: Params, cfg: ModelConfig, tensor: int = 1) -> Params:
    """Inverse of `fuse_projections` (the HF names back, e.g. before an export)."""
    layers = dict(params["layers"])
    qkv = layers.pop(QKV_W)
    q_rows = cfg.num_attention_heads * cfg.head_dim
    kv_rows = (qkv.shape[1] - q_rows) // 2
    sizes = [q_rows, kv_rows, kv_rows]
    for n, w in zip(_QKV, _deinterleave(qkv, sizes, tensor)):
        layers[f"{n}.weight"] = w
    if QKV_B in layers:
        for n, b in zip(_QKV, _deinterleave(layers.pop(QKV_B), sizes, tensor)):
            layers[f"{n}.bias"] = b
    gu = layers.pop(GATE_UP_W)
    f = gu.shape[1] // 2
    layers[_GATE_UP[0]], layers[_GATE_UP[1]] = _deinterleave(gu, [f, f], tensor)
    return {**params, "layers": layers}


def fused_layer_shapes(
    shapes: dict[str, tuple[int, ...]], kv_heads: int, head_dim: int
) -> dict[str, tuple[int, ...]]:
    """Per-layer shapes (as `jaxturbo.bridge.hf.layer_shapes` gives them) of the fused layout,
    with `kv_heads` KV heads (replicated up to the tensor size where it exceeds them)."""
    out = dict(shapes)
    q_rows, d = out.pop("self_attn.q_proj.weight")
    for n in ("k_proj", "v_proj"):
        out.pop(f"self_attn.{n}.weight")
    rows = q_rows + 2 * kv_heads * head_dim
    out[QKV_W] = (rows, d)
    if "self_attn.q_proj.bias" in out:
        for n in _QKV:
            out.pop(f"{n}.bias")
        out[QKV_B] = (rows,)
    f, _ = out.pop(_GATE_UP[0])
    out.pop(_GATE_UP[1])
    out[GATE_UP_W] = (2 * f, d)
    return out


def shard_fused(params: Params, cfg: ModelConfig, mesh: jax.sharding.Mesh) -> Params:
    """`params` in the fused layout for the mesh's tensor size, placed tensor-parallel
    (`jaxturbo.parallel.tensor.shard_params`): KV heads replicated up to the tensor size first,
    then q/k/v and gate/up fused shard by shard."""
    from jaxturbo.parallel import tensor

    tp = tensor.tensor_size(mesh)
    tensor.check_tensor_parallel(cfg, tp)
    params = fuse_projections(tensor.replicate_kv_heads(params, cfg, tp), cfg, tp)
    return tensor.shard_params(params, cfg, mesh)
