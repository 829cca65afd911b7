"""Pure-jnp grouped matmuls: the reference every grouped-GEMM implementation must reproduce.

Layout (dropless mixture-of-experts): the rows of `lhs` [M, K] are sorted by group (expert);
group g owns rows [offset_g, offset_g + group_sizes[g]) with offset_g = sum(group_sizes[:g]), and
multiplies them by its weight rhs[g].  Rows past sum(group_sizes) belong to no group: their
output is zero (padding of a static-size batch).  `transpose_rhs` takes the weights as
[G, N, K] (out, in: how HF stores stacked expert projections) instead of [G, K, N].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _dims(transpose_rhs: bool) -> lax.RaggedDotDimensionNumbers:
    """lhs [M, K] ragged along M against rhs [G, K, N] (or [G, N, K]) grouped along G."""
    return lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((1,), (2 if transpose_rhs else 1,)), ((), ())),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[0],
    )


def gmm_reference(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
    transpose_rhs: bool = False,
) -> jax.Array:
    """lhs [M, K], rhs [G, K, N] ([G, N, K] with transpose_rhs), group_sizes [G] int32 -> [M, N].

    Row block g of lhs times rhs[g]; rows past sum(group_sizes) are zero.  float32 sums; the
    result in `preferred_element_type` (default lhs.dtype)."""
    out = lax.ragged_dot_general(
        lhs,
        rhs,
        group_sizes.astype(jnp.int32),
        _dims(transpose_rhs),
        preferred_element_type=jnp.float32,
    )
    return out.astype(preferred_element_type or lhs.dtype)


def tgmm_reference(
    lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, preferred_element_type=None
) -> jax.Array:
    """lhs [M, K], grad [M, N], group_sizes [G] -> [G, K, N]: lhs_g^T @ grad_g per group.

    The weight gradient of `gmm_reference`; an empty group gives zeros, rows past
    sum(group_sizes) contribute nothing.  Result in `preferred_element_type` (default lhs.dtype)."""
    dims = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[],
    )
    out = lax.ragged_dot_general(
        lhs, grad, group_sizes.astype(jnp.int32), dims, preferred_element_type=jnp.float32
    )
    return out.astype(preferred_element_type or lhs.dtype)


def gmv_reference(
    x: jax.Array,
    rhs: jax.Array,
    expert_ids: jax.Array,
    *,
    preferred_element_type=None,
    transpose_rhs: bool = False,
) -> jax.Array:
    """x [M, K], rhs [G, K, N] ([G, N, K] with transpose_rhs), expert_ids [M] -> [M, N]:
    out[m] = x[m] @ rhs[expert_ids[m]], zero where expert_ids[m] is outside [0, G) (a padded
    token, or an expert held by another device).  float32 sums."""
    g = rhs.shape[0]
    ok = (expert_ids >= 0) & (expert_ids < g)
    w = rhs[jnp.clip(expert_ids, 0, g - 1)]
    spec = "mk,mnk->mn" if transpose_rhs else "mk,mkn->mn"
    out = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
    return jnp.where(ok[:, None], out, 0.0).astype(preferred_element_type or x.dtype)


def group_offsets(group_sizes: jax.Array) -> jax.Array:
    """group_sizes [G] -> offsets [G + 1]: group g owns rows [offsets[g], offsets[g + 1])."""
    sizes = group_sizes.astype(jnp.int32)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(sizes, dtype=jnp.int32)])
