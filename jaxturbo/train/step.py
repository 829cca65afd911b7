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
sequence parallelism through `jaxturbo.parallel.sequence`'s shard_map).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.transformer import Params, forward
from jaxturbo.parallel import sequence as sp_lib
from jaxturbo.train import sharding as shd
from jaxturbo.train.losses import (CHUNKED_LOSS_GRADS, NORMALIZE_MODES, Weighted,
                                   chunked_cross_entropy, cross_entropy)

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
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _KEEP_LOSS_GRADS),
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
        and cross-entropy about N tokens at a time (N // B positions of every row) (`losses.chunked_cross_entropy`), so neither the
        logits nor their gradient is ever whole in memory (larger batches fit).  With sequence
        parallelism the blocks run inside each device's piece of the sequence (no gather).
    remat_scope: "loss" applies `remat` to the whole loss (the backward recomputes the forward,
        but the layer loop's own backward still keeps every layer's residuals); "layer"
        checkpoints each layer with `remat`'s policy, so the backward holds one layer's
        residuals at a time (what large models need; the built-in SFT loss only: a custom
        `loss_fn` is wrapped whole).
    unroll_layers: a Python loop over the layers instead of lax.scan.  The scan's backward
        stacks each layer's saved activations with dynamic-update-slices and copies (about
        11% of a Llama-1B step on H100, see experiments/train/README.md); unrolled, XLA keeps
        them as separate buffers, at the price of a longer compile.
    """

    compute_dtype: str = "bfloat16"
    grad_accum: int = 1
    remat: str = "none"
    normalize: str = "token"
    attn_impl: str = "auto"
    loss_chunk_tokens: int = 0
    unroll_layers: bool = False
    remat_scope: str = "loss"

    def validate(self) -> None:
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise UserError(f"compute dtype {self.compute_dtype!r}; choose {', '.join(COMPUTE_DTYPES)}")
        if self.remat not in REMAT_POLICIES:
            raise UserError(f"remat policy {self.remat!r}; choose {', '.join(REMAT_POLICIES)}")
        if self.normalize not in NORMALIZE_MODES:
            raise UserError(f"loss normalisation {self.normalize!r}; choose {', '.join(NORMALIZE_MODES)}")
        if self.grad_accum < 1:
            raise UserError(f"grad_accum={self.grad_accum} must be >= 1")
        if self.remat_scope not in ("loss", "layer"):
            raise UserError(f"remat scope {self.remat_scope!r}; choose loss or layer")
        if self.loss_chunk_tokens < 0:
            raise UserError(f"loss_chunk_tokens={self.loss_chunk_tokens} must be >= 0 (0: unchunked)")


class TrainState(NamedTuple):
    """Everything a step reads and writes; a checkpoint saves exactly this."""

    step: jax.Array        # int32 scalar: optimizer steps taken
    params: Params         # float32 master weights
    opt_state: Any         # optax state (moments shaped like params)
    rng: jax.Array         # uint32 [2] raw PRNG key, split once per step (for stochastic losses)


def sft_loss(model_cfg: ModelConfig, train_cfg: TrainConfig, attn_fn: Any = None, *,
             mesh: Mesh | None = None, sequence_parallel: str = "none") -> LossFn:
    """Next-token cross-entropy of the model on a packed batch.

    With `sequence_parallel` other than "none" the model runs with its token dimension split
    over `mesh`'s `sequence` axis (`jaxturbo.parallel.sequence`); the batch must then already be
    in the mode's layout (`sharding.put_batch(..., sequence_ring=r)`), and the loss, a sum over
    tokens, is computed in that order.
    """
    if sequence_parallel != "none" and mesh is None:
        raise UserError(f"--sequence-parallel {sequence_parallel} needs a mesh with a "
                        "sequence axis (e.g. --mesh data=2,sequence=4)")
    chunk = train_cfg.loss_chunk_tokens
    layer_remat = ((REMAT_POLICIES[train_cfg.remat],) if train_cfg.remat_scope == "layer"
                   and train_cfg.remat != "none" else None)
    if mesh is not None and sequence_parallel == "none" and attn_fn is None:
        attn_fn = rows_local_attention(mesh, train_cfg.attn_impl)
    # chunked loss with sequence parallelism: the hidden states come back split over `sequence`
    # (in the mode's token order, as targets/weights/segment ids are); the loss is a sum over
    # tokens, so the order does not matter, and seq_shards makes its blocks run over positions
    # inside each device's piece, so every device applies the LM head to its own tokens
    seq_shards = (1 if sequence_parallel == "none"
                  else dict(zip(mesh.axis_names, mesh.devices.shape))[sp_lib.SEQ_AXIS])

    def model_out(params: Params, batch: Batch, hidden: bool) -> jax.Array:
        """Logits [B, T, V] float32, or with `hidden` the final normed hidden [B, T, D]."""
        if sequence_parallel == "none":
            return forward(params, model_cfg, batch["tokens"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"], attn_impl=train_cfg.attn_impl,
                           attn_fn=attn_fn, unroll=train_cfg.unroll_layers,
                           layer_remat=layer_remat, return_hidden=hidden)[0]
        b, t = batch["tokens"].shape
        sp, u, _ = sp_lib.model_layout(sequence_parallel, model_cfg, mesh, batch=b, seq_len=t)
        return sp_lib.sp_forward_laid_out(params, model_cfg, batch["tokens"], batch["positions"],
                                          batch["segment_ids"], mesh, sp, u,
                                          return_hidden=hidden)

    def loss(params: Params, batch: Batch) -> tuple[Weighted, dict[str, jax.Array]]:
        if chunk:
            head = params["model.embed_tokens.weight" if model_cfg.tie_word_embeddings
                          else "lm_head.weight"]
            if seq_shards > 1:
                # the whole head on every device (as the SP forward's replicated parameters):
                # left fsdp-sharded, XLA gathered the hidden blocks' rows over fsdp instead
                head = jax.lax.with_sharding_constraint(head, shd.replicated(mesh))
            return chunked_cross_entropy(model_out(params, batch, True), head, batch["targets"],
                                         batch["weights"], chunk_tokens=chunk,
                                         segment_ids=batch["segment_ids"],
                                         normalize=train_cfg.normalize,
                                         seq_shards=seq_shards), {}  # type: ignore[arg-type]
        return cross_entropy(model_out(params, batch, False), batch["targets"], batch["weights"],
                             segment_ids=batch["segment_ids"],
                             normalize=train_cfg.normalize), {}  # type: ignore[arg-type]
    return loss


def rows_local_attention(mesh: Mesh, implementation: str) -> Any:
    """Causal attention with each device attending over its own batch rows (shard_map over the
    batch axes), for `forward`'s `attn_fn`.

    Under FSDP the step is auto-sharded, and cuDNN's custom partitioner failed to partition its
    attention call there (Llama-8B, 4x H100, experiments/train/README.md); inside shard_map the
    kernel only ever sees local arrays.  q [B, T, H, D], k/v [B, T, K, D], segment_ids [B, T];
    when data*fsdp does not divide B the call is left to the auto-sharding.
    """
    import pallas_kernels
    from jax.sharding import PartitionSpec as P

    rows = P(shd.BATCH_AXES)
    n_rows = mesh.shape["data"] * mesh.shape["fsdp"]

    def local(q, k, v, segment_ids):
        return pallas_kernels.attention(q, k, v, causal=True, segment_ids=segment_ids,
                                        implementation=implementation)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, rows), out_specs=rows,
                            check_vma=False)

    def attn(q: jax.Array, k: jax.Array, v: jax.Array,
             segment_ids: jax.Array | None = None) -> jax.Array:
        if segment_ids is None:
            segment_ids = jnp.ones(q.shape[:2], jnp.int32)
        if q.shape[0] % n_rows:  # fewer rows than devices (small micro-batches): auto-sharding
            return local(q, k, v, segment_ids)
        return sharded(q, k, v, segment_ids)

    return attn


def init_state(params: Params, optimizer: optax.GradientTransformation, *,
               mesh: Mesh | None = None, seed: int = 0) -> TrainState:
    """A step-0 state: params cast to float32 and (with a mesh) laid out for FSDP."""
    params = jax.tree.map(lambda x: jnp.array(x, jnp.float32), params)  # a copy: steps donate it
    rng = jax.random.key_data(jax.random.key(seed))
    if mesh is None:
        return TrainState(jnp.int32(0), params, optimizer.init(params), rng)
    sh = state_shardings(params, optimizer, mesh)
    params = jax.device_put(params, sh.params)
    opt_state = jax.jit(optimizer.init, out_shardings=sh.opt_state)(params)
    return TrainState(jax.device_put(jnp.int32(0), sh.step), params, opt_state,
                      jax.device_put(rng, sh.rng))


def state_shardings(params: Params, optimizer: optax.GradientTransformation,
                    mesh: Mesh) -> TrainState:
    """A TrainState of NamedShardings: params on fsdp, moments like their params, rest replicated."""
    shd.check_training_mesh(mesh)  # the parameter layout does not depend on the SP mode
    p_sh = shd.param_shardings(params, mesh)
    rep = shd.replicated(mesh)
    abstract = jax.eval_shape(optimizer.init, params)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract, p_sh,
                                   transform_non_params=lambda _: rep,
                                   is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return TrainState(rep, p_sh, opt_sh, rep)


def _split_micro(x: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [n, B/n, ...] taking rows n apart, so that each device's contiguous block of
    rows feeds every micro-batch equally and no rows move between devices."""
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)


