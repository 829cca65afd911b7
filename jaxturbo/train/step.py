"""The train step: float32 master weights, low-precision compute, gradient accumulation, remat.

    state, metrics = step(state, batch)

`batch` holds [B, T] arrays: tokens, targets (next tokens, already shifted), weights (training
weight of each target; 0 for prompts, padding, document ends), segment_ids and positions (packed
rows; see `jaxturbo.data`).  The loss is `Weighted(total, count)` summed over the whole batch
(all micro-batches, all devices) before dividing, so gradient accumulation and sharding give the
same update as one big batch on one device.

Mixed precision: the parameters stay float32 (optimizer state too); the loss casts them to
`compute_dtype` on the fly, so the gradient flows back through the cast and arrives in float32.
Logits and losses are float32 (the model's LM head accumulates in float32).

Sharding: see `jaxturbo.train.sharding` (data parallel + FSDP through NamedSharding and jit;
sequence parallelism through `jaxturbo.parallel.sequence`'s shard_map; on a mesh with tensor > 1
the whole SFT loss is one shard_map over every axis, `tensor_parallel_loss`: the per-device
forward with `tensor_axis`, vocab-parallel loss, optionally with the sequence split too; a
mixture-of-experts model on a mesh is one shard_map too, `moe_parallel_loss`, with expert
parallelism over "expert" and the sequence split optional).

Mixture-of-experts models: the router loss (`forward(..., return_aux=True)["router_loss"]`, the
config's aux and z coefficients) is added to the SFT loss (`losses.add_router_loss`); metrics
carry router_aux_loss, router_z_loss, router_loss and dropped_fraction (capacity mode).

LoRA (`TrainConfig.lora_rank` > 0, `jaxturbo.models.lora`): the state's params are
{"base": frozen model params, "lora": adapters}; the step differentiates the adapters only (no
gradient is formed for a frozen weight), the optimizer holds moments for the adapters only,
and the loss sees the base with the adapters attached.  `model_params` merges them for
evaluation and export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxturbo.errors import UserError
from jaxturbo.models import lora as lora_lib
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.moe import MoEOptions
from jaxturbo.models.transformer import Params, forward, lm_head
from jaxturbo.parallel import expert as ep_lib
from jaxturbo.parallel import sequence as sp_lib
from jaxturbo.parallel.axes import BATCH_AXES, EXPERT, SEQUENCE, TENSOR, batch_devices
from jaxturbo.train import sharding as shd
from jaxturbo.train.losses import (
    CHUNKED_LOSS_GRADS,
    NORMALIZE_MODES,
    ROUTER_METRICS,
    Weighted,
    add_router_loss,
    blocked_nll_sum,
    chunk_plan,
    chunked_cross_entropy,
    cross_entropy,
    reduce_tokens,
    token_nll,
)

Batch = dict[str, jax.Array]
LossFn = Callable[[Params, Batch], tuple[Weighted, dict[str, jax.Array]]]

# Rematerialisation (activation checkpointing, Chen et al. 2016) of the whole loss; the policy
# decides, op by op and also inside the layer scan, what the backward pass may keep:
#   none  keep everything (fastest, most memory)
#   dots  keep matmul outputs, recompute the elementwise ops between them
#   full  keep only each layer's scan carry (the residual stream): recompute the layer
#   (both also keep the chunked loss's gradients, computed in its forward: recomputing them
#   would rerun the LM head, and they are small, see losses.chunked_cross_entropy)
_KEEP_LOSS_GRADS = jax.checkpoint_policies.save_only_these_names(CHUNKED_LOSS_GRADS)
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _KEEP_LOSS_GRADS
    ),
    "full": _KEEP_LOSS_GRADS,
}
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How a step computes (not what it optimises: see OptimizerConfig).

    compute_dtype: dtype of the forward/backward matmuls ("bfloat16" or "float32").
    grad_accum: micro-batches per step; the batch rows must divide by it (and by data*fsdp).
    remat: rematerialisation policy, one of REMAT_POLICIES.
    normalize: loss normalisation, "token" or "sequence" (see jaxturbo.train.losses).
    attn_impl: attention implementation passed to the model ("auto", "xla", "cudnn", ...).
    loss_chunk_tokens: 0 computes the full [B, T, V] float32 logits; N > 0 computes the LM head
        and cross-entropy about N tokens at a time (N // B positions of every row)
        (`losses.chunked_cross_entropy`), so neither the logits nor their gradient is ever
        whole in memory (larger batches fit).  With sequence parallelism the blocks run inside
        each device's piece of the sequence (no gather).
    remat_scope: "loss" applies `remat` to the whole loss (the backward recomputes the forward,
        but the layer loop's own backward still keeps every layer's residuals); "layer"
        checkpoints each layer with `remat`'s policy, so the backward holds one layer's
        residuals at a time (what large models need; the built-in SFT loss only: a custom
        `loss_fn` is wrapped whole).
    unroll_layers: a Python loop over the layers instead of lax.scan.  The scan's backward
        stacks each layer's saved activations with dynamic-update-slices and copies (about
        11% of a Llama-1B step on H100, see experiments/train/RESULTS.md); unrolled, XLA keeps
        them as separate buffers, at the price of a longer compile.
    lora_rank: 0 trains every weight; r > 0 trains LoRA adapters of rank r only
        (`jaxturbo.models.lora`), with `lora_alpha` (default r: scale 1), `lora_targets`
        ("attn", "experts", module names; None: both groups where the model has them) and
        `lora_dropout` (0 only).
    moe_capacity_factor: None trains mixture-of-experts layers dropless; f > 0 caps each
        expert at ceil(f * pairs / E) of a device's (token, choice) pairs (`models.moe`).
    moe_exchange: how expert parallelism moves tokens (`parallel.expert.EXCHANGES`; "auto":
        ragged all-to-all on GPU/TPU, padded on CPU).
    """

    compute_dtype: str = "bfloat16"
    grad_accum: int = 1
    remat: str = "none"
    normalize: str = "token"
    attn_impl: str = "auto"
    loss_chunk_tokens: int = 0
    unroll_layers: bool = False
    remat_scope: str = "loss"
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] | None = None
    lora_dropout: float = 0.0
    moe_capacity_factor: float | None = None
    moe_exchange: str = "auto"

    @property
    def lora(self) -> lora_lib.LoRAConfig | None:
        """The LoRA settings, None for full fine-tuning."""
        if self.lora_rank == 0:
            return None
        return lora_lib.LoRAConfig(
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            targets=None if self.lora_targets is None else tuple(self.lora_targets),
            dropout=self.lora_dropout,
        )

    @property
    def expert_parallel(self) -> ep_lib.ExpertParallel:
        return ep_lib.ExpertParallel(self.moe_capacity_factor, self.moe_exchange)

    def validate(self) -> None:
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise UserError(
                f"compute dtype {self.compute_dtype!r}; choose {', '.join(COMPUTE_DTYPES)}"
            )
        if self.remat not in REMAT_POLICIES:
            raise UserError(f"remat policy {self.remat!r}; choose {', '.join(REMAT_POLICIES)}")
        if self.normalize not in NORMALIZE_MODES:
            raise UserError(
                f"loss normalisation {self.normalize!r}; choose {', '.join(NORMALIZE_MODES)}"
            )
        if self.grad_accum < 1:
            raise UserError(f"grad_accum={self.grad_accum} must be >= 1")
        if self.remat_scope not in ("loss", "layer"):
            raise UserError(f"remat scope {self.remat_scope!r}; choose loss or layer")
        if self.loss_chunk_tokens < 0:
            raise UserError(
                f"loss_chunk_tokens={self.loss_chunk_tokens} must be >= 0 (0: unchunked)"
            )
        if self.lora_rank < 0:
            raise UserError(f"lora_rank={self.lora_rank} must be >= 0 (0: full fine-tuning)")
        if self.lora is not None:
            self.lora.validate()
        self.expert_parallel.validate()


