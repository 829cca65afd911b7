"""Sequence parallelism: mode choice and validation, zigzag layout, hybrid mesh, entry points.

Modes over the mesh axis `sequence` (P devices); each states its cost where it is defined:
  none     plain attention, the sequence is not split.
  ulysses  `ulysses.py`: all-to-all sequence <-> heads; P must divide the head count.
  ring     `ring.py`: K/V blocks rotate by ppermute; no head limit; causal load balance by zigzag.
  hybrid   Ulysses inside groups of `ulysses_size` neighbouring devices, ring across the
           P / ulysses_size groups.  Use it when the head count is smaller than (or shares few
           divisors with) P: Ulysses traffic stays inside fast groups, the ring carries
           P/u-times fewer, u-times larger blocks.

Hybrid design: the `sequence` axis is split in two by reshaping the mesh's device array
(`hybrid_mesh`): axes `sequence_ring` (outer) x `sequence_ulysses` (inner).  A global array
sharded over `sequence` has the same device layout as one sharded over
("sequence_ring", "sequence_ulysses"), so no data moves.  After the Ulysses all-to-all a ring
position r holds rows [r T/R, (r+1) T/R) of the (permuted) sequence, which is exactly a ring
device's block of a ring of size R = P / u: the zigzag permutation is built for R.

Layout: for causal ring/hybrid the batch is permuted once with `zigzag` (ring size R) before
the model and the output restored with `unzigzag`; positions and segment ids are permuted with
the same helper so RoPE and packing see the right values.

With tensor parallelism (training on a mesh with tensor = t > 1, `jaxturbo.train.step`) each
device runs `local_attention` on its H/t query and K/t KV heads: Ulysses then splits those
(sequence | H/t), ring splits nothing more; `model_layout` checks both up front.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from jaxturbo.errors import UserError
from jaxturbo.parallel import ring as ring_lib
from jaxturbo.parallel import ulysses as ulysses_lib
from jaxturbo.parallel.axes import BATCH_AXES, SEQUENCE, TENSOR, divisors
from pallas_kernels import attention

Mode = Literal["none", "ulysses", "ring", "hybrid"]
MODES = ("none", "ulysses", "ring", "hybrid")
SEQ_AXIS = SEQUENCE
RING_AXIS = "sequence_ring"
ULYSSES_AXIS = "sequence_ulysses"
# The Pallas kernels behind `attention` declare outputs without varying-axes types, which
# shard_map's check_vma rejects; the ring code itself passes check_vma=True (pure-jnp backend).
CHECK_VMA = False


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """How attention is split over the mesh axis `sequence`.

    mode: see the module docstring.
    ulysses_size: hybrid only; devices per Ulysses group (must divide the sequence axis size and
      the query-head count).  Default: the largest such divisor.
    layout: ring/hybrid causal load balancing, "zigzag" (balanced) or "contiguous".
    implementation: attention backend passed to `pallas_kernels.attention`.
    """

    mode: Mode = "none"
    ulysses_size: int | None = None
    layout: ring_lib.Layout = "zigzag"
    implementation: str = "auto"


def resolve_ulysses_size(sp: SequenceParallel, sp_size: int, num_heads: int) -> int:
    """Ulysses group size: sp_size for ulysses, 1 for ring/none, the chosen u for hybrid."""
    if sp.mode == "ulysses":
        return sp_size
    if sp.mode != "hybrid":
        return 1
    valid = sorted(set(divisors(sp_size)) & set(divisors(num_heads)))
    if sp.ulysses_size is None:
        return valid[-1]
    if sp.ulysses_size not in valid:
        raise UserError(
            f"hybrid ulysses_size {sp.ulysses_size} must divide both the sequence axis size "
            f"{sp_size} and the {num_heads} query heads; choose one of {valid}"
        )
    return sp.ulysses_size


def validate(
    sp: SequenceParallel,
    *,
    sp_size: int,
    num_heads: int,
    num_kv_heads: int,
    seq_len: int,
    causal: bool,
    sliding_window: int | None = None,
) -> int:
    """Check a configuration before anything is traced; return the Ulysses group size.

    `num_heads`/`num_kv_heads` are per tensor-parallel shard.  Raises UserError naming the
    valid choices.
    """
    if sp.mode not in MODES:
        raise UserError(
            f"sequence-parallel mode {sp.mode!r} is unknown; choose one of {', '.join(MODES)}"
        )
    if sp.ulysses_size is not None and sp.mode != "hybrid":
        raise UserError(f"ulysses_size applies to mode 'hybrid' only (mode is {sp.mode!r})")
    if sp.mode == "none":
        return 1
    u = resolve_ulysses_size(sp, sp_size, num_heads)
    if seq_len % sp_size:
        raise UserError(
            f"sequence length {seq_len} is not divisible by the sequence axis size "
            f"{sp_size}; pad to a multiple of {sp_size}"
        )
    if u > 1:
        ulysses_lib.check_ulysses(
            num_heads=num_heads, num_kv_heads=num_kv_heads, ulysses_size=u, seq_len=seq_len
        )
    if sp.mode in ("ring", "hybrid"):
        ring_lib.check_ring(
            seq_len=seq_len,
            ring_size=sp_size // u,
            causal=causal,
            layout=sp.layout,
            sliding_window=sliding_window,
        )
    return u


# ------------------------------------------------------------------------------------ layout


def zigzag_permutation(seq_len: int, ring_size: int) -> np.ndarray:
    """Row order [seq_len] placing chunks (r, 2R-1-r) on ring position r (2R equal chunks)."""
    if seq_len % (2 * ring_size):
        raise UserError(
            f"sequence length {seq_len} is not divisible by 2 x ring size "
            f"{ring_size}; pad to a multiple of {2 * ring_size}"
        )
    c = seq_len // (2 * ring_size)
    chunks = np.arange(seq_len).reshape(2 * ring_size, c)
    order = [i for r in range(ring_size) for i in (r, 2 * ring_size - 1 - r)]
    return chunks[order].reshape(-1)


def zigzag(x: jax.Array, ring_size: int, axis: int = 1) -> jax.Array:
    """Permute the sequence axis of x into zigzag order (apply once to a batch)."""
    if ring_size == 1:
        return x
    return jnp.take(x, zigzag_permutation(x.shape[axis], ring_size), axis=axis)


def unzigzag(x: jax.Array, ring_size: int, axis: int = 1) -> jax.Array:
    """Inverse of `zigzag`: restore natural sequence order (apply once to the output)."""
    if ring_size == 1:
        return x
    inv = np.argsort(zigzag_permutation(x.shape[axis], ring_size))
    return jnp.take(x, inv, axis=axis)


def layout_ring_size(sp: SequenceParallel, *, sp_size: int, ulysses_size: int, causal: bool) -> int:
    """Ring size R of the zigzag permutation the batch needs (1: natural order)."""
    if sp.mode in ("ring", "hybrid") and causal and sp.layout == "zigzag":
        return sp_size // ulysses_size
    return 1


# -------------------------------------------------------------------------------------- mesh


def hybrid_mesh(mesh: Mesh, ulysses_size: int) -> Mesh:
    """`mesh` with its `sequence` axis split into (sequence_ring, sequence_ulysses).

    The Ulysses axis is inner, so a Ulysses group is neighbouring devices (NVLink peers).
    """
    names = tuple(mesh.axis_names)
    i = names.index(SEQ_AXIS)
    shape = mesh.devices.shape
    if shape[i] % ulysses_size:
        raise UserError(
            f"ulysses_size {ulysses_size} does not divide the sequence axis "
            f"{shape[i]}; choose one of {divisors(shape[i])}"
        )
    devs = mesh.devices.reshape(
        shape[:i] + (shape[i] // ulysses_size, ulysses_size) + shape[i + 1 :]
    )
    new = names[:i] + (RING_AXIS, ULYSSES_AXIS) + names[i + 1 :]
    return Mesh(devs, new, axis_types=(AxisType.Auto,) * len(new))


def seq_axes(sp: SequenceParallel) -> str | tuple[str, str] | None:
    """The PartitionSpec entry for the sequence dimension of activations."""
    if sp.mode == "none":
        return None
    return (RING_AXIS, ULYSSES_AXIS) if sp.mode == "hybrid" else SEQ_AXIS


# ----------------------------------------------------------------------------- per-device


def hybrid_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    layout: ring_lib.Layout = "zigzag",
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    implementation: str = "auto",
    ring_axis: str = RING_AXIS,
    ulysses_axis: str = ULYSSES_AXIS,
) -> jax.Array:
    """Ulysses over `ulysses_axis` (u devices) around ring attention over `ring_axis` (R).

    q [B, T/(R u), H, D], k/v [B, T/(R u), K, D] -> [B, T/(R u), H, D].  Inside the ring each
    device holds T/R rows of H/u heads.  Cost: Ulysses all-to-alls among u devices, as in
    `ulysses.py`, plus ring traffic of (R-1) K/V blocks of T/R rows and K'/u heads.
    """
    qh, kh, vh, seg = ulysses_lib.to_head_shards(q, k, v, segment_ids, ulysses_axis)
    out = ring_lib.ring_attention(
        qh,
        kh,
        vh,
        axis_name=ring_axis,
        causal=causal,
        layout=layout,
        segment_ids=seg,
        scale=scale,
        softcap=softcap,
        implementation=implementation,
    )
    return ulysses_lib.heads_to_seq(out, ulysses_axis)


def local_attention(
    sp: SequenceParallel,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Per-device attention of mode `sp.mode` (inside shard_map); shapes as `ring_attention`."""
    kw = dict(
        causal=causal,
        segment_ids=segment_ids,
        scale=scale,
        softcap=softcap,
        implementation=sp.implementation,
    )
    if sp.mode == "none":
        return attention(q, k, v, sliding_window=sliding_window, **kw)
    if sp.mode == "ulysses":
        return ulysses_lib.ulysses_attention(
            q, k, v, axis_name=SEQ_AXIS, sliding_window=sliding_window, **kw
        )
    if sliding_window is not None:
        ring_lib.check_ring(
            seq_len=0, ring_size=1, causal=causal, layout=sp.layout, sliding_window=sliding_window
        )
    if sp.mode == "ring":
        return ring_lib.ring_attention(q, k, v, axis_name=SEQ_AXIS, layout=sp.layout, **kw)
    return hybrid_attention(q, k, v, layout=sp.layout, **kw)


