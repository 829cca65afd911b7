"""DeepSpeed-Ulysses attention: all-to-all turns sequence shards into head shards and back.

Per-device code, called inside `jax.shard_map` (Jacobs et al. 2023, "DeepSpeed Ulysses").  Each
of the P devices on `axis_name` holds T/P rows of every head.  An all-to-all gives each device
the whole sequence for H/P of the heads; attention runs locally on that (any mask works: causal,
segment ids, sliding window); a second all-to-all returns the output to sequence shards.

Communication per device and layer (B batch, T sequence, D head dim): each all-to-all moves
(P-1)/P of the device's T/P rows, i.e. about B·T/P·(2H + 2K')·D elements in all (q, k, v in;
out back), which stays constant when T and P grow together.

GQA: with K KV heads, each device needs the KV heads of its H/P query heads.
  * K % P == 0: KV heads are split like the query heads (K' = K, no extra traffic).
  * otherwise every KV head is repeated lcm(K, P)/K times before the all-to-all (K' = lcm(K, P))
    so that each device receives exactly the KV heads its query heads use.  Cost: K/V traffic
    and each device's K/V activation memory grow by lcm(K, P)/K (up to P/K for MQA-like models);
    the query and output traffic is unchanged.
Constraints: P divides the (local) query-head count H; P divides T.  When H has too few
divisors (e.g. SmolLM2's 9 heads on 8 devices) use ring attention or the hybrid.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxturbo.errors import UserError
from pallas_kernels import attention


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_ulysses(*, num_heads: int, num_kv_heads: int, ulysses_size: int, seq_len: int) -> None:
    """Raise UserError unless Ulysses over `ulysses_size` devices supports these shapes."""
    if num_heads % num_kv_heads:
        raise UserError(f"{num_kv_heads} KV heads do not divide {num_heads} query heads")
    if num_heads % ulysses_size:
        raise UserError(
            f"Ulysses size {ulysses_size} does not divide {num_heads} query heads; choose a "
            f"Ulysses size from {set(_divisors(num_heads))}, or use mode 'ring' (no head limit) "
            f"or 'hybrid' (Ulysses over a divisor of the heads, ring across)"
        )
    if seq_len % ulysses_size:
        raise UserError(
            f"sequence length {seq_len} is not divisible by the Ulysses size "
            f"{ulysses_size}; pad it to a multiple of {ulysses_size}"
        )


def kv_head_expansion(num_kv_heads: int, ulysses_size: int) -> int:
    """How many times each KV head is repeated before the all-to-all (1 when K % P == 0)."""
    return math.lcm(num_kv_heads, ulysses_size) // num_kv_heads


def seq_to_heads(x: jax.Array, axis_name: str) -> jax.Array:
    """[B, T/P, N, D] sequence shard -> [B, T, N/P, D] head shard (one all-to-all)."""
    return lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)


def heads_to_seq(x: jax.Array, axis_name: str) -> jax.Array:
    """[B, T, N/P, D] head shard -> [B, T/P, N, D] sequence shard (one all-to-all)."""
    return lax.all_to_all(x, axis_name, split_axis=1, concat_axis=2, tiled=True)


def to_head_shards(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, axis_name: str
):
    """The Ulysses input exchange: sequence shards -> head shards (GQA-aware, see module doc).

    q [B, T/P, H, D], k/v [B, T/P, K, D], segment_ids [B, T/P] ->
    q [B, T, H/P, D], k/v [B, T, K'/P, D], segment_ids [B, T].
    """
    size = lax.axis_size(axis_name)
    check_ulysses(
        num_heads=q.shape[2], num_kv_heads=k.shape[2], ulysses_size=size, seq_len=q.shape[1] * size
    )
    rep = kv_head_expansion(k.shape[2], size)
    if rep > 1:  # repeat each KV head in place so head e of the result serves group e // rep
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    q, k, v = (seq_to_heads(x, axis_name) for x in (q, k, v))
    if segment_ids is not None:  # ids are tiny: gather them whole
        segment_ids = lax.all_gather(segment_ids, axis_name, axis=1, tiled=True)
    return q, k, v, segment_ids


def ulysses_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    axis_name: str,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """Ulysses attention of this device's rows; call inside `shard_map` over `axis_name`.

    Args:
      q: [batch, seq/P, heads, head_dim]; k, v: [batch, seq/P, kv_heads, head_dim], this
        device's contiguous slice of the sequence (natural order, no zigzag).
      segment_ids: [batch, seq/P] int (packed sequences), same rows as q.
    Returns:
      [batch, seq/P, heads, head_dim] in q.dtype.
    """
    qh, kh, vh, seg = to_head_shards(q, k, v, segment_ids, axis_name)
    out = attention(
        qh,
        kh,
        vh,
        causal=causal,
        segment_ids=seg,
        sliding_window=sliding_window,
        scale=scale,
        softcap=softcap,
        implementation=implementation,
    )
    return heads_to_seq(out, axis_name)