class TrainState(NamedTuple):
    """Everything a step reads and writes; a checkpoint saves exactly this."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Params  # float32 master weights
    opt_state: Any  # optax state (moments shaped like params)
    rng: jax.Array  # uint32 [2] raw PRNG key, split once per step (for stochastic losses)


def sft_loss(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    attn_fn: Any = None,
    *,
    mesh: Mesh | None = None,
    sequence_parallel: str = "none",
) -> LossFn:
    """Next-token cross-entropy of the model on a packed batch.

    With `sequence_parallel` other than "none" the model runs with its token dimension split
    over `mesh`'s `sequence` axis (`jaxturbo.parallel.sequence`); the batch must then already be
    in the mode's layout (`sharding.put_batch(..., sequence_ring=r)`), and the loss, a sum over
    tokens, is computed in that order.  On a mesh with tensor > 1 the loss is
    `tensor_parallel_loss` (with or without the sequence split).
    """
    if sequence_parallel != "none" and mesh is None:
        raise UserError(
            f"sequence_parallel={sequence_parallel} needs a mesh with a "
            "sequence axis (e.g. data=2,sequence=4)"
        )
    chunk = train_cfg.loss_chunk_tokens
    layer_remat = (
        (REMAT_POLICIES[train_cfg.remat],)
        if train_cfg.remat_scope == "layer" and train_cfg.remat != "none"
        else None
    )
    if mesh is not None and mesh.shape.get(TENSOR, 1) > 1:
        return tensor_parallel_loss(
            model_cfg, train_cfg, mesh, sequence_parallel=sequence_parallel, layer_remat=layer_remat
        )
    if mesh is not None and model_cfg.moe is not None:
        return moe_parallel_loss(
            model_cfg, train_cfg, mesh, sequence_parallel=sequence_parallel, layer_remat=layer_remat
        )
    if mesh is not None and sequence_parallel == "none" and attn_fn is None:
        attn_fn = rows_local_attention(mesh, train_cfg.attn_impl)
    # chunked loss with sequence parallelism: the hidden states come back split over `sequence`
    # (in the mode's token order, as targets/weights/segment ids are); the loss is a sum over
    # tokens, so the order does not matter, and seq_shards makes its blocks run over positions
    # inside each device's piece, so every device applies the LM head to its own tokens
    seq_shards = 1 if sequence_parallel == "none" else dict(mesh.shape)[sp_lib.SEQ_AXIS]
    moe = model_cfg.moe is not None  # one device here: a mesh takes moe_parallel_loss
    moe_opts = MoEOptions(capacity_factor=train_cfg.moe_capacity_factor)

    def model_out(
        params: Params, batch: Batch, hidden: bool
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """Logits [B, T, V] float32, or with `hidden` the final normed hidden [B, T, D]; and an
        MoE model's router losses (padding, segment 0, not counted), None for a dense one."""
        if sequence_parallel == "none":
            out = forward(
                params,
                model_cfg,
                batch["tokens"],
                positions=batch["positions"],
                segment_ids=batch["segment_ids"],
                attn_impl=train_cfg.attn_impl,
                attn_fn=attn_fn,
                unroll=train_cfg.unroll_layers,
                layer_remat=layer_remat,
                return_hidden=hidden,
                return_aux=moe,
                router_mask=batch["segment_ids"] > 0 if moe else None,
                moe_options=moe_opts,
            )
            return out[0], (out[2] if moe else None)
        b, t = batch["tokens"].shape
        sp, u, _ = sp_lib.model_layout(sequence_parallel, model_cfg, mesh, batch=b, seq_len=t)
        return sp_lib.sp_forward_laid_out(
            params,
            model_cfg,
            batch["tokens"],
            batch["positions"],
            batch["segment_ids"],
            mesh,
            sp,
            u,
            return_hidden=hidden,
        ), None

    def loss(params: Params, batch: Batch) -> tuple[Weighted, dict[str, jax.Array]]:
        if chunk:
            head = params[
                "model.embed_tokens.weight" if model_cfg.tie_word_embeddings else "lm_head.weight"
            ]
            if seq_shards > 1:
                # the whole head on every device (as the SP forward's replicated parameters):
                # left fsdp-sharded, XLA gathered the hidden blocks' rows over fsdp instead
                head = jax.lax.with_sharding_constraint(head, shd.replicated(mesh))
            h, aux = model_out(params, batch, True)
            w = chunked_cross_entropy(
                h,
                head,
                batch["targets"],
                batch["weights"],
                chunk_tokens=chunk,
                segment_ids=batch["segment_ids"],
                normalize=train_cfg.normalize,
                seq_shards=seq_shards,
            )
        else:
            logits, aux = model_out(params, batch, False)
            w = cross_entropy(
                logits,
                batch["targets"],
                batch["weights"],
                segment_ids=batch["segment_ids"],
                normalize=train_cfg.normalize,
            )
        return (w, {}) if aux is None else add_router_loss(w, aux)

    return loss


