"""The one matrix product of the Pallas-Triton kernels: float32 accumulation, and float32
operands at float32-level accuracy on the tensor cores.

Triton runs an IEEE float32 dot (what `lax.Precision.HIGHEST` lowers to) on the CUDA cores, an
order of magnitude slower than the tensor cores: the float32 attention kernels of GRPO's
rollouts spent most of their time there.  On a GPU, float32 operands therefore take three TF32
products (`TF32_TF32_F32_X3`: the operands split into high and low TF32 parts), about as
accurate as float32 (relative error ~1e-6, against ~1e-3 for one TF32 product).  Interpreted
(on CPU) the product is XLA's float32 dot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _float32_precision():
    return (
        lax.DotAlgorithmPreset.TF32_TF32_F32_X3
        if jax.default_backend() == "gpu"
        else lax.Precision.HIGHEST
    )


def dot(a: jax.Array, b: jax.Array, trans_b: bool = False, trans_a: bool = False) -> jax.Array:
    """a [M, K] @ b [K, N] in float32 (a given as [K, M] with trans_a, b as [N, K] with
    trans_b).  tl.dot needs every dimension >= 16: narrower products (an 8-wide rope key) are
    a broadcast multiply and sum."""
    if min(*a.shape, *b.shape) < 16:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        a = a.T if trans_a else a
        b = b.T if trans_b else b
        return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)
    prec = _float32_precision() if a.dtype == jnp.float32 else None
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)
