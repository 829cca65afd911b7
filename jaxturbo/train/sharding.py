"""How training state and batches are laid out on the mesh (data, fsdp, expert, sequence, tensor).

Design: the train step is one `jax.jit` whose inputs and outputs carry `NamedSharding`s on the
jaxturbo mesh (`AxisType.Auto` axes, see `jaxturbo.parallel.mesh`).  Without a tensor axis
XLA's SPMD partitioner inserts the collectives: ZeRO-3 / FSDP (Rajbhandari et al., 2020):

  batch       rows split over ("data", "fsdp", "expert"): each device sees B / (data * fsdp *
              expert) rows (`axes.BATCH_AXES`; "expert" is a data axis outside MoE layers).
  params      each leaf split over "fsdp" along one dimension (below); replicated over "data".
  opt state   Adam moments take their parameter's sharding; counters are replicated.
  tokens      with sequence parallelism (`--sequence-parallel`), the token dimension of the
              batch is split over "sequence" too, in zigzag order for causal ring/hybrid
              (`zigzag_rows`); attention communicates as `jaxturbo.parallel.sequence` states,
              and inside its shard_map the parameters are all-gathered whole.

Communication per step (P parameters, n = fsdp size): the forward and the backward each
all-gather the parameters (2 * P * (n-1)/n elements received per device), the gradient is
reduce-scattered over "fsdp" (P * (n-1)/n) and all-reduced over "data" (2 * P/n * (d-1)/d).
Memory per device: params + grads + 2 moments = 16 P / n bytes in float32, plus activations.

Which dimension is split: stacked layer weights [L, out, in] are never split on L (the layer
scan slices it), but on the largest of the other dimensions that `fsdp` divides; embeddings
[V, D] on D (see param_shardings), the LM head on its largest dimension; a leaf no dimension
of which divides stays replicated (norm scales of odd size), which costs memory only.

Tensor parallelism (a mesh with tensor = t > 1): the whole loss runs in one `jax.shard_map`
over every mesh axis (`jaxturbo.train.step`), each device running the per-device
`forward(..., tensor_axis="tensor")` on the Megatron layout of `jaxturbo.parallel.tensor`
(column-parallel q/k/v and gate/up, row-parallel o/down, vocab-parallel embedding and LM head,
norms replicated), with the loss vocab-parallel (`losses.token_nll`, `blocked_nll_sum`).
  params      the tensor split of the table, and on top of it "fsdp" on the other dimension of
              each weight (`tensor_fsdp_spec`): column [L, out/t, D/n], row [L, D/n, in/t],
              embedding and LM head [V/t, D/n], norms [L, D/n]; a leaf whose only free
              dimension is its tensor one (biases [L, out]) splits that one over
              ("tensor", "fsdp"), tensor-major.  Inside the shard_map `gather_fsdp`
              all-gathers each leaf over "fsdp" (explicitly, so its transpose is a
              reduce-scatter), giving every device its whole tensor slice.
  batch       as above: rows over (data, fsdp), tokens over "sequence"; replicated over
              "tensor" (every tensor device of a row group reads the same tokens).
Communication per step, besides the FSDP terms above with P / t for P (the gradient is
reduce-scattered over "fsdp" and all-reduced over "data" and "sequence" in tensor slices):
  tensor      per layer two all-reduces of the [b, s, D] activations in the forward (after
              o_proj and down_proj; `ladder` delays each behind the next module, `parallel`
              fuses them) and two in the backward (before the column-parallel inputs), plus
              one each way for the embedding; the loss adds a pmax and two psums of [b, s]
              values (the logits [b, s, V] are never gathered).  b, s: a device's rows and
              tokens.  Norm weights, replicated over "tensor", get their gradient all-reduced
              over it (D elements each).
  sequence    as `jaxturbo.parallel.sequence` states, on each tensor device's H/t heads
              (Ulysses needs sequence | H/t).
Memory per device: 16 P / (t n) bytes of float32 state, plus the gathered compute-dtype copy of
its tensor slice (P / t elements, and its gradient): the whole slice is gathered once per step,
not layer by layer, since the layer scan inside `forward` reads the stacked weights.
Training needs t | KV heads (`parallel.tensor.check_tensor_training`); the batch rows of a
micro-batch must divide by data * fsdp (* expert).

Mixture-of-experts models (tensor = 1) train in one `jax.shard_map` over every axis too
(`jaxturbo.train.step.moe_parallel_loss`), with expert parallelism over "expert"
(`jaxturbo.parallel.expert`):
  params      expert stacks [L, E, F, D] split on E over "expert" and on their largest other
              dimension over "fsdp" (`expert_spec`); every other leaf as without experts (fsdp
              only; replicated over "expert").  LoRA adapters alike (expert ones [L, E, r, in]
              on E).  Inside, `gather_fsdp` gathers the fsdp splits; each device keeps E/ep
              experts.
  batch       rows over (data, fsdp, expert): "expert" is a data axis for every other layer.
Communication per MoE layer: an all_gather of E counts, and two token exchanges each way (the
rows to their experts' devices and back; forward and backward), about 2 k b s D elements per
device and direction when dropless and ragged.  The expert weights' gradient is all-reduced
over "data" and "sequence" only (E/ep experts per device).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxturbo.errors import UserError
from jaxturbo.parallel import tensor as tp_lib
from jaxturbo.parallel.axes import BATCH_AXES, EXPERT, FSDP, TENSOR, batch_devices
from jaxturbo.parallel.expert import check_expert_mesh, expert_dim
from jaxturbo.parallel.sequence import MODES as SP_MODES
from jaxturbo.parallel.sequence import zigzag_permutation


def check_training_mesh(
    mesh: Mesh, sequence_parallel: str | None = None, model_cfg: Any = None
) -> None:
    """Training shards over data, fsdp, tensor and (with sequence parallelism) sequence; say
    what to change otherwise.  `sequence_parallel=None` checks only what the parameter layout
    needs; with `model_cfg` the tensor size is checked against the model
    (`parallel.tensor.check_tensor_training`)."""
    if model_cfg is not None:
        tp_lib.check_tensor_training(model_cfg, mesh.shape.get(TENSOR, 1))
        ep = mesh.shape.get(EXPERT, 1)
        if model_cfg.moe is not None and ep > 1:
            check_expert_mesh(model_cfg.moe.num_experts, ep)
    if sequence_parallel is None:
        return
    seq = mesh.shape.get("sequence", 1)
    if sequence_parallel not in SP_MODES:
        raise UserError(
            f"sequence_parallel={sequence_parallel!r} is unknown; choose one of "
            f"{', '.join(SP_MODES)}"
        )
    if seq > 1 and sequence_parallel == "none":
        raise UserError(
            f"the mesh has sequence={seq} but sequence_parallel is none; choose one of "
            f"{', '.join(SP_MODES[1:])}, or put those devices on the data or fsdp axis"
        )
    if seq == 1 and sequence_parallel != "none":
        raise UserError(
            f"sequence_parallel={sequence_parallel} needs a mesh with a sequence axis > 1 "
            f"(e.g. data=2,sequence=4); this mesh has sequence=1"
        )


def fsdp_spec(shape: tuple[int, ...], fsdp: int, stacked: bool, prefer_last: bool = False) -> P:
    """PartitionSpec splitting one dimension of `shape` over "fsdp" (see module docstring)."""
    if fsdp == 1:
        return P()
    first = 1 if stacked else 0
    dims = sorted(range(first, len(shape)), key=lambda i: -shape[i])
    if prefer_last:
        dims = [len(shape) - 1] + dims
    for i in dims:
        if shape[i] % fsdp == 0:
            spec: list[Any] = [None] * len(shape)
            spec[i] = "fsdp"
            return P(*spec)
    return P()


def tensor_fsdp_spec(
    shape: tuple[int, ...], tensor_spec: P, tp: int, fsdp: int, stacked: bool
) -> P:
    """The tensor-parallel PartitionSpec of a leaf with "fsdp" added (see module docstring): on
    the largest dimension the tensor split leaves free that `fsdp` divides (never L of stacked
    layer weights), else on the tensor dimension itself as ("tensor", "fsdp") when fsdp
    divides its slices, else nowhere (replicated over fsdp: memory only)."""
    spec: list[Any] = list(tensor_spec) + [None] * (len(shape) - len(tensor_spec))
    if fsdp == 1:
        return P(*spec)
    first = 1 if stacked else 0
    free = sorted((i for i in range(first, len(shape)) if spec[i] is None), key=lambda i: -shape[i])
    for i in free:
        if shape[i] % fsdp == 0:
            spec[i] = FSDP
            return P(*spec)
    for i in range(first, len(shape)):
        if spec[i] == TENSOR and (shape[i] // tp) % fsdp == 0:
            spec[i] = (TENSOR, FSDP)
            return P(*spec)
    return P(*spec)


def train_param_specs(params: Any, mesh: Any) -> Any:
    """PartitionSpec of every leaf on a mesh with tensor > 1: `parallel.tensor.param_specs`'
    Megatron layout with fsdp on top (`tensor_fsdp_spec`)."""
    tp, n = mesh.shape[TENSOR], mesh.shape[FSDP]
    moe = [k for k in params.get("layers", {}) if expert_dim(k) is not None]
    if moe:  # before param_specs' "no layout" for the router: say what does split experts
        raise UserError(
            f"a mixture-of-experts model ({moe[0]}) has no tensor-parallel layout "
            f"(tensor={tp}); it trains split over the expert, data, fsdp and "
            f"sequence axes: put those devices on expert (expert parallelism)"
        )
    table = tp_lib.param_specs(params)
    out = {
        k: tensor_fsdp_spec(v.shape, table[k], tp, n, False)
        for k, v in params.items()
        if k != "layers"
    }
    out["layers"] = {
        k: tensor_fsdp_spec(v.shape, table["layers"][k], tp, n, True)
        for k, v in params["layers"].items()
    }
    return out


def gather_fsdp(params: Any, specs: Any) -> Any:
    """Inside shard_map: all-gather every leaf over "fsdp" along the dimension its spec splits
    (alone or as the minor part of ("tensor", "fsdp")), giving this device's whole tensor
    slice.  The transpose of each all-gather is a reduce-scatter of the gradient."""

    def gather(x: jax.Array, spec: P) -> jax.Array:
        for i, entry in enumerate(spec):
            if entry == FSDP or (isinstance(entry, tuple) and FSDP in entry):
                x = jax.lax.all_gather(x, FSDP, axis=i, tiled=True)
        return x

    return jax.tree.map(gather, params, specs, is_leaf=lambda x: isinstance(x, P))


def expert_spec(shape: tuple[int, ...], ep: int, fsdp: int) -> P:
    """An expert stack [L, E, ...] (or its adapter): E over "expert", and "fsdp" on the largest
    later dimension it divides, else on E's slices as ("expert", "fsdp"), else nowhere."""
    spec: list[Any] = [None, EXPERT] + [None] * (len(shape) - 2)
    if fsdp > 1:
        for i in sorted(range(2, len(shape)), key=lambda i: -shape[i]):
            if shape[i] % fsdp == 0:
                spec[i] = FSDP
                return P(*spec)
        if (shape[1] // ep) % fsdp == 0:
            spec[1] = (EXPERT, FSDP)
    return P(*spec)


def data_param_specs(params: Any, mesh: Any) -> Any:
    """PartitionSpec of every leaf on a mesh with tensor = 1: "fsdp" on one dimension
    (`fsdp_spec`; the embedding on D: a row lookup and its scatter-add gradient then stay
    local, where a split on V makes the partitioner replicate the table), expert stacks also on
    E over "expert" (`expert_spec`).  A tree with only "layers" (LoRA adapters) works too."""
    n, ep = mesh.shape[FSDP], mesh.shape.get(EXPERT, 1)
    out = {
        k: fsdp_spec(v.shape, n, False, prefer_last="embed_tokens" in k)
        for k, v in params.items()
        if k != "layers"
    }
    if "layers" in params:
        out["layers"] = {
            k: (
                expert_spec(v.shape, ep, n)
                if expert_dim(k) is not None
                else fsdp_spec(v.shape, n, True)
            )
            for k, v in params["layers"].items()
        }
    return out


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """NamedSharding for every leaf of a parameter tree (arrays or ShapeDtypeStructs)."""
    specs = (
        train_param_specs(params, mesh)
        if mesh.shape.get(TENSOR, 1) > 1
        else data_param_specs(params, mesh)
    )
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, split_sequence: bool = False) -> NamedSharding:
    """Rows over the batch axes (data, fsdp, expert); the token dimension over `sequence` with
    sequence parallelism."""
    return NamedSharding(mesh, P(BATCH_AXES, "sequence" if split_sequence else None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, grad_accum: int = 1) -> None:
    n = batch_devices(dict(mesh.shape))
    if batch_size % (n * grad_accum):
        raise UserError(
            f"batch size {batch_size} must be a multiple of data*fsdp*expert ({n}) times "
            f"grad_accum ({grad_accum}) = {n * grad_accum}; choose e.g. "
            f"{n * grad_accum * max(1, batch_size // (n * grad_accum))}"
        )


def zigzag_rows(batch: dict[str, np.ndarray], ring_size: int) -> dict[str, np.ndarray]:
    """Permute the token dimension of every [B, T] array into ring attention's zigzag order.

    Applied once on the host to the whole batch (tokens, targets, weights, positions, segment
    ids alike), so each token keeps its target, weight, RoPE position and document; a loss
    summed over tokens does not depend on their order.  ring_size 1 keeps natural order.
    """
    if ring_size == 1:
        return batch
    t = next(iter(batch.values())).shape[1]
    perm = zigzag_permutation(t, ring_size)
    return {k: np.asarray(v)[:, perm] for k, v in batch.items()}


def put_batch(
    batch: dict[str, np.ndarray], mesh: Mesh | None, *, sequence_ring: int | None = None
) -> dict[str, jax.Array]:
    """Host batch -> device arrays split over the batch axes.

    Each process passes its own rows (all rows on one host); on several hosts the global batch
    is the concatenation of the processes' rows in process order.  With sequence parallelism
    pass `sequence_ring` (the zigzag ring size from `sequence.model_layout`; 1 for natural
    order): the rows are permuted by `zigzag_rows` and their tokens split over `sequence`.
    """
    if mesh is None:
        return {k: jax.numpy.asarray(v) for k, v in batch.items()}
    rows = len(next(iter(batch.values()))) * jax.process_count()
    n = batch_devices(dict(mesh.shape))
    if rows % n:  # else jax's IndivisibleError, naming none of this
        raise UserError(
            f"a batch of {rows} rows does not split over data x fsdp x expert = {n} "
            f"devices; use a multiple of {n} rows"
        )
    if sequence_ring is not None:
        batch = zigzag_rows(batch, sequence_ring)
    sh = batch_sharding(mesh, split_sequence=sequence_ring is not None)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}