class _TensorParallelModel(NamedTuple):
    """What the tensor-parallel shard_maps of one batch shape share (`_tensor_parallel_model`)."""

    mesh: Any  # the shard_map's mesh (the hybrid view for hybrid SP)
    rows: P  # [B, T] arrays: rows over (data, fsdp), tokens over the SP axes
    parts: P  # one value per (row group, sequence piece): per-device partials
    n_seq: int  # sequence pieces of a row
    param_specs: Any  # the parameters' PartitionSpecs (`sharding.train_param_specs`)
    hidden: Callable  # (local params, tokens, positions, segment_ids) ->
    #   (final normed hidden [b, s, D], local gathered params)


def _shard_map_inputs(params: Params, batch: Batch) -> tuple:
    """(params, tokens, positions, segment_ids, targets): what a parallel loss hands its shard_map
    body (the token arrays [B, T] each)."""
    return params, batch["tokens"], batch["positions"], batch["segment_ids"], batch["targets"]


def _tensor_parallel_model(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    mesh: Mesh,
    sequence_parallel: str,
    layer_remat: tuple[Any] | None,
    params: Params,
    batch: int,
    seq_len: int,
) -> _TensorParallelModel:
    """The per-device model of `tensor_parallel_loss` for a [batch, seq_len] micro-batch."""
    sizes = dict(mesh.shape)
    check_micro_batch(batch, mesh)
    run_mesh, seq, attn_fn, n_seq = mesh, None, None, 1
    if sequence_parallel != "none":
        sp, u, _ = sp_lib.model_layout(
            sequence_parallel, model_cfg, mesh, batch=batch, seq_len=seq_len
        )
        run_mesh = sp_lib.hybrid_mesh(mesh, u) if sp.mode == "hybrid" else mesh
        seq, n_seq = sp_lib.seq_axes(sp), sizes[SEQUENCE]

        def attn_fn(q, k, v, *, segment_ids=None):
            return sp_lib.local_attention(sp, q, k, v, causal=True, segment_ids=segment_ids)

    seq_parts = () if seq is None else ((seq,) if isinstance(seq, str) else seq)
    pspecs = shd.train_param_specs(params, mesh)

    def hidden(p, tok, pos, seg):
        p = shd.gather_fsdp(p, pspecs)
        h, _ = forward(
            p,
            model_cfg,
            tok,
            positions=pos,
            segment_ids=seg,
            tensor_axis=TENSOR,
            attn_impl=train_cfg.attn_impl,
            attn_fn=attn_fn,
            unroll=train_cfg.unroll_layers,
            layer_remat=layer_remat,
            return_hidden=True,
        )
        return h, p

    return _TensorParallelModel(
        run_mesh, P(BATCH_AXES, seq), P((*BATCH_AXES, *seq_parts)), n_seq, pspecs, hidden
    )


