"""Tensor parallelism (Megatron-style) over the mesh axis `tensor`, in `jax.shard_map`.

Layout of the parameters (names of `jaxturbo.models.transformer`, layer axis first):

    column-parallel (output rows split)   q/k/v_proj.weight [L, H*hd, D], gate/up_proj [L, F, D]
                                           (and q/k/v biases [L, H*hd])
    row-parallel (input columns split)    o_proj [L, D, H*hd], down_proj [L, D, F]
    vocab-parallel                        embed_tokens [V, D], lm_head [V, D]
    replicated                            every norm weight

Each device then runs the unchanged per-device `forward(..., tensor_axis="tensor")`: it reads
its local head/FFN counts from the weight shapes and `psum`s the partial outputs of o_proj and
down_proj (2 all-reduces of [B, T, D] per layer; `parallel` fuses them into 1, `ladder` delays
each one by a module so it overlaps compute; a benchmark's `skip_allreduce` drops them).

KV heads: with K KV heads and tensor size P, P | K shards them (K/P per device); K | P
replicates each KV head P/K times before sharding (1 per device), which keeps every device's
query heads next to their own KV head (SmolLM2, 9 query / 3 KV heads: P=3 shards them, one
per device; a model with 2 KV heads at P=8 holds 4 copies of each).
The KV cache is sharded the same way, on its head axis.

Constraints are checked up front (`check_tensor_parallel`), naming the tensor sizes that work.
Mixture-of-experts models have no tensor-parallel layout: they are refused up front, naming the
axes they split over instead (`check_not_moe`; `jaxturbo.parallel.expert`).
Training (`jaxturbo.train.step`) runs the same per-device forward on this layout, with the
parameters also split over `fsdp` (`jaxturbo.train.sharding`), and needs tp | KV heads
(`check_tensor_training`).  Inference treats `fsdp` like `data` (`check_mesh`, `row_axes`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.layers import GATE_UP_W, QKV_B, QKV_W
from jaxturbo.models.transformer import Cache, PagedCache, Params, forward, init_cache
from jaxturbo.parallel.axes import BATCH_AXES, DATA, FSDP, SEQUENCE, TENSOR, divisors

# Per-layer parameter suffix -> spec of the stacked [L, ...] array.
_COLUMN = P(None, TENSOR, None)
_ROW = P(None, None, TENSOR)
_LAYER_SPECS: dict[str, P] = {
    "self_attn.q_proj.weight": _COLUMN,
    "self_attn.k_proj.weight": _COLUMN,
    "self_attn.v_proj.weight": _COLUMN,
    "self_attn.q_proj.bias": P(None, TENSOR),
    "self_attn.k_proj.bias": P(None, TENSOR),
    "self_attn.v_proj.bias": P(None, TENSOR),
    "self_attn.o_proj.weight": _ROW,
    "mlp.gate_proj.weight": _COLUMN,
    "mlp.up_proj.weight": _COLUMN,
    "mlp.down_proj.weight": _ROW,
    # fused layouts (jaxturbo/inference/fused.py: rows grouped shard by shard, so a column split
    # is right)
    QKV_W: _COLUMN,
    QKV_B: P(None, TENSOR),
    GATE_UP_W: _COLUMN,
    "input_layernorm.weight": P(),
    "post_attention_layernorm.weight": P(),
    "self_attn.q_norm.weight": P(),
    "self_attn.k_norm.weight": P(),
}
_GLOBAL_SPECS: dict[str, P] = {
    "model.embed_tokens.weight": P(TENSOR, None),
    "lm_head.weight": P(TENSOR, None),
    "model.norm.weight": P(),
}


# ----------------------------------------------------------------------------- validation
def _kv_ok(kv_heads: int, tp: int) -> bool:
    return kv_heads % tp == 0 or tp % kv_heads == 0


def valid_tensor_sizes(cfg: ModelConfig) -> list[int]:
    """Every tensor-axis size the model can be split over."""
    return [
        d
        for d in divisors(cfg.num_attention_heads)
        if _kv_ok(cfg.num_key_value_heads, d)
        and cfg.intermediate_size % d == 0
        and cfg.vocab_size % d == 0
        and cfg.hidden_size % d == 0
    ]


def check_not_moe(cfg: ModelConfig, tp: int) -> None:
    """Mixture-of-experts models have no tensor-parallel layout (router and expert stacks):
    UserError naming the axes they do split over, before any parameter is placed."""
    if tp == 1 or cfg.moe is None:
        return
    raise UserError(
        f"tensor parallelism (tensor={tp}) of a {cfg.model_type} (mixture-of-experts) model is "
        f"not implemented; such a model trains split over the expert, data, fsdp and sequence "
        f"axes (expert parallelism: e.g. expert={tp} with tensor=1; the expert size must "
        f"divide its {cfg.moe.num_experts} experts), and generates and scores on one device"
    )


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Raise UserError naming the first dimension `tp` does not divide and the sizes that work.

    Query heads, FFN width and vocabulary are split; KV heads are split or replicated (K | P or
    P | K).  Hidden must divide too, so that the all-reduce can later become a reduce-scatter +
    all-gather over D without another check.  Mixture-of-experts models are refused
    (`check_not_moe`).
    """
    if tp == 1:
        return
    check_not_moe(cfg, tp)
    choices = "{" + ", ".join(map(str, valid_tensor_sizes(cfg))) + "}"
    checks = [
        (cfg.num_attention_heads % tp == 0, f"{cfg.num_attention_heads} query heads"),
        (
            _kv_ok(cfg.num_key_value_heads, tp),
            f"{cfg.num_key_value_heads} KV heads (nor is it a multiple of them, for replication)",
        ),
        (cfg.intermediate_size % tp == 0, f"the FFN width {cfg.intermediate_size}"),
        (cfg.vocab_size % tp == 0, f"the vocabulary of {cfg.vocab_size}"),
        (cfg.hidden_size % tp == 0, f"the hidden size {cfg.hidden_size}"),
    ]
    for ok, what in checks:
        if not ok:
            raise UserError(
                f"tensor axis {tp} does not divide {what}; choose a tensor size from {choices}"
            )


