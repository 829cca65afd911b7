"""Grouped matmuls for mixture-of-experts: `gmm` (differentiable), `tgmm`, `gmv` (decode),
dispatched by `registry`.

Backends, in "auto"'s order:
  "pallas_triton"  our Pallas-Triton kernels (GPU; interpret mode on CPU);
  "mosaic_tpu"     our Mosaic TPU kernels, megablox style (TPU; TPU interpret mode on CPU);
  "xla"            `jax.lax.ragged_dot` (the reference; any platform; on GPU it may fall back to
                   a dense per-expert materialisation, far slower than a grouped GEMM).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import registry
from pallas_kernels.grouped_matmul.reference import gmm_reference, gmv_reference, tgmm_reference


@dataclasses.dataclass(frozen=True)
class GroupedCall:
    """The static options of a grouped matmul call (the arrays travel beside it): the result's
    dtype, the weights' layout ([G, N, K] with transpose_rhs) and gmm's weight-gradient tiles
    (the `config` of its tgmm)."""

    out_dtype: Any
    transpose_rhs: bool = False
    tgmm_config: Any = None


def _kernels(impl: str):
    if impl == "pallas_triton":
        from pallas_kernels.grouped_matmul import pallas_triton as mod
    else:
        from pallas_kernels.grouped_matmul import mosaic_tpu as mod
    return mod


def _check(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, transpose_rhs: bool, what: str
) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(
            f"{what}: lhs must be [M, K] and rhs [G, K, N] (got lhs "
            f"{tuple(lhs.shape)}, rhs {tuple(rhs.shape)})"
        )
    k = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != k:
        layout = "[G, N, K] (transpose_rhs)" if transpose_rhs else "[G, K, N]"
        raise ValueError(
            f"{what}: lhs has K={lhs.shape[1]} but rhs {tuple(rhs.shape)} as "
            f"{layout} contracts over {k}"
        )
    if group_sizes.shape != (rhs.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"{what}: group_sizes must be an integer [G={rhs.shape[0]}] array (got "
            f"{group_sizes.dtype}{list(group_sizes.shape)})"
        )


@dataclasses.dataclass(frozen=True)
class _Opts:
    """Static arguments of the differentiable kernel call."""

    impl: str
    call: GroupedCall
    interpret: Any
    config: Any


def _kernel_gmm(lhs, rhs, group_sizes, opts: _Opts, *, transpose_rhs: bool, out_dtype):
    return _kernels(opts.impl).gmm(
        lhs,
        rhs,
        group_sizes,
        preferred_element_type=out_dtype,
        transpose_rhs=transpose_rhs,
        config=opts.config,
        interpret=opts.interpret,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm_vjp(lhs, rhs, group_sizes, opts: _Opts):
    return _kernel_gmm(
        lhs,
        rhs,
        group_sizes,
        opts,
        transpose_rhs=opts.call.transpose_rhs,
        out_dtype=opts.call.out_dtype,
    )


def _gmm_fwd(lhs, rhs, group_sizes, opts: _Opts):
    return _gmm_vjp(lhs, rhs, group_sizes, opts), (lhs, rhs, group_sizes)


def _gmm_bwd(opts: _Opts, res, dout):
    """d lhs = dout @ rhs_g^T per group (gmm with the other rhs orientation: no transposed
    copy of the weights); d rhs = lhs_g^T @ dout_g (tgmm; dout_g^T @ lhs_g for [G, N, K])."""
    lhs, rhs, group_sizes = res
    dout = dout.astype(lhs.dtype)  # the kernels multiply operands of one dtype
    dlhs = _kernel_gmm(
        dout, rhs, group_sizes, opts, transpose_rhs=not opts.call.transpose_rhs, out_dtype=lhs.dtype
    )
    a, b = (dout, lhs) if opts.call.transpose_rhs else (lhs, dout)
    drhs = _kernels(opts.impl).tgmm(
        a,
        b,
        group_sizes,
        preferred_element_type=rhs.dtype,
        config=opts.call.tgmm_config,
        interpret=opts.interpret,
    )
    return dlhs, drhs, np.zeros(group_sizes.shape, jax.dtypes.float0)


_gmm_vjp.defvjp(_gmm_fwd, _gmm_bwd)


def _kernel_gmm_run(impl: str):
    def run(call: GroupedCall, lhs, rhs, group_sizes, *, config, interpret):
        return _gmm_vjp(
            lhs, rhs, group_sizes.astype(jnp.int32), _Opts(impl, call, interpret, config)
        )

    return run


def _xla_gmm(call: GroupedCall, lhs, rhs, group_sizes, *, config, interpret):
    return gmm_reference(
        lhs,
        rhs,
        group_sizes,
        preferred_element_type=call.out_dtype,
        transpose_rhs=call.transpose_rhs,
    )


def _kernel_tgmm(impl: str):
    def run(call: GroupedCall, lhs, grad, group_sizes, *, config, interpret):
        return _kernels(impl).tgmm(
            lhs,
            grad,
            group_sizes.astype(jnp.int32),
            preferred_element_type=call.out_dtype,
            config=config,
            interpret=interpret,
        )

    return run


def _xla_tgmm(call: GroupedCall, lhs, grad, group_sizes, *, config, interpret):
    return tgmm_reference(lhs, grad, group_sizes, preferred_element_type=call.out_dtype)


def _gmv_by_sorting(x, rhs, expert_ids, gmm_fn):
    """gmv through a grouped GEMM: tokens sorted by expert (ids outside [0, G) last, past
    sum(group_sizes), so zero), multiplied, and put back in their order."""
    g = rhs.shape[0]
    ids = jnp.where((expert_ids >= 0) & (expert_ids < g), expert_ids, g).astype(jnp.int32)
    order = jnp.argsort(ids, stable=True)
    sizes = jnp.zeros((g + 1,), jnp.int32).at[ids].add(1)[:g]
    out = gmm_fn(x[order], rhs, sizes)
    return jnp.zeros_like(out).at[order].set(out)


def _triton_gmv(call: GroupedCall, x, rhs, expert_ids, *, config, interpret):
    """One GEMV per row through its expert's weight."""
    return _kernels("pallas_triton").gmv(
        x,
        rhs,
        expert_ids,
        preferred_element_type=call.out_dtype,
        transpose_rhs=call.transpose_rhs,
        config=config,
        interpret=interpret,
    )


