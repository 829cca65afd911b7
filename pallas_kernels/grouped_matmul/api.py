"""Grouped matmuls for mixture-of-experts: `gmm` (differentiable), `tgmm`, `gmv` (decode).

`implementation` picks the backend:
  "xla"            `jax.lax.ragged_dot` (the reference; any platform; on GPU it may fall back to
                   a dense per-expert materialisation, far slower than a grouped GEMM);
  "pallas_triton"  our Pallas-Triton kernels (GPU; interpret mode on CPU);
  "mosaic_tpu"     our Mosaic TPU kernels, megablox style (TPU; TPU interpret mode on CPU);
  "pallas"         the platform's kernel: mosaic_tpu on TPU, else pallas_triton;
  "auto"           pallas_triton on GPU, mosaic_tpu on TPU, xla elsewhere (logged once).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxturbo.errors import UserError
from pallas_kernels.grouped_matmul.reference import (gmm_reference, gmv_reference,
                                                     tgmm_reference)

Implementation = Literal["auto", "pallas", "pallas_triton", "mosaic_tpu", "xla"]
IMPLEMENTATIONS = ("auto", "pallas", "pallas_triton", "mosaic_tpu", "xla")

_log = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()


def _platform() -> str:
    return jax.devices()[0].platform


def resolve_implementation(implementation: str, what: str = "gmm") -> str:
    """The concrete backend for `implementation` on this platform; "auto" logs its choice once
    per (entry point, backend) at INFO."""
    if implementation not in IMPLEMENTATIONS:
        raise UserError(f"{what} implementation {implementation!r} is unknown; choose one of "
                        f"{IMPLEMENTATIONS}")
    platform = _platform()
    if implementation == "pallas":
        return "mosaic_tpu" if platform == "tpu" else "pallas_triton"
    if implementation != "auto":
        return implementation
    impl, why = {
        "gpu": ("pallas_triton", "a GPU: the Pallas-Triton grouped GEMM (ragged_dot may "
                "materialise dense per-expert products there)"),
        "tpu": ("mosaic_tpu", "a TPU: the Mosaic TPU grouped GEMM"),
    }.get(platform, ("xla", f"platform {platform!r} has no grouped-GEMM kernel: "
                     "jax.lax.ragged_dot"))
    if (what, impl) not in _logged:
        _logged.add((what, impl))
        _log.info("grouped_matmul.%s: implementation=%r on %s", what, impl, why)
    return impl


def _interpret(impl: str, interpret: Any) -> Any:
    """Kernels run in interpret mode when asked, or when their platform is absent."""
    if interpret is not None:
        return interpret
    return _platform() != ("tpu" if impl == "mosaic_tpu" else "gpu")


def _kernels(impl: str):
    if impl == "pallas_triton":
        from pallas_kernels.grouped_matmul import pallas_triton as mod
    else:
        from pallas_kernels.grouped_matmul import mosaic_tpu as mod
    return mod


def _check(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, transpose_rhs: bool,
           what: str) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise UserError(f"{what}: lhs must be [M, K] and rhs [G, K, N] (got lhs "
                        f"{tuple(lhs.shape)}, rhs {tuple(rhs.shape)})")
    k = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != k:
        layout = "[G, N, K] (transpose_rhs)" if transpose_rhs else "[G, K, N]"
        raise UserError(f"{what}: lhs has K={lhs.shape[1]} but rhs {tuple(rhs.shape)} as "
                        f"{layout} contracts over {k}")
    if group_sizes.shape != (rhs.shape[0],) or not jnp.issubdtype(group_sizes.dtype,
                                                                   jnp.integer):
        raise UserError(f"{what}: group_sizes must be an integer [G={rhs.shape[0]}] array (got "
                        f"{group_sizes.dtype}{list(group_sizes.shape)})")


@dataclasses.dataclass(frozen=True)
class _Opts:
    """Static arguments of the differentiable kernel call."""

    impl: str
    out_dtype: Any
    transpose_rhs: bool
    interpret: Any
    config: Any
    tgmm_config: Any


def _kernel_gmm(lhs, rhs, group_sizes, opts: _Opts, *, transpose_rhs: bool, out_dtype):
    return _kernels(opts.impl).gmm(lhs, rhs, group_sizes, preferred_element_type=out_dtype,
                                   transpose_rhs=transpose_rhs, config=opts.config,
                                   interpret=opts.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm_vjp(lhs, rhs, group_sizes, opts: _Opts):
    return _kernel_gmm(lhs, rhs, group_sizes, opts, transpose_rhs=opts.transpose_rhs,
                       out_dtype=opts.out_dtype)


def _gmm_fwd(lhs, rhs, group_sizes, opts: _Opts):
    return _gmm_vjp(lhs, rhs, group_sizes, opts), (lhs, rhs, group_sizes)


def _gmm_bwd(opts: _Opts, res, dout):
    """d lhs = dout @ rhs_g^T per group (gmm with the other rhs orientation: no transposed
    copy of the weights); d rhs = lhs_g^T @ dout_g (tgmm; dout_g^T @ lhs_g for [G, N, K])."""
    lhs, rhs, group_sizes = res
    dout = dout.astype(lhs.dtype)  # the kernels multiply operands of one dtype
    dlhs = _kernel_gmm(dout, rhs, group_sizes, opts, transpose_rhs=not opts.transpose_rhs,
                       out_dtype=lhs.dtype)
    a, b = (dout, lhs) if opts.transpose_rhs else (lhs, dout)
    drhs = _kernels(opts.impl).tgmm(a, b, group_sizes, preferred_element_type=rhs.dtype,
                                    config=opts.tgmm_config, interpret=opts.interpret)
    return dlhs, drhs, np.zeros(group_sizes.shape, jax.dtypes.float0)


_gmm_vjp.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
        implementation: Implementation = "auto", preferred_element_type=None,
        transpose_rhs: bool = False, interpret: Any = None, config: Any = None,
        tgmm_config: Any = None) -> jax.Array:
    """Grouped matmul: lhs [M, K] (rows sorted by group), rhs [G, K, N] (or [G, N, K] with
    transpose_rhs, HF's stacked [experts, out, in]), group_sizes [G] int -> [M, N].

    Rows [offset_g, offset_g + group_sizes[g]) are multiplied by rhs[g]; rows past
    sum(group_sizes) are zero (`reference.gmm_reference`).  float32 accumulation; the result
    in `preferred_element_type` (default lhs.dtype).  Differentiable in lhs and rhs: the
    kernels' backward is a gmm against the other rhs orientation (d lhs) and a tgmm (d rhs).
    `config` / `tgmm_config`: the implementation's tile Config for gmm (also used for d lhs)
    and for the weight gradient; `interpret` defaults to True off the kernel's platform."""
    _check(lhs, rhs, group_sizes, transpose_rhs, "gmm")
    impl = resolve_implementation(implementation, "gmm")
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if impl == "xla":
        return gmm_reference(lhs, rhs, group_sizes, preferred_element_type=out_dtype,
                             transpose_rhs=transpose_rhs)
    opts = _Opts(impl, out_dtype, transpose_rhs, _interpret(impl, interpret), config,
                 tgmm_config)
    return _gmm_vjp(lhs, rhs, group_sizes.astype(jnp.int32), opts)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *,
         implementation: Implementation = "auto", preferred_element_type=None,
         interpret: Any = None, config: Any = None) -> jax.Array:
    """Per-group lhs_g^T @ grad_g: lhs [M, K], grad [M, N], group_sizes [G] -> [G, K, N]
    (the weight gradient of `gmm`; empty groups give zeros; `reference.tgmm_reference`).
    Not differentiable through the kernels."""
    if lhs.ndim != 2 or grad.ndim != 2 or lhs.shape[0] != grad.shape[0]:
        raise UserError(f"tgmm: lhs [M, K] and grad [M, N] must share M (got "
                        f"{tuple(lhs.shape)}, {tuple(grad.shape)})")
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise UserError(f"tgmm: group_sizes must be an integer [G] array (got "
                        f"{group_sizes.dtype}{list(group_sizes.shape)})")
    impl = resolve_implementation(implementation, "tgmm")
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if impl == "xla":
        return tgmm_reference(lhs, grad, group_sizes, preferred_element_type=out_dtype)
    return _kernels(impl).tgmm(lhs, grad, group_sizes.astype(jnp.int32),
                               preferred_element_type=out_dtype, config=config,
                               interpret=_interpret(impl, interpret))