# check_vma off (as in jaxturbo.parallel.sequence): the attention kernels' outputs carry no
# varying-axes type.  Values equal over "tensor" then carry per-device cotangents that sum to
# the true one (shard_map divides an output's cotangent over the axes its spec leaves out,
# psum's transpose sums them again), which losses._weighted_nll_sum_bwd relies on too.
_CHECK_VMA = False


def tensor_parallel_loss(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    mesh: Mesh,
    *,
    sequence_parallel: str = "none",
    layer_remat: tuple[Any] | None = None,
) -> LossFn:
    """The SFT loss on a mesh with tensor > 1: one `jax.shard_map` over every mesh axis.

    Each device gathers its tensor slice of the parameters over fsdp (`sharding.gather_fsdp`;
    layout and costs in `jaxturbo.train.sharding`), runs `forward(..., tensor_axis="tensor")`
    on its rows (and, with `sequence_parallel`, its piece of the sequence, attention by
    `sequence.local_attention` over its H/t heads) up to the final norm, and computes the
    next-token NLL of its tokens vocab-parallel from its [V/t, D] slice of the LM head
    (`losses.token_nll` with `tensor_axis`; with `loss_chunk_tokens`, `losses.blocked_nll_sum`
    block by block).  Unchunked, the per-token NLL [B, T] leaves the shard_map and is reduced
    outside (any normalisation); chunked, the per-token coefficients of the normalisation go in
    and each device's weighted sum comes out.  Works for every residual mode (`ladder` overlaps
    each all-reduce with the next module in the forward).  Params: global arrays laid out by
    `sharding.param_shardings` (cast to the compute dtype); batch: [B, T] arrays as
    `sharding.put_batch` places them.
    """
    chunk = train_cfg.loss_chunk_tokens
    head_name = "model.embed_tokens.weight" if model_cfg.tie_word_embeddings else "lm_head.weight"

    def loss(params: Params, batch: Batch) -> tuple[Weighted, dict[str, jax.Array]]:
        b, t = batch["tokens"].shape
        m = _tensor_parallel_model(
            model_cfg, train_cfg, mesh, sequence_parallel, layer_remat, params, b, t
        )
        inputs = _shard_map_inputs(params, batch)
        if chunk:
            coef, count, block = chunk_plan(
                batch["weights"], batch["segment_ids"], train_cfg.normalize, chunk, m.n_seq
            )

            def body(p, tok, pos, seg, tgt, cf):
                h, p = m.hidden(p, tok, pos, seg)
                return blocked_nll_sum(h, p[head_name], tgt, cf, block=block, tensor_axis=TENSOR)[
                    None
                ]

            totals = jax.shard_map(
                body,
                mesh=m.mesh,
                in_specs=(m.param_specs,) + (m.rows,) * 5,
                out_specs=m.parts,
                check_vma=_CHECK_VMA,
            )(*inputs, coef)
            return Weighted(jnp.sum(totals), count), {}

        def body(p, tok, pos, seg, tgt):
            h, p = m.hidden(p, tok, pos, seg)
            return token_nll(lm_head(p, model_cfg, h), tgt, tensor_axis=TENSOR)

        nll = jax.shard_map(
            body,
            mesh=m.mesh,
            in_specs=(m.param_specs,) + (m.rows,) * 4,
            out_specs=m.rows,
            check_vma=_CHECK_VMA,
        )(*inputs)
        return reduce_tokens(
            nll, batch["weights"], segment_ids=batch["segment_ids"], normalize=train_cfg.normalize
        ), {}

    return loss