def valid_training_tensor_sizes(cfg: ModelConfig) -> list[int]:
    """Tensor sizes training can use: those of `valid_tensor_sizes` that also divide the KV
    heads (no replication: copies of a KV head would be updated apart)."""
    return [d for d in valid_tensor_sizes(cfg) if cfg.num_key_value_heads % d == 0]


def check_tensor_training(cfg: ModelConfig, tp: int) -> None:
    """`check_tensor_parallel` for a train step, which also needs tp | KV heads: inference
    replicates KV heads when tp > K (`replicate_kv_heads`), but trained copies would drift
    apart.  Raises UserError naming the sizes that train."""
    if tp == 1:
        return
    check_not_moe(cfg, tp)
    choices = "{" + ", ".join(map(str, valid_training_tensor_sizes(cfg))) + "}"
    try:
        check_tensor_parallel(cfg, tp)
    except UserError as e:
        raise UserError(
            f"training with {str(e).split(';')[0]}; choose a tensor size from {choices}"
        ) from None
    if cfg.num_key_value_heads % tp:
        raise UserError(
            f"training with tensor axis {tp}: it does not divide the {cfg.num_key_value_heads} KV "
            f"heads (inference replicates KV heads, training would update the copies apart); "
            f"choose a tensor size from {choices}"
        )


def check_mesh(cfg: ModelConfig, mesh: Mesh, batch: int | None = None) -> None:
    """Model/mesh compatibility for tensor (+ data) parallel inference.

    Inference treats `fsdp` like `data` (rows split over data x fsdp, parameters replicated
    there; sharding them only pays off for optimizer state), so a training preset such as
    tpu-v5p-64 (fsdp 8 x tensor 4) serves generate and ppl as 8 row groups x TP 4.
    """
    sizes = dict(mesh.shape)
    seq, fsdp, tp = sizes.get(SEQUENCE, 1), sizes.get(FSDP, 1), sizes.get(TENSOR, 1)
    check_not_moe(cfg, tp)
    n_dev = math.prod(sizes.values())
    if cfg.moe is not None and n_dev > 1:
        raise UserError(
            f"inference of a {cfg.model_type} (mixture-of-experts) model on a mesh of "
            f"{n_dev} devices is not implemented; it generates and scores on one "
            f"device (training splits it over the expert, data, fsdp and sequence axes)"
        )
    if seq != 1:
        raise UserError(
            f"tensor-parallel inference uses the axes data, fsdp (as data) and tensor; mesh axis "
            f"sequence={seq} must be 1 (sequence parallelism is for training); put those devices "
            f"on data, e.g. the mesh "
            f"data={sizes.get(DATA, 1) * seq},fsdp={fsdp},tensor={tp}"
        )
    check_tensor_parallel(cfg, tp)
    dp = sizes.get(DATA, 1) * fsdp
    if batch is not None and batch % dp:
        what = "the data axis" if fsdp == 1 else "data x fsdp"
        raise UserError(
            f"batch {batch} is not divisible by {what} {dp}; use a batch that is a multiple of {dp}"
        )


def row_axes(mesh: Mesh) -> tuple[str, ...] | None:
    """The PartitionSpec entry splitting inference rows: the batch axes of size > 1 (data, and
    fsdp treated as data), None when every one is 1."""
    sizes = dict(mesh.shape)
    axes = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
    return axes or None


def tensor_size(mesh: Mesh) -> int:
    return dict(mesh.shape).get(TENSOR, 1)


def cache_kv_heads(cfg: ModelConfig, tp: int) -> int:
    """KV heads held in the (global) cache: replicated up to `tp` when tp > K."""
    return max(cfg.num_key_value_heads, tp)