def make_train_step(model_cfg: ModelConfig, train_cfg: TrainConfig,
                    optimizer: optax.GradientTransformation, *, loss_fn: LossFn | None = None,
                    mesh: Mesh | None = None, params: Params | None = None,
                    donate: bool = True, sequence_parallel: str = "none",
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Build the jitted step.  With a mesh, `params` (arrays or shapes) fixes the shardings.

    sequence_parallel: "none", "ulysses", "ring" or "hybrid" over the mesh's `sequence` axis
    (see `sft_loss`; feed batches through `sharding.put_batch(..., sequence_ring=r)`).  A custom
    `loss_fn` is used as given and must split the sequence itself.

    loss_fn(compute_params, micro_batch) -> (Weighted, aux) replaces the SFT cross-entropy
    (e.g. distillation); aux values are summed over micro-batches.
    Metrics: loss, count (the loss denominator), grad_norm (before clipping).
    """
    train_cfg.validate()
    if mesh is not None:
        shd.check_training_mesh(mesh, sequence_parallel)
    custom_loss = loss_fn is not None
    loss_fn = loss_fn or sft_loss(model_cfg, train_cfg, mesh=mesh,
                                  sequence_parallel=sequence_parallel)
    dtype = COMPUTE_DTYPES[train_cfg.compute_dtype]
    policy = REMAT_POLICIES[train_cfg.remat]
    accum = train_cfg.grad_accum

    def total_of(p: Params, micro: Batch):
        pc = jax.tree.map(lambda x: x.astype(dtype), p)
        w, aux = loss_fn(pc, micro)
        return w.total, (w, aux)

    # the layer scope lives in sft_loss's own forward; a custom loss or the sequence-parallel
    # forward does not take it, so those are checkpointed whole
    if policy is not None and (train_cfg.remat_scope == "loss" or custom_loss
                               or sequence_parallel != "none"):
        total_of = jax.checkpoint(total_of, policy=policy)
    grad_fn = jax.grad(total_of, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        if accum == 1:
            grads, (w, aux) = grad_fn(state.params, batch)
        else:
            micro = jax.tree.map(lambda x: _split_micro(x, accum), batch)
            zero_g = jax.tree.map(jnp.zeros_like, state.params)
            _, (w0, aux0) = jax.eval_shape(grad_fn, state.params,
                                           jax.tree.map(lambda x: x[0], micro))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (w0, aux0))

            def body(carry, mb):
                g_acc, acc = carry
                g, wa = grad_fn(state.params, mb)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, acc, wa)), None

            (grads, (w, aux)), _ = jax.lax.scan(body, (zero_g, zeros), micro)
        # d(total/count)/dp with count a constant of the data: divide the summed gradient once
        grads = jax.tree.map(lambda g: g / jnp.maximum(w.count, 1.0), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
        metrics = {"loss": w.value(), "count": w.count, "grad_norm": optax.global_norm(grads),
                   **aux}
        return TrainState(state.step + 1, params, opt_state, rng), metrics

    donate_args = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_args)
    if params is None:
        raise ValueError("make_train_step with a mesh needs `params` (arrays or shapes)")
    sh = state_shardings(params, optimizer, mesh)
    batch_sh = shd.batch_sharding(mesh, split_sequence=sequence_parallel != "none")
    return jax.jit(step, in_shardings=(sh, batch_sh),
                   out_shardings=(sh, shd.replicated(mesh)), donate_argnums=donate_args)