def _tpu_gmv(call: GroupedCall, x, rhs, expert_ids, *, config, interpret):
    """Rows sorted by expert into the grouped GEMM."""
    return _gmv_by_sorting(
        x,
        rhs,
        expert_ids,
        lambda a, w, s: _kernels("mosaic_tpu").gmm(
            a,
            w,
            s,
            preferred_element_type=call.out_dtype,
            transpose_rhs=call.transpose_rhs,
            config=config,
            interpret=interpret,
        ),
    )


def _xla_gmv(call: GroupedCall, x, rhs, expert_ids, *, config, interpret):
    return gmv_reference(
        x, rhs, expert_ids, preferred_element_type=call.out_dtype, transpose_rhs=call.transpose_rhs
    )


def _op(name: str, triton, tpu, xla) -> registry.Op:
    return registry.register(
        registry.Op(
            name,
            (
                registry.Backend("pallas_triton", triton, platform="gpu", pallas=True),
                registry.Backend("mosaic_tpu", tpu, platform="tpu", pallas=True),
                registry.Backend("xla", xla),
            ),
        )
    )


GMM = _op("gmm", _kernel_gmm_run("pallas_triton"), _kernel_gmm_run("mosaic_tpu"), _xla_gmm)
TGMM = _op("tgmm", _kernel_tgmm("pallas_triton"), _kernel_tgmm("mosaic_tpu"), _xla_tgmm)
GMV = _op("gmv", _triton_gmv, _tpu_gmv, _xla_gmv)
IMPLEMENTATIONS = GMM.implementations


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    implementation: str = "auto",
    preferred_element_type=None,
    transpose_rhs: bool = False,
    interpret: Any = None,
    config: Any = None,
    tgmm_config: Any = None,
) -> jax.Array:
    """Grouped matmul: lhs [M, K] (rows sorted by group), rhs [G, K, N] (or [G, N, K] with
    transpose_rhs, HF's stacked [experts, out, in]), group_sizes [G] int -> [M, N].

    Rows [offset_g, offset_g + group_sizes[g]) are multiplied by rhs[g]; rows past
    sum(group_sizes) are zero (`reference.gmm_reference`).  float32 accumulation; the result
    in `preferred_element_type` (default lhs.dtype).  Differentiable in lhs and rhs: the
    kernels' backward is a gmm against the other rhs orientation (d lhs) and a tgmm (d rhs).
    `config` / `tgmm_config`: the implementation's tile Config for gmm (also used for d lhs)
    and for the weight gradient; `interpret` defaults to True off the kernel's platform."""
    _check(lhs, rhs, group_sizes, transpose_rhs, "gmm")
    call = GroupedCall(jnp.dtype(preferred_element_type or lhs.dtype), transpose_rhs, tgmm_config)
    return GMM(
        call,
        lhs,
        rhs,
        group_sizes,
        implementation=implementation,
        config=config,
        interpret=interpret,
    )


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    implementation: str = "auto",
    preferred_element_type=None,
    interpret: Any = None,
    config: Any = None,
) -> jax.Array:
    """Per-group lhs_g^T @ grad_g: lhs [M, K], grad [M, N], group_sizes [G] -> [G, K, N]
    (the weight gradient of `gmm`; empty groups give zeros; `reference.tgmm_reference`).
    Not differentiable through the kernels."""
    if lhs.ndim != 2 or grad.ndim != 2 or lhs.shape[0] != grad.shape[0]:
        raise ValueError(
            f"tgmm: lhs [M, K] and grad [M, N] must share M (got "
            f"{tuple(lhs.shape)}, {tuple(grad.shape)})"
        )
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"tgmm: group_sizes must be an integer [G] array (got "
            f"{group_sizes.dtype}{list(group_sizes.shape)})"
        )
    call = GroupedCall(jnp.dtype(preferred_element_type or lhs.dtype))
    return TGMM(
        call,
        lhs,
        grad,
        group_sizes,
        implementation=implementation,
        config=config,
        interpret=interpret,
    )


