"""Explicit communication/compute overlap on GPU: an all-reduce and a computation issued together.

XLA's latency-hiding scheduler decides by itself which compute sits between an async
collective's start and done, and for Ladder-Residual decode it left one of each layer's two
all-reduces synchronous (experiments/ladder/NOTES.md).  `psum_beside(x, axis, fn, *args)`
takes that decision away from it:

- `fn(*args)` becomes a call annotated for a second GPU stream (`_xla_stream_annotation`, the
  primitive behind `jax.experimental.compute_on("gpu_stream:N")`), which XLA turns into an
  async call-start / call-done pair;
- the all-reduce and that call carry the same `_scheduling_group_id`, so the scheduler issues
  them as one unit: both starts, then both dones.  The all-reduce runs on NCCL's stream while
  `fn` runs on stream 1.

On other platforms both annotations are ignored by the compiler and the result is the same
as `(psum(x, axis), fn(*args))`.  The frontend attributes are set through JAX internals
(`jax._src`), kept to this one module and checked by tests/parallel/test_overlap.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import jax
from jax._src import core
from jax._src.compute_on import compute_on_p
from jax._src.interpreters import batching, mlir
from jax._src.interpreters import partial_eval as pe
from jax._src.lib.mlir import ir
from jax.experimental.xla_metadata import set_xla_metadata

_GROUP_IDS = itertools.count(1)  # one id per traced pair; XLA needs them unique per module
STREAM = 1

_tag_p = core.Primitive("jaxturbo_scheduling_group")
_tag_p.def_impl(lambda x, *, group: x)
_tag_p.def_abstract_eval(lambda aval, *, group: aval)
batching.defvectorized(_tag_p)


def _tag_lowering(ctx: mlir.LoweringRuleContext, x: ir.Value, *, group: int) -> list[ir.Value]:
    op = x.owner
    # compute_on wraps each result in an `annotate_device_placement` custom call: the group id
    # belongs on the call underneath it, which is what becomes the async call-start/done.
    target = op.attributes["call_target_name"] if "call_target_name" in op.attributes else None
    if target is not None and ir.StringAttr(target).value == "annotate_device_placement":
        op = op.operands[0].owner
    attrs = {}
    if "mhlo.frontend_attributes" in op.attributes:
        attrs = {a.name: a.attr for a in ir.DictAttr(op.attributes["mhlo.frontend_attributes"])}
    attrs["_scheduling_group_id"] = ir.StringAttr.get(str(group))
    op.attributes["mhlo.frontend_attributes"] = ir.DictAttr.get(attrs)
    return [x]


mlir.register_lowering(_tag_p, _tag_lowering, cacheable=False)


def psum_beside(x: jax.Array, axis: str, fn: Callable[..., Any], *args: Any) -> tuple[jax.Array, Any]:
    """(psum(x, axis), fn(*args)), with fn on GPU stream 1 while the all-reduce is in flight.

    Call inside shard_map.  fn must not read the all-reduce's result (it runs concurrently) and
    its inputs should be whole arrays (e.g. stacked weights plus a layer index), not slices made
    outside: a slice passed into the call would be copied on every call.  Inference only: the
    group tag has no differentiation rule.
    """
    group = next(_GROUP_IDS)
    reduced = set_xla_metadata(jax.lax.psum(x, axis), _scheduling_group_id=group)
    out = _stream_call(fn, args)
    out = jax.tree.map(lambda o: _tag_p.bind(o, group=group), out)
    return reduced, out


def _stream_call(fn: Callable[..., Any], args: tuple) -> Any:
    """fn(*args) as one call annotated for GPU stream `STREAM`.

    `jax.experimental.compute_on` would also put the annotation on every op *inside* the call;
    XLA then wraps those in calls of their own, nested in the outer one, which its GPU runtime
    rejects ("No ExecutionStreamId found for call-start", seen on H100).  So the function is
    traced here, outside compute_on's context, and bound to the same primitive: only the call
    itself is annotated."""
    flat, in_tree = jax.tree.flatten(args)
    closed, out_shape = jax.make_jaxpr(lambda *a: fn(*jax.tree.unflatten(in_tree, a)),
                                       return_shape=True)(*flat)
    jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)
    out_tree = jax.tree.structure(out_shape)
    outs = compute_on_p.bind(*closed.consts, *flat, jaxpr=jaxpr,
                             compute_type=f"gpu_stream:{STREAM}",
                             out_memory_spaces=(core.MemorySpace.Device,) * out_tree.num_leaves,
                             compiler_options_json=None)
    return jax.tree.unflatten(out_tree, outs)
