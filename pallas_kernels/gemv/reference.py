"""Pure-jnp GEMV: the reference for the GEMV kernels.

The weight keeps the HF orientation [out, in] (as `jaxturbo.models.layers.linear`); with
`layer`, it is one layer of a stacked [L, out, in] parameter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gemv_reference(x: jax.Array, w: jax.Array, *, layer: jax.Array | int | None = None
                   ) -> jax.Array:
    """x [B, K] @ w[N, K]^T (or w[layer] of [L, N, K]) -> [B, N] in x.dtype, float32 sums."""
    if layer is not None:
        w = w[layer]
    return jnp.einsum("bk,nk->bn", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