def check_micro_batch(batch: int, mesh: Mesh) -> None:
    """The rows of a micro-batch must split over the batch axes (data x fsdp x expert)."""
    n_rows = batch_devices(dict(mesh.shape))
    if batch % n_rows:
        raise UserError(
            f"a micro-batch of {batch} rows is not divisible by data x fsdp x expert "
            f"= {n_rows}; use a batch size that is a multiple of {n_rows} x grad_accum"
        )


def moe_parallel_loss(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    mesh: Mesh,
    *,
    sequence_parallel: str = "none",
    layer_remat: tuple[Any] | None = None,
) -> LossFn:
    """The SFT loss of a mixture-of-experts model on a mesh (tensor = 1): one `jax.shard_map`
    over every mesh axis.

    Each device gathers its parameters over fsdp (`sharding.data_param_specs`: expert stacks
    keep their E/ep experts of the `expert` axis), runs `forward` on its rows (split over data,
    fsdp and expert) and, with `sequence_parallel`, its piece of the sequence (attention by
    `sequence.local_attention`), the MoE layers through `parallel.expert`'s dispatch (ep > 1;
    `sorted_dispatch` on its own tokens when ep = 1) with the router statistics summed over
    every token axis, so the router loss is the whole batch's; the next-token NLL of its tokens
    (chunked with `loss_chunk_tokens`) and the router losses come out, and the router loss is
    added (`losses.add_router_loss`).  Params may carry LoRA adapters (`models.lora.attach`).
    """
    chunk = train_cfg.loss_chunk_tokens
    head_name = "model.embed_tokens.weight" if model_cfg.tie_word_embeddings else "lm_head.weight"
    ep = mesh.shape.get(EXPERT, 1)
    dispatch = (
        None if ep == 1 else ep_lib.expert_parallel_dispatch(ep, exchange=train_cfg.moe_exchange)
    )

    def loss(params: Params, batch: Batch) -> tuple[Weighted, dict[str, jax.Array]]:
        b, t = batch["tokens"].shape
        check_micro_batch(b, mesh)
        run_mesh, seq, attn_fn, n_seq = mesh, None, None, 1
        if sequence_parallel != "none":
            sp, u, _ = sp_lib.model_layout(sequence_parallel, model_cfg, mesh, batch=b, seq_len=t)
            run_mesh = sp_lib.hybrid_mesh(mesh, u) if sp.mode == "hybrid" else mesh
            seq, n_seq = sp_lib.seq_axes(sp), mesh.shape[SEQUENCE]

            def attn_fn(q, k, v, *, segment_ids=None):
                return sp_lib.local_attention(sp, q, k, v, causal=True, segment_ids=segment_ids)

        seq_parts = () if seq is None else ((seq,) if isinstance(seq, str) else seq)
        token_axes = (*BATCH_AXES, *seq_parts)
        rows, parts = P(BATCH_AXES, seq), P(token_axes)
        pspecs = shd.data_param_specs(params, mesh)
        opts = MoEOptions(dispatch, train_cfg.moe_capacity_factor, token_axes)

        def hidden(p, tok, pos, seg):
            p = shd.gather_fsdp(p, pspecs)
            h, _, aux = forward(
                p,
                model_cfg,
                tok,
                positions=pos,
                segment_ids=seg,
                attn_impl=train_cfg.attn_impl,
                attn_fn=attn_fn,
                unroll=train_cfg.unroll_layers,
                layer_remat=layer_remat,
                return_hidden=True,
                return_aux=True,
                router_mask=seg > 0,
                moe_options=opts,
            )
            return h, p, {k: aux[k] for k in ROUTER_METRICS}

        inputs = _shard_map_inputs(params, batch)
        if chunk:
            coef, count, block = chunk_plan(
                batch["weights"], batch["segment_ids"], train_cfg.normalize, chunk, n_seq
            )

            def body(p, tok, pos, seg, tgt, cf):
                h, p, aux = hidden(p, tok, pos, seg)
                return blocked_nll_sum(h, p[head_name], tgt, cf, block=block)[None], aux

            totals, aux = jax.shard_map(
                body,
                mesh=run_mesh,
                in_specs=(pspecs,) + (rows,) * 5,
                out_specs=(parts, P()),
                check_vma=_CHECK_VMA,
            )(*inputs, coef)
            return add_router_loss(Weighted(jnp.sum(totals), count), aux)

        def body(p, tok, pos, seg, tgt):
            h, p, aux = hidden(p, tok, pos, seg)
            return token_nll(lm_head(p, model_cfg, h), tgt), aux

        nll, aux = jax.shard_map(
            body,
            mesh=run_mesh,
            in_specs=(pspecs,) + (rows,) * 4,
            out_specs=(rows, P()),
            check_vma=_CHECK_VMA,
        )(*inputs)
        return add_router_loss(
            reduce_tokens(
                nll,
                batch["weights"],
                segment_ids=batch["segment_ids"],
                normalize=train_cfg.normalize,
            ),
            aux,
        )

    return loss