def _gmv_by_sorting(x, rhs, expert_ids, gmm_fn):
    """gmv through a grouped GEMM: tokens sorted by expert (ids outside [0, G) last, past
    sum(group_sizes), so zero), multiplied, and put back in their order."""
    g = rhs.shape[0]
    ids = jnp.where((expert_ids >= 0) & (expert_ids < g), expert_ids, g).astype(jnp.int32)
    order = jnp.argsort(ids, stable=True)
    sizes = jnp.zeros((g + 1,), jnp.int32).at[ids].add(1)[:g]
    out = gmm_fn(x[order], rhs, sizes)
    return jnp.zeros_like(out).at[order].set(out)


def gmv(x: jax.Array, rhs: jax.Array, expert_ids: jax.Array, *,
        implementation: Implementation = "auto", preferred_element_type=None,
        transpose_rhs: bool = False, interpret: Any = None, config: Any = None) -> jax.Array:
    """Decode-sized grouped matmul without sorting: x [M, K] (one row per (token, expert)
    pair), rhs [G, K, N] (or [G, N, K] with transpose_rhs), expert_ids [M] -> [M, N] with
    out[m] = x[m] @ rhs[expert_ids[m]]; an id outside [0, G) (padding, or an expert on another
    device) gives a zero row.  Only the weights of experts some row is routed to are read.

    pallas_triton: one GEMV per row through its expert's weight; mosaic_tpu: rows sorted by
    expert into the grouped GEMM; xla: `reference.gmv_reference` (a gather).  Forward only."""
    if x.ndim != 2 or rhs.ndim != 3 or expert_ids.shape != (x.shape[0],):
        raise UserError(f"gmv: x must be [M, K], rhs [G, K, N] and expert_ids [M] (got x "
                        f"{tuple(x.shape)}, rhs {tuple(rhs.shape)}, expert_ids "
                        f"{tuple(expert_ids.shape)})")
    k = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if x.shape[1] != k:
        raise UserError(f"gmv: x has K={x.shape[1]} but rhs {tuple(rhs.shape)} contracts over "
                        f"{k}")
    impl = resolve_implementation(implementation, "gmv")
    out_dtype = jnp.dtype(preferred_element_type or x.dtype)
    if impl == "xla":
        return gmv_reference(x, rhs, expert_ids, preferred_element_type=out_dtype,
                             transpose_rhs=transpose_rhs)
    interp = _interpret(impl, interpret)
    if impl == "pallas_triton":
        from pallas_kernels.grouped_matmul import pallas_triton
        return pallas_triton.gmv(x, rhs, expert_ids, preferred_element_type=out_dtype,
                                 transpose_rhs=transpose_rhs, config=config, interpret=interp)
    from pallas_kernels.grouped_matmul import mosaic_tpu
    return _gmv_by_sorting(x, rhs, expert_ids, lambda a, w, s: mosaic_tpu.gmm(
        a, w, s, preferred_element_type=out_dtype, transpose_rhs=transpose_rhs, config=config,
        interpret=interp))
