"""How training state and batches are laid out on the mesh (data parallel + FSDP + sequence).

Design: the train step is one `jax.jit` whose inputs and outputs carry `NamedSharding`s on the
jaxturbo mesh (`AxisType.Auto` axes, see `jaxturbo.parallel.mesh`); XLA's SPMD partitioner
inserts the collectives.  This is ZeRO-3 / FSDP (Rajbhandari et al., 2020):

  batch       rows split over ("data", "fsdp"): each device sees B / (data * fsdp) rows.
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
[V, D] on D (see param_shardings), the LM head on its largest dimension; a leaf no dimension of which divides stays replicated (norm scales of odd
size), which costs memory only.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxturbo.errors import UserError
from jaxturbo.parallel.axes import BATCH_AXES
from jaxturbo.parallel.sequence import MODES as SP_MODES, zigzag_permutation




def check_training_mesh(mesh: Mesh, sequence_parallel: str | None = None) -> None:
    """Training shards over data, fsdp and (with sequence parallelism) sequence; say what to
    change otherwise.  `sequence_parallel=None` checks only what the parameter layout needs."""
    if mesh.shape.get("tensor", 1) > 1:
        raise UserError(
            f"training on a mesh with tensor={mesh.shape['tensor']} is not supported yet; put "
            f"those devices on the data, fsdp or sequence axis (e.g. --mesh fsdp={mesh.devices.size})")
    if sequence_parallel is None:
        return
    seq = mesh.shape.get("sequence", 1)
    if sequence_parallel not in SP_MODES:
        raise UserError(f"--sequence-parallel {sequence_parallel!r} is unknown; choose one of "
                        f"{', '.join(SP_MODES)}")
    if seq > 1 and sequence_parallel == "none":
        raise UserError(
            f"the mesh has sequence={seq} but --sequence-parallel is none; choose one of "
            f"{', '.join(SP_MODES[1:])}, or put those devices on the data or fsdp axis")
    if seq == 1 and sequence_parallel != "none":
        raise UserError(
            f"--sequence-parallel {sequence_parallel} needs a mesh with a sequence axis > 1 "
            f"(e.g. --mesh data=2,sequence=4); this mesh has sequence=1")


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


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """NamedSharding for every leaf of a parameter tree (arrays or ShapeDtypeStructs)."""
    n = mesh.shape["fsdp"]
    # the embedding table is split on D: a row lookup (and its scatter-add gradient) then
    # stays local, where a split on V makes the partitioner replicate the table
    out = {k: NamedSharding(mesh, fsdp_spec(v.shape, n, False, prefer_last="embed_tokens" in k))
           for k, v in params.items() if k != "layers"}
    if "layers" in params:
        out["layers"] = {k: NamedSharding(mesh, fsdp_spec(v.shape, n, True))
                         for k, v in params["layers"].items()}
    return out


def batch_sharding(mesh: Mesh, split_sequence: bool = False) -> NamedSharding:
    """Rows over (data, fsdp); the token dimension over `sequence` with sequence parallelism."""
    return NamedSharding(mesh, P(BATCH_AXES, "sequence" if split_sequence else None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, grad_accum: int = 1) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % (n * grad_accum):
        raise UserError(
            f"batch size {batch_size} must be a multiple of data*fsdp ({n}) times grad_accum "
            f"({grad_accum}) = {n * grad_accum}; choose e.g. {n * grad_accum * max(1, batch_size // (n * grad_accum))}")


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


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh | None, *,
              sequence_ring: int | None = None) -> dict[str, jax.Array]:
    """Host batch -> device arrays split over the batch axes.

    Each process passes its own rows (all rows on one host); on several hosts the global batch
    is the concatenation of the processes' rows in process order.  With sequence parallelism
    pass `sequence_ring` (the zigzag ring size from `sequence.model_layout`; 1 for natural
    order): the rows are permuted by `zigzag_rows` and their tokens split over `sequence`.
    """
    if mesh is None:
        return {k: jax.numpy.asarray(v) for k, v in batch.items()}
    if sequence_ring is not None:
        batch = zigzag_rows(batch, sequence_ring)
    sh = batch_sharding(mesh, split_sequence=sequence_ring is not None)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}