def tensor_parallel_logits(
    model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh, *, sequence_parallel: str = "none"
) -> Callable[[Params, Batch], jax.Array]:
    """logits(params, batch) -> [B, T, V] float32 for a custom `loss_fn` on a tensor mesh: the
    model of `tensor_parallel_loss` (explicit Megatron collectives, fsdp gathered inside),
    its logits left vocab-sharded over "tensor" as a global array, so that a loss reducing
    over V (log-softmax, entropy) is partitioned into per-slice sums by XLA rather than
    gathering them.  batch: tokens, positions, segment_ids [B, T] (SP: in the mode's layout;
    the logits come back in that order)."""

    def logits(params: Params, batch: Batch) -> jax.Array:
        b, t = batch["tokens"].shape
        m = _tensor_parallel_model(
            model_cfg, train_cfg, mesh, sequence_parallel, None, params, b, t
        )

        def body(p, tok, pos, seg):
            h, p = m.hidden(p, tok, pos, seg)
            return lm_head(p, model_cfg, h)

        return jax.shard_map(
            body,
            mesh=m.mesh,
            in_specs=(m.param_specs,) + (m.rows,) * 3,
            out_specs=P(*m.rows, TENSOR),
            check_vma=_CHECK_VMA,
        )(params, batch["tokens"], batch["positions"], batch["segment_ids"])

    return logits


