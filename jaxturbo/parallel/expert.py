"""Expert parallelism: the experts of every MoE layer split over the mesh axis `expert`, tokens
sent to the devices that own their experts by all-to-all and brought back the same way.

Layout (ep = size of `expert`, E experts, E_l = E / ep per device): device j holds experts
[j E_l, (j+1) E_l) of every stack ([L, E_l, F, D] locally; their LoRA adapters alike).  Outside
the expert layers `expert` is a data axis: batch rows split over (data, fsdp, expert), tokens
over `sequence` (`axes.BATCH_AXES`); attention, norms, router and LM head run on a device's own
tokens with the parameters replicated over `expert` (gathered over fsdp).

One MoE layer on a device (`expert_parallel_dispatch`; N local tokens, k choices, M = N k):
  sort       the M (token, choice) pairs by global expert (`models.moe.sort_pairs`, with the
             capacity when one is set); pairs for device j are then one contiguous run.
  counts     all_gather of the per-expert counts [E] over `expert` -> C [ep, E] on every device
             (E integers each), from which every offset below follows with no more traffic.
  dispatch   the rows go to their expert's device, landing expert-major (all sources' rows of
             local expert 0, then of expert 1, ...), so the receiver runs its E_l experts as one
             grouped GEMM (`models.moe.expert_swiglu`) with no further sort.
  return     the inverse exchange brings each output row back to its pair's sorted slot; the
             weighted combine is the one-device one (`models.moe.combine`).

Exchanges (`ExpertParallel.exchange`):
  ragged  `jax.lax.ragged_all_to_all`: each (source, expert) slice written straight at its
          expert-major offset on the receiver; bytes moved = rows routed.  GPU and TPU.  The
          receive buffer has a static size, the most rows a device can get:
          ep * N * min(k, E_l) dropless (every token of every device picking it), or
          ep * E_l * capacity with a capacity.
  padded  XLA:CPU has no ragged all-to-all ("HLO opcode ragged-all-to-all is not supported"):
          `jax.lax.all_to_all` of a [ep, cap, D] buffer per device, cap = the most rows one
          source can send one destination: N * min(k, E_l) dropless (all its tokens: dropless
          by construction), min(E_l * capacity, that) with a capacity; then a local gather into
          the expert-major order.  Moves ep * cap rows whatever the routing.
  auto    ragged on GPU/TPU, padded on CPU.
  ragged_reference  the ragged path with the collective emulated by `ragged_all_to_all_reference`
          (padded all-to-all per slice): tests the ragged path's offsets on any platform.

Capacity (`ExpertParallel.capacity_factor`, `models.moe` docstring): each device keeps at most
ceil(factor * M / E) of its own pairs per expert before sending, so drops depend on how the
batch is split; with nothing dropped the result is the dropless one.

Gradients: all_to_all and ragged_all_to_all transpose to the reverse exchange; the expert
weights' gradient on a device comes from the rows it received, and shard_map sums it over the
axes the weights are replicated on (data, sequence; fsdp by the gather's reduce-scatter).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxturbo.errors import UserError
from jaxturbo.models.moe import (
    Dispatch,
    ExpertWeights,
    combine,
    expert_swiglu,
    gather_pairs,
    inverse_permutation,
    sort_pairs,
)
from jaxturbo.parallel.axes import EXPERT, divisors

EXCHANGES = ("auto", "ragged", "padded", "ragged_reference")


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """How MoE layers run over the `expert` axis: `capacity_factor` None for dropless (the
    default), else the per-expert capacity factor; `exchange` one of EXCHANGES (docstring)."""

    capacity_factor: float | None = None
    exchange: str = "auto"

    def validate(self) -> None:
        if self.exchange not in EXCHANGES:
            raise UserError(
                f"expert exchange {self.exchange!r}; choose one of {', '.join(EXCHANGES)}"
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise UserError(f"capacity factor {self.capacity_factor} must be > 0 (None: dropless)")


def resolve_exchange(exchange: str, platform: str | None = None) -> str:
    """ "auto" -> "padded" on CPU (no ragged all-to-all in XLA:CPU), else "ragged"."""
    if exchange != "auto":
        return exchange
    platform = platform or jax.devices()[0].platform
    return "padded" if platform == "cpu" else "ragged"


def check_expert_mesh(num_experts: int, ep: int) -> None:
    """The expert axis must divide the experts: UserError naming the sizes that do."""
    if num_experts % ep:
        raise UserError(
            f"expert axis {ep} does not divide the {num_experts} experts; choose an "
            f"expert size from {divisors(num_experts)}"
        )


def _excl_cumsum(x: jax.Array, axis: int) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def ragged_all_to_all_reference(
    operand: jax.Array,
    output: jax.Array,
    input_offsets: jax.Array,
    send_sizes: jax.Array,
    output_offsets: jax.Array,
    recv_sizes: jax.Array,
    *,
    axis_name: str,
    max_slice: int,
) -> jax.Array:
    """`jax.lax.ragged_all_to_all`'s semantics (its docstring) from a padded all_to_all, for
    platforms without the collective: slice s (of S = spd * ep, spd per destination) of
    operand[input_offsets[s] : + send_sizes[s]] lands at the receiver's
    output[output_offsets[s] : + send_sizes[s]].  `max_slice`: a static bound on any slice's
    rows.  Inside shard_map; moves S * max_slice rows whatever the sizes."""
    s_total = input_offsets.shape[0]
    ep = jax.lax.axis_size(axis_name)
    spd = s_total // ep
    p = jnp.arange(max_slice, dtype=jnp.int32)
    src = input_offsets[:, None] + p[None]  # [S, max_slice]
    ok = p[None] < send_sizes[:, None]
    ok = ok.reshape(ok.shape + (1,) * (operand.ndim - 1))
    rows = jnp.where(ok, operand[jnp.clip(src, 0, operand.shape[0] - 1)], 0)
    rows = rows.reshape(ep, spd, max_slice, *operand.shape[1:])
    got = jax.lax.all_to_all(rows, axis_name, 0, 0, tiled=True)  # [ep (source), spd, ...]
    offs = jax.lax.all_to_all(output_offsets.reshape(ep, spd), axis_name, 0, 0, tiled=True)
    dst = offs.reshape(-1)[:, None] + p[None]  # [S, max_slice]
    keep = p[None] < recv_sizes[:, None]
    dst = jnp.where(keep, dst, output.shape[0])  # out of bounds: dropped
    return output.at[dst.reshape(-1)].set(got.reshape(-1, *operand.shape[1:]), mode="drop")


def expert_parallel_dispatch(ep: int, *, exchange: str = "auto", axis: str = EXPERT) -> Dispatch:
    """A `models.moe` dispatch for inside shard_map: experts split over `axis` (size ep), the
    pairs exchanged as the module docstring says.  x [N, D] (this device's tokens), weights,
    experts [N, k] (global expert ids), w: this device's E_l experts -> [N, D]."""
    mode = resolve_exchange(exchange)
    if mode not in EXCHANGES[1:]:
        raise UserError(f"expert exchange {exchange!r}; choose one of {', '.join(EXCHANGES)}")

    def dispatch(
        x: jax.Array,
        weights: jax.Array,
        experts: jax.Array,
        w: ExpertWeights,
        implementation: str = "auto",
        capacity: int | None = None,
    ) -> jax.Array:
        n, k = experts.shape
        e_l = w.gate.shape[0]
        e = e_l * ep
        m = n * k
        order, counts = sort_pairs(experts, e, capacity)
        inv = inverse_permutation(order)
        xs = gather_pairs(x, order, inv, k)  # [M, D], by expert
        me = jax.lax.axis_index(axis)
        c = jax.lax.all_gather(counts, axis).reshape(ep, ep, e_l)  # [source, dest, e]
        per_expert = jnp.sum(c, axis=0)  # [dest, e] rows received
        # where source i's rows of (dest j, expert e) land on j: expert-major, then by source
        land = _excl_cumsum(per_expert, 1)[None] + _excl_cumsum(c, 0)  # [source, dest, e]
        send_off = _excl_cumsum(counts, 0)  # [E] my sorted slices
        group_sizes = per_expert[me]  # [E_l]
        # static bounds: one source sends one destination at most cap rows
        cap = n * min(k, e_l) if capacity is None else min(e_l * capacity, n * min(k, e_l))
        rows = ep * cap
        if mode == "padded":
            ys = _padded(
                xs, c, land, counts, me, cap, rows, w, group_sizes, implementation, axis, ep, e_l
            )
        else:
            a2a = (
                jax.lax.ragged_all_to_all
                if mode == "ragged"
                else functools.partial(
                    ragged_all_to_all_reference,
                    max_slice=n if capacity is None else min(n, capacity),
                )
            )
            mine = c[:, me, :].reshape(-1)  # [E]: (source, e) sizes
            recv = a2a(
                xs,
                jnp.zeros((rows, xs.shape[1]), xs.dtype),
                send_off,
                counts,
                land[me].reshape(-1),
                mine,
                axis_name=axis,
            )
            out = expert_swiglu(recv, group_sizes, w, implementation)
            src_off = _excl_cumsum(c.reshape(ep, e), 1).reshape(ep, ep, e_l)[:, me, :]
            ys = a2a(
                out,
                jnp.zeros((m, out.shape[1]), out.dtype),
                land[:, me, :].reshape(-1),
                mine,
                src_off.reshape(-1),
                counts,
                axis_name=axis,
            )
        return combine(ys, order, weights, x.dtype, inv)

    return dispatch


def _padded(xs, c, land, counts, me, cap, rows, w, group_sizes, implementation, axis, ep, e_l):
    """The padded exchange (module docstring): [ep, cap, D] buffers through all_to_all, the
    received rows gathered into expert-major order, the outputs back the same way.  Returns
    ys [M, D] in the sorted pairs' order (zeros past the kept pairs)."""
    m, d = xs.shape
    p = jnp.arange(cap, dtype=jnp.int32)
    per_dest = counts.reshape(ep, e_l).sum(1)  # rows I send each device
    dest_off = _excl_cumsum(per_dest, 0)
    src = dest_off[:, None] + p[None]  # [ep, cap] rows of xs
    ok = p[None] < per_dest[:, None]
    send = jnp.where(ok[..., None], xs[jnp.clip(src, 0, m - 1)], 0)
    recv = jax.lax.all_to_all(send, axis, 0, 0, tiled=True)  # [source, cap, D]
    # received row (i, p): source i's p-th row for me; its expert and expert-major slot
    mine = c[:, me, :]  # [source, e]
    ends = jnp.cumsum(mine, axis=1)  # [source, e]
    exp = jax.vmap(lambda e_end: jnp.searchsorted(e_end, p, side="right"))(ends)  # [src, cap]
    valid = exp < e_l
    expc = jnp.clip(exp, 0, e_l - 1)
    start_in_chunk = jnp.take_along_axis(ends - mine, expc, axis=1)
    slot = jnp.take_along_axis(land[:, me, :], expc, axis=1) + p[None] - start_in_chunk
    slot = jnp.where(valid, slot, rows)  # [source, cap]
    order = jnp.argsort(slot.reshape(-1))  # valid slots are 0..R-1
    buf = recv.reshape(rows, d)[order]
    out = expert_swiglu(buf, group_sizes, w, implementation)  # [R, D], expert-major
    back = jnp.where(valid[..., None], out[jnp.clip(slot, 0, rows - 1)], 0)  # [source, cap, D]
    home = jax.lax.all_to_all(back, axis, 0, 0, tiled=True)  # [dest, cap, D]: mine back
    q = jnp.arange(m, dtype=jnp.int32)
    dest = jnp.clip(jnp.searchsorted(jnp.cumsum(per_dest), q, side="right"), 0, ep - 1)
    pos = q - dest_off[dest]
    kept = q < jnp.sum(counts)
    return jnp.where(kept[:, None], home[dest, jnp.clip(pos, 0, cap - 1)], 0)


# ----------------------------------------------------------------------------- layout
def expert_dim(name: str) -> int | None:
    """The expert dimension of a stacked layer parameter (1 for `mlp.experts.*` [L, E, ...],
    their adapters too), None for the others."""
    return 1 if name.startswith("mlp.experts.") else None
