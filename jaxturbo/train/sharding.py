"""How training state and batches are laid out on the mesh (data parallel + FSDP).

Design: the train step is one `jax.jit` whose inputs and outputs carry `NamedSharding`s on the
jaxturbo mesh (`AxisType.Auto` axes, see `jaxturbo.parallel.mesh`); XLA's SPMD partitioner
inserts the collectives.  This is ZeRO-3 / FSDP (Rajbhandari et al., 2020):

  batch       rows split over ("data", "fsdp"): each device sees B / (data * fsdp) rows.
  params      each leaf split over "fsdp" along one dimension (below); replicated over "data".
  opt state   Adam moments take their parameter's sharding; counters are replicated.

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

BATCH_AXES = ("data", "fsdp")


def check_training_mesh(mesh: Mesh) -> None:
    """Training shards over data and fsdp only (for now); say what to change otherwise."""
    for ax in ("tensor", "sequence"):
        if mesh.shape.get(ax, 1) > 1:
            raise UserError(
                f"training on a mesh with {ax}={mesh.shape[ax]} is not supported yet; put those "
                f"devices on the data or fsdp axis (e.g. --mesh fsdp={mesh.devices.size})")


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


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over (data, fsdp); the token dimension is not split."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, grad_accum: int = 1) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % (n * grad_accum):
        raise UserError(
            f"batch size {batch_size} must be a multiple of data*fsdp ({n}) times grad_accum "
            f"({grad_accum}) = {n * grad_accum}; choose e.g. {n * grad_accum * max(1, batch_size // (n * grad_accum))}")


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh | None) -> dict[str, jax.Array]:
    """Host batch -> device arrays split over the batch axes.

    Each process passes its own rows (all rows on one host); on several hosts the global batch
    is the concatenation of the processes' rows in process order.
    """
    if mesh is None:
        return {k: jax.numpy.asarray(v) for k, v in batch.items()}
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}