# ------------------------------------------------------------------------------- global API


def sp_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mesh: Mesh,
    sp: SequenceParallel,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Attention of global arrays with the sequence split over `mesh`'s `sequence` axis.

    q [B, T, H, D], k/v [B, T, K, D], segment_ids [B, T], already in the mode's layout (see
    `layout_ring_size` / `zigzag`).  Batch is split over (data, fsdp), heads over `tensor`.
    Validates first (UserError), then runs one `shard_map`.
    """
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    tp = sizes.get("tensor", 1)
    if q.shape[2] % tp or k.shape[2] % tp:
        raise UserError(
            f"tensor axis {tp} must divide {q.shape[2]} query and {k.shape[2]} KV "
            f"heads; choose a tensor size from "
            f"{sorted(set(divisors(q.shape[2])) & set(divisors(k.shape[2])))}"
        )
    u = validate(
        sp,
        sp_size=sizes[SEQ_AXIS],
        num_heads=q.shape[2] // tp,
        num_kv_heads=k.shape[2] // tp,
        seq_len=q.shape[1],
        causal=causal,
        sliding_window=sliding_window,
    )
    run_mesh = hybrid_mesh(mesh, u) if sp.mode == "hybrid" else mesh
    qkv = P(BATCH_AXES, seq_axes(sp), "tensor", None)
    seg = None if segment_ids is None else P(BATCH_AXES, seq_axes(sp))
    body = functools.partial(
        local_attention,
        sp,
        causal=causal,
        sliding_window=sliding_window,
        scale=scale,
        softcap=softcap,
    )

    def f(q, k, v, s):
        return body(q, k, v, segment_ids=s)

    return jax.shard_map(
        f, mesh=run_mesh, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv, check_vma=CHECK_VMA
    )(q, k, v, segment_ids)


# ------------------------------------------------------------------------------ the model


def model_layout(
    mode: Mode | SequenceParallel, cfg: Any, mesh: Mesh, *, batch: int, seq_len: int
) -> tuple[SequenceParallel, int, int]:
    """Check that the causal model can run in `mode` on `mesh`, before anything is traced.

    Returns (sp, u, r): the SequenceParallel, its Ulysses group size u and the ring size r of the
    zigzag permutation the batch needs (1: natural order).  Raises UserError naming what to
    change: batch divisible by data x fsdp, seq_len and heads as `validate`.  With tensor = t >
    1 (training: `jaxturbo.train.step`) each tensor device holds H/t query and K/t KV heads, so
    t must divide both and Ulysses splits a device's H/t heads (sequence | H/t).
    """
    sp = mode if isinstance(mode, SequenceParallel) else SequenceParallel(mode)
    sizes = dict(mesh.shape)
    tp, seq = sizes.get(TENSOR, 1), sizes[SEQ_AXIS]
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if tp > 1:
        if heads % tp or kv % tp:
            both = sorted(set(divisors(heads)) & set(divisors(kv)))
            raise UserError(
                f"tensor={tp} must divide the {heads} query and {kv} KV heads to "
                f"train with sequence parallelism; choose a tensor size from {both}"
            )
        if sp.mode == "ulysses" and (heads // tp) % seq:
            ok = [d for d in divisors(heads // tp) if d > 1]
            raise UserError(
                f"Ulysses over sequence={seq} with tensor={tp}: each tensor device holds "
                f"{heads // tp} of the {heads} query heads, which {seq} does not divide; choose "
                f"sequence from {ok or [1]} with tensor={tp}, a smaller tensor size, or "
                f"ring attention (no head limit) or hybrid"
            )
        heads, kv = heads // tp, kv // tp
    u = validate(sp, sp_size=seq, num_heads=heads, num_kv_heads=kv, seq_len=seq_len, causal=True)
    batch_devs = sizes.get("data", 1) * sizes.get("fsdp", 1)
    if batch % batch_devs:
        raise UserError(f"batch {batch} is not divisible by data x fsdp = {batch_devs}")
    r = layout_ring_size(sp, sp_size=sizes[SEQ_AXIS], ulysses_size=u, causal=True)
    return sp, u, r


def sp_forward_laid_out(
    params: Any,
    cfg: Any,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None,
    mesh: Mesh,
    sp: SequenceParallel,
    ulysses_size: int,
    *,
    unroll: bool = False,
    return_hidden: bool = False,
) -> jax.Array:
    """The model on inputs already in the mode's layout (see `model_layout`, `zigzag`).

    tokens/positions/segment_ids [batch, seq] in layout order -> logits [batch, seq, vocab]
    float32 in the same order, sharded (data x fsdp, sequence).  Training uses this directly:
    it permutes the whole batch once on the host (targets and weights too), and a per-token
    loss summed over the batch does not depend on the order.  return_hidden: the final normed
    hidden states [batch, seq, hidden] (compute dtype) instead, same order and sharding (for
    `train.losses.chunked_cross_entropy`, which applies the LM head block by block).
    """
    from jaxturbo.models.transformer import (
        forward,
    )  # the model is a user of parallel/, not a dependency

    run_mesh = hybrid_mesh(mesh, ulysses_size) if sp.mode == "hybrid" else mesh
    rows = P(BATCH_AXES, seq_axes(sp))

    def body(params, tok, pos, seg):
        def attn_fn(q, k, v, *, segment_ids=None):
            return local_attention(sp, q, k, v, causal=True, segment_ids=segment_ids)

        out, _ = forward(
            params,
            cfg,
            tok,
            positions=pos,
            segment_ids=seg,
            attn_fn=attn_fn,
            unroll=unroll,
            return_hidden=return_hidden,
        )
        return out

    return jax.shard_map(
        body,
        mesh=run_mesh,
        in_specs=(P(), rows, rows, None if segment_ids is None else rows),
        out_specs=P(BATCH_AXES, seq_axes(sp), None),
        check_vma=CHECK_VMA,
    )(params, tokens, positions, segment_ids)


def sp_forward(
    params: Any,
    cfg: Any,
    tokens: jax.Array,
    mesh: Mesh,
    mode: Mode | SequenceParallel = "ring",
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    unroll: bool = False,
) -> jax.Array:
    """`models.transformer.forward` with the sequence split over `mesh`'s `sequence` axis.

    tokens/positions/segment_ids [batch, seq] in natural order -> logits [batch, seq, vocab]
    float32 in natural order.  The zigzag permutation (causal ring/hybrid) is applied here once
    to tokens, positions and segment ids, and undone once on the logits; every layer's attention
    runs `local_attention` of the mode, everything else is per-token and runs on local rows.
    Parameters are replicated (tensor axis must be 1 here; batch splits over data x fsdp).
    """
    if dict(mesh.shape).get(TENSOR, 1) != 1:
        raise UserError(
            f"sp_forward runs with tensor=1 (mesh has tensor={mesh.shape[TENSOR]}); "
            "fold those devices into the sequence or data axis (training combines "
            "both: jaxturbo.train.step)"
        )
    b, t = tokens.shape
    sp, u, r = model_layout(mode, cfg, mesh, batch=b, seq_len=t)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = None if segment_ids is None else zigzag(segment_ids, r)
    logits = sp_forward_laid_out(
        params, cfg, zigzag(tokens, r), zigzag(positions, r), seg, mesh, sp, u, unroll=unroll
    )
    return unzigzag(logits, r)
