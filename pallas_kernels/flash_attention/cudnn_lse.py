"""cuDNN flash attention split into the two halves ring attention needs (GPU, bf16/fp16).

  cudnn_attention_lse  forward that also returns the log-sum-exp;
  cudnn_attention_bwd  backward of one K/V block given a saved (global) output and lse.

`jax.nn.dot_product_attention(implementation="cudnn")` exposes neither: it returns no lse and
its backward is only reachable through its own VJP, which uses the lse and output of the same
call.  A ring merges per-block results and must run each block's backward with the *merged*
output and lse.  JAX's cuDNN module (`jax._src.cudnn.fused_attention_stablehlo`) has both
pieces: `dot_product_attention(..., return_residual=True)` returns the softmax statistics, and
the backward primitive takes the statistics and output as plain operands.  That module is
private, so every use of it is kept in this file; JAX is pinned (0.11.2), and the argument
lists below were read from that version's source (`_dot_product_attention_bwd_rule`,
`_dot_product_attention_bwd_impl`).  If a JAX upgrade breaks this file, the fallback is the
Pallas-Triton kernel (`implementation="pallas_triton"`), which needs no private API.

Assumptions, checked on a GPU by tests/pallas_kernels/test_cudnn_lse.py (and by
`python -m experiments.sp.bench --check-only` before timing):
  * cuDNN's residual is the FlashAttention-2 logsumexp of the *scaled* logits in natural log,
    i.e. jaxturbo's lse convention (`attention_reference`): ln sum_j exp(scale * q.k_j).  The
    conversion is kept in `_from_cudnn_stats` / `_to_cudnn_stats` (identity) so a different
    convention (e.g. log2, or unscaled) is fixed in one place.
  * The backward recomputes P = exp(scale * S - stats) per block and takes
    delta = rowsum(dO * O) from the O operand, so passing the merged output and lse gives this
    block's share of the full gradient (the FlashAttention-2 identity the ring relies on).
  * GQA: query head h uses KV head h // (H / K), the same grouping as the reference.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax import lax

# Private, version-pinned: see the module docstring.
from jax._src.cudnn import fused_attention_stablehlo as _fa

# The backward is bound through the wrapper primitive, the path `jax.nn.dot_product_attention`
# itself takes (its lowering goes through custom_partitioning; measured to work inside
# shard_map for Ulysses).  JAXTURBO_CUDNN_CORE_PRIMITIVE=1 binds the core primitive instead
# (`_dot_product_attention_bwd_impl`: no custom_partitioning), in case the wrapper's
# partitioning rules misbehave inside shard_map + lax.switch on first GPU contact.
_CORE = os.environ.get("JAXTURBO_CUDNN_CORE_PRIMITIVE", "0") == "1"


def _check(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> None:
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"cuDNN attention needs bf16/fp16 q, k, v of one dtype; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.ndim != 4 or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"expected q [B,T,H,D], k/v [B,S,K,D]; got {q.shape}, {k.shape}, {v.shape}"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"kv heads {k.shape[2]} must divide query heads {q.shape[2]}")
    if causal and q.shape[1] != k.shape[1]:
        # cuDNN's CAUSAL is top-left aligned, jaxturbo's bottom-right; they agree only when
        # T == S (all the ring needs: the diagonal block).
        raise ValueError(
            f"cuDNN lse attention: causal needs q_len == kv_len, got {q.shape[1]} and {k.shape[1]}"
        )


def _mask_type(causal: bool):
    return _fa.MaskType.CAUSAL if causal else _fa.MaskType.NO_MASK


def _scale(q: jax.Array, scale: float | None) -> float:
    return float(q.shape[-1] ** -0.5 if scale is None else scale)


def _from_cudnn_stats(stats: jax.Array) -> jax.Array:
    """cuDNN softmax stats [B, H, T] -> jaxturbo lse [B, H, T] (assumed identical, see top)."""
    return stats.astype(jnp.float32)


def _to_cudnn_stats(lse: jax.Array) -> jax.Array:
    """Inverse of `_from_cudnn_stats`, for the backward's stats operand."""
    return lse.astype(jnp.float32)


def cudnn_attention_lse(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """cuDNN flash attention forward with its log-sum-exp.

    Args:
      q: [B, T, H, D]; k, v: [B, S, K, D]; bf16 or fp16, H % K == 0; causal needs T == S.
      scale: logit scale, default D ** -0.5.
    Returns:
      out [B, T, H, D] in q.dtype, lse [B, H, T] float32 (natural log of sum_j exp(scale *
      q.k_j), as `attention_reference(..., return_lse=True)`).

    Differentiable in q, k, v through the output only: the lse is returned under
    `stop_gradient` (JAX's cuDNN VJP drops an lse cotangent; making that explicit avoids a
    silently wrong gradient).  Use the Pallas kernels where the lse itself needs a gradient.
    """
    _check(q, k, v, causal)
    out, stats = _fa.dot_product_attention(
        q,
        k,
        v,
        scale=_scale(q, scale),
        mask_type=_mask_type(causal),
        qkv_layout="BTNH",
        return_residual=True,
    )
    return out, lax.stop_gradient(_from_cudnn_stats(stats))


def cudnn_attention_bwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    dout: jax.Array,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """cuDNN flash attention backward from a saved output and lse (no lse cotangent).

    Args:
      q, out, dout: [B, T, H, D]; k, v: [B, S, K, D] (bf16/fp16; out/dout are cast to q.dtype);
        lse: [B, H, T] float32.  out/lse may be those of attention over a longer key sequence
        of which k/v is one block (see `reference.attention_backward_reference`).
    Returns:
      (dq [B, T, H, D], dk [B, S, K, D], dv [B, S, K, D]) in q.dtype.
    """
    _check(q, k, v, causal)
    b, t, h, _ = q.shape
    if lse.shape != (b, h, t):
        raise ValueError(f"lse must be [B, H, T] = {(b, h, t)}, got {lse.shape}")
    unused = jnp.zeros(0, dtype=q.dtype)  # what dot_product_attention passes for absent inputs
    operands = (
        q,
        k,
        v,
        unused,  # bias
        unused,
        unused,  # q_seqlen, kv_seqlen
        unused,
        unused,  # q_offsets, kv_offsets
        unused,
        unused,  # page_table_k, page_table_v
        _to_cudnn_stats(lse),
        out.astype(q.dtype),
        dout.astype(q.dtype),
    )
    params = dict(
        scale=_scale(q, scale),
        seed=42,
        dropout_rate=0.0,
        variadic_args=(False, False),  # (has_bias, has_dbias)
        mask_type=_mask_type(causal),
        layout=_fa.AttentionLayout.BTNH.value,
        sliding_window_length=None,
    )
    if _CORE:
        dq, dk, dv = _fa._dot_product_attention_bwd_impl(*operands, **params)
    else:
        dq, dk, dv = _fa._dot_product_attention_bwd_p_wrapper.bind(*operands, **params)
    return dq, dk, dv