# ----------------------------------------------------------------------------- parameters
def replicate_kv_heads(params: Params, cfg: ModelConfig, tp: int) -> Params:
    """Repeat each KV head tp/K times (k/v weights and biases) when tp > K; else unchanged.

    The result is the same model with tp KV heads (each query group now reads a copy of its
    KV head), so the single-device forward of it gives the same logits.
    """
    k = cfg.num_key_value_heads
    if tp <= k:
        return params
    rep, hd = tp // k, cfg.head_dim
    layers = dict(params["layers"])
    for name in (
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.bias",
    ):
        if name in layers:
            w = layers[name]  # [L, K*hd, (D)]
            heads = w.reshape(w.shape[0], k, hd, *w.shape[2:])
            layers[name] = jnp.repeat(heads, rep, axis=1).reshape(
                w.shape[0], k * rep * hd, *w.shape[2:]
            )
    return {**params, "layers": layers}


def param_specs(params: Params) -> Params:
    """PartitionSpec pytree matching `params` (unknown names are an error, not replicated)."""

    def spec(table: dict[str, P], name: str) -> P:
        if name not in table:
            raise ValueError(f"no tensor-parallel layout for parameter {name!r}")
        return table[name]

    out = {n: spec(_GLOBAL_SPECS, n) for n in params if n != "layers"}
    out["layers"] = {n: spec(_LAYER_SPECS, n) for n in params["layers"]}
    return out


def shard_params(params: Params, cfg: ModelConfig, mesh: Mesh) -> Params:
    """Place `params` on `mesh`: column/row/vocab-parallel over `tensor`, replicated over `data`.

    KV heads are replicated first when the tensor size exceeds them (`replicate_kv_heads`).
    Params in the fused projection layout (`jaxturbo.inference.fused.shard_fused` makes and
    places them) must be laid out for this tensor size already.
    """
    tp = tensor_size(mesh)
    check_tensor_parallel(cfg, tp)
    params = replicate_kv_heads(params, cfg, tp)
    specs = param_specs(params)
    return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)


def cache_specs(mesh: Mesh, cache: Cache | PagedCache | None = None) -> dict[str, P] | PagedCache:
    """Cache {"k","v": [L, B, S, K, hd], "lengths": [B]}: batch over data (and fsdp, treated as
    data: `row_axes`), heads over tensor.

    For a `PagedCache` (pass it as `cache`): a PagedCache of specs, the pages [L, N, P, K, hd]
    split on their KV-head axis, the batch layout replicated."""
    if isinstance(cache, PagedCache):
        pages, rep = P(None, None, None, TENSOR, None), P()
        return dataclasses.replace(
            cache,
            k_pages=pages,
            v_pages=pages,
            slot_mapping=rep,
            page_tables=rep,
            seq_lens=rep,
            query_start_loc=rep,
        )
    b = row_axes(mesh)
    kv = P(None, b, None, TENSOR, None)
    return {"k": kv, "v": kv, "lengths": P(b)}


def init_sharded_cache(
    cfg: ModelConfig, mesh: Mesh, batch: int, max_len: int, dtype: Any = jnp.float32
) -> Cache:
    """An empty global cache [L, B, S, max(K, tp), hd], sharded by `cache_specs`."""
    cache = init_cache(cfg, batch, max_len, dtype, kv_heads=cache_kv_heads(cfg, tensor_size(mesh)))
    specs = cache_specs(mesh)
    return {n: jax.device_put(a, NamedSharding(mesh, specs[n])) for n, a in cache.items()}


# ----------------------------------------------------------------------------- forward
@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """`forward` with the signature of `jaxturbo.models.transformer.forward`, run under
    `jax.shard_map` over the mesh's `tensor` (and `data`) axes.

    Hashable, so it can be a static argument of `jax.jit` (e.g. `generate(..., model_fn=tp)`).
    Inputs are global arrays: params from `shard_params`, cache from `init_sharded_cache` (or
    any global cache of max(K, tp) heads: shard_map reshards it), tokens [B, T].
    Returns global logits [B, T, V] (replicated over tensor) and the global cache.
    """

    mesh: Mesh
    unroll: bool = False
    skip_allreduce: bool = False  # the benchmarks' desync bound (see `forward`)

    def __call__(
        self,
        params: Params,
        cfg: ModelConfig,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: Cache | None = None,
        lengths: jax.Array | None = None,
        attn_impl: str = "auto",
        return_hidden: bool = False,
        unroll: bool | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        check_mesh(cfg, self.mesh, tokens.shape[0])
        b = row_axes(self.mesh)
        unroll = self.unroll if unroll is None else unroll

        def local(params, tokens, positions, segment_ids, cache, lengths):
            return forward(
                params,
                cfg,
                tokens,
                positions=positions,
                segment_ids=segment_ids,
                cache=cache,
                lengths=lengths,
                tensor_axis=TENSOR,
                attn_impl=attn_impl,
                unroll=unroll,
                return_hidden=return_hidden,
                skip_allreduce=self.skip_allreduce,
            )

        rows = P(b, None)
        cspec = None if cache is None else cache_specs(self.mesh, cache)
        fn = jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(param_specs(params), rows, rows, rows, cspec, P(b)),
            out_specs=(P(b, None, None), cspec),
            # logits come from all_gather (equal on every tensor device, but typed as varying)
            check_vma=False,
        )
        return fn(params, tokens, positions, segment_ids, cache, lengths)