def rows_local_attention(mesh: Mesh, implementation: str) -> Any:
    """Causal attention with each device attending over its own batch rows (shard_map over the
    batch axes), for `forward`'s `attn_fn`.

    Under FSDP the step is auto-sharded, and cuDNN's custom partitioner failed to partition its
    attention call there (Llama-8B, 4x H100, experiments/train/RESULTS.md); inside shard_map the
    kernel only ever sees local arrays.  q [B, T, H, D], k/v [B, T, K, D], segment_ids [B, T];
    when the batch axes (data*fsdp*expert) do not divide B the call is left to the
    auto-sharding.
    """
    from jax.sharding import PartitionSpec as P

    import pallas_kernels

    rows = P(shd.BATCH_AXES)
    n_rows = batch_devices(dict(mesh.shape))

    def local(q, k, v, segment_ids):
        return pallas_kernels.attention(
            q, k, v, causal=True, segment_ids=segment_ids, implementation=implementation
        )

    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(rows, rows, rows, rows), out_specs=rows, check_vma=False
    )

    def attn(
        q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        if segment_ids is None:
            segment_ids = jnp.ones(q.shape[:2], jnp.int32)
        if q.shape[0] % n_rows:  # fewer rows than devices (small micro-batches): auto-sharding
            return local(q, k, v, segment_ids)
        return sharded(q, k, v, segment_ids)

    return attn


def is_lora_state(params: Any) -> bool:
    """Whether a state's params are LoRA's {"base": frozen params, "lora": adapters}."""
    return isinstance(params, dict) and set(params) == {"base", "lora"}


def trainable(params: Any) -> Any:
    """The part of a state's params the optimizer updates: the adapters under LoRA, else all."""
    return params["lora"] if is_lora_state(params) else params


def model_params(params: Any, lora: lora_lib.LoRAConfig | None) -> Params:
    """A state's params as a plain model (for evaluation and export): under LoRA the base with
    every adapter merged in (`models.lora.merge`), else the params themselves."""
    if not is_lora_state(params):
        return params
    if lora is None:
        raise ValueError("LoRA params need the LoRAConfig they were trained with (its scale)")
    return lora_lib.merge(params["base"], params["lora"], lora)


def init_state(
    params: Params,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    seed: int = 0,
    lora: lora_lib.LoRAConfig | None = None,
) -> TrainState:
    """A step-0 state: params cast to float32 and (with a mesh) laid out for FSDP.

    lora: train adapters only (`TrainConfig.lora`): params become {"base": params in their own
    dtype (frozen), "lora": fresh adapters (float32, drawn from `seed`)}; the optimizer's state
    covers the adapters only."""
    if lora is None:
        # a copy: steps donate it
        params = jax.tree.map(lambda x: jnp.array(x, jnp.float32), params)
    else:
        adapters = lora_lib.init_adapters(params, lora, jax.random.fold_in(jax.random.key(seed), 1))
        params = {"base": jax.tree.map(jnp.array, params), "lora": adapters}
    rng = jax.random.key_data(jax.random.key(seed))
    if mesh is None:
        return TrainState(jnp.int32(0), params, optimizer.init(trainable(params)), rng)
    sh = state_shardings(params, optimizer, mesh)
    params = jax.device_put(params, sh.params)
    opt_state = jax.jit(optimizer.init, out_shardings=sh.opt_state)(trainable(params))
    return TrainState(
        jax.device_put(jnp.int32(0), sh.step), params, opt_state, jax.device_put(rng, sh.rng)
    )


def state_shardings(
    params: Params, optimizer: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
    """A TrainState of NamedShardings: params on fsdp (experts on `expert`), moments like their
    params, rest replicated.  LoRA params: base and adapters each laid out so."""
    shd.check_training_mesh(mesh)  # the parameter layout does not depend on the SP mode
    if is_lora_state(params):
        p_sh = {k: shd.param_shardings(v, mesh) for k, v in params.items()}
    else:
        p_sh = shd.param_shardings(params, mesh)
    rep = shd.replicated(mesh)
    abstract = jax.eval_shape(optimizer.init, trainable(params))
    opt_sh = optax.tree_map_params(
        optimizer,
        lambda _, s: s,
        abstract,
        trainable(p_sh),
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )
    return TrainState(rep, p_sh, opt_sh, rep)


def _split_micro(x: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [n, B/n, ...] taking rows n apart, so that each device's contiguous block of
    rows feeds every micro-batch equally and no rows move between devices."""
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)


def make_train_step(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    optimizer: optax.GradientTransformation,
    *,
    loss_fn: LossFn | None = None,
    mesh: Mesh | None = None,
    params: Params | None = None,
    donate: bool = True,
    sequence_parallel: str = "none",
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Build the jitted step.  With a mesh, `params` (arrays or shapes) fixes the shardings.

    sequence_parallel: "none", "ulysses", "ring" or "hybrid" over the mesh's `sequence` axis
    (see `sft_loss`; feed batches through `sharding.put_batch(..., sequence_ring=r)`).  A custom
    `loss_fn` is used as given and must split the sequence itself.
    On a mesh with tensor > 1 the SFT loss is `tensor_parallel_loss`; a custom `loss_fn` (RL,
    distillation) that calls `forward` on global arrays is partitioned by XLA from the same
    parameter layout (correct, without the explicit Megatron collectives); one that takes its
    logits from `tensor_parallel_logits` runs the explicit tensor-parallel model.

    A mixture-of-experts model on a mesh takes `moe_parallel_loss` (expert parallelism when the
    mesh's expert axis is > 1).  With `train_cfg.lora_rank` > 0 the state must come from
    `init_state(..., lora=train_cfg.lora)` and `params` be its params ({"base", "lora"}).

    loss_fn(compute_params, micro_batch) -> (Weighted, aux) replaces the SFT cross-entropy
    (e.g. distillation); compute_params carry the adapters under LoRA; aux values are summed
    over micro-batches.
    Metrics: loss, count (the loss denominator), grad_norm (before clipping; of the adapters
    under LoRA), and an MoE model's router metrics (module docstring).
    """
    train_cfg.validate()
    lora = train_cfg.lora
    if mesh is not None:
        shd.check_training_mesh(mesh, sequence_parallel, model_cfg)
        if lora is not None and mesh.shape.get(TENSOR, 1) > 1:
            raise UserError(
                f"LoRA training with tensor={mesh.shape[TENSOR]} is not implemented; "
                "put those devices on the data, fsdp, expert or sequence axis"
            )
    custom_loss = loss_fn is not None
    loss_fn = loss_fn or sft_loss(
        model_cfg, train_cfg, mesh=mesh, sequence_parallel=sequence_parallel
    )
    dtype = COMPUTE_DTYPES[train_cfg.compute_dtype]
    policy = REMAT_POLICIES[train_cfg.remat]
    accum = train_cfg.grad_accum

    def total_of(p: Params, micro: Batch, frozen: Params | None):
        """p: what is differentiated (the adapters under LoRA); frozen: the LoRA base."""
        pc = jax.tree.map(lambda x: x.astype(dtype), p)
        if frozen is not None:
            pc = lora_lib.attach(jax.tree.map(lambda x: x.astype(dtype), frozen), pc, lora)
        w, aux = loss_fn(pc, micro)
        return w.total, (w, aux)

    # the layer scope lives in sft_loss's own forward (tensor-parallel and MoE too); a custom
    # loss or the sequence-parallel forward of a dense tensor=1 model does not take it, so those
    # are checkpointed whole
    own_layers = mesh is not None and (mesh.shape.get(TENSOR, 1) > 1 or model_cfg.moe is not None)
    if policy is not None and (
        train_cfg.remat_scope == "loss"
        or custom_loss
        or (sequence_parallel != "none" and not own_layers)
    ):
        total_of = jax.checkpoint(total_of, policy=policy)
    grad_fn = jax.grad(total_of, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        train_p = trainable(state.params)
        frozen = state.params["base"] if lora is not None else None
        if accum == 1:
            grads, (w, aux) = grad_fn(train_p, batch, frozen)
        else:
            micro = jax.tree.map(lambda x: _split_micro(x, accum), batch)
            zero_g = jax.tree.map(jnp.zeros_like, train_p)
            _, (w0, aux0) = jax.eval_shape(
                grad_fn, train_p, jax.tree.map(lambda x: x[0], micro), frozen
            )
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (w0, aux0))

            def body(carry, mb):
                g_acc, acc = carry
                g, wa = grad_fn(train_p, mb, frozen)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, acc, wa)), None

            (grads, (w, aux)), _ = jax.lax.scan(body, (zero_g, zeros), micro)
        # d(total/count)/dp with count a constant of the data: divide the summed gradient once
        grads = jax.tree.map(lambda g: g / jnp.maximum(w.count, 1.0), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, train_p)
        params = optax.apply_updates(train_p, updates)
        if lora is not None:
            params = {"base": state.params["base"], "lora": params}
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
        metrics = {
            "loss": w.value(),
            "count": w.count,
            "grad_norm": optax.global_norm(grads),
            **aux,
        }
        return TrainState(state.step + 1, params, opt_state, rng), metrics

    donate_args = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_args)
    if params is None:
        raise ValueError("make_train_step with a mesh needs `params` (arrays or shapes)")
    sh = state_shardings(params, optimizer, mesh)
    batch_sh = shd.batch_sharding(mesh, split_sequence=sequence_parallel != "none")
    return jax.jit(
        step,
        in_shardings=(sh, batch_sh),
        out_shardings=(sh, shd.replicated(mesh)),
        donate_argnums=donate_args,
    )