def gmv(
    x: jax.Array,
    rhs: jax.Array,
    expert_ids: jax.Array,
    *,
    implementation: str = "auto",
    preferred_element_type=None,
    transpose_rhs: bool = False,
    interpret: Any = None,
    config: Any = None,
) -> jax.Array:
    """Decode-sized grouped matmul without sorting: x [M, K] (one row per (token, expert)
    pair), rhs [G, K, N] (or [G, N, K] with transpose_rhs), expert_ids [M] -> [M, N] with
    out[m] = x[m] @ rhs[expert_ids[m]]; an id outside [0, G) (padding, or an expert on another
    device) gives a zero row.  Only the weights of experts some row is routed to are read.

    pallas_triton: one GEMV per row through its expert's weight; mosaic_tpu: rows sorted by
    expert into the grouped GEMM; xla: `reference.gmv_reference` (a gather).  Forward only."""
    if x.ndim != 2 or rhs.ndim != 3 or expert_ids.shape != (x.shape[0],):
        raise ValueError(
            f"gmv: x must be [M, K], rhs [G, K, N] and expert_ids [M] (got x "
            f"{tuple(x.shape)}, rhs {tuple(rhs.shape)}, expert_ids "
            f"{tuple(expert_ids.shape)})"
        )
    k = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if x.shape[1] != k:
        raise ValueError(f"gmv: x has K={x.shape[1]} but rhs {tuple(rhs.shape)} contracts over {k}")
    call = GroupedCall(jnp.dtype(preferred_element_type or x.dtype), transpose_rhs)
    return GMV(
        call, x, rhs, expert_ids, implementation=implementation, config=config, interpret=interpret
    )
