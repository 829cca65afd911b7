"""Decode attention and MLA latent decode through Mosaic TPU (TPU interpret mode on CPU).

Grid (batch, cache block); the cache-block axis is the reduction ("arbitrary") with the running
max / sum / accumulator in VMEM.  Each step loads one cache block holding every KV head (so the
block's last two dims are the full [K, D]) and the lengths are scalar-prefetched: steps past a
sequence's length repeat the last valid block index (no DMA) and skip the compute.
Only tested in TPU interpret mode so far (no TPU lent here).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode_attention.common import DecodeCall, MLADecodeCall
from pallas_kernels.flash_attention.common import NEG_INF, pad_seq, round_up


@dataclasses.dataclass(frozen=True)
class Config:
    block_k: int = 256


def _dot(a, b, trans_b=False):
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a,
        b,
        (((1,), (1 if trans_b else 0,)), ((), ())),
        precision=prec,
        preferred_element_type=jnp.float32,
    )


def softmax_update(m_sc, l_sc, acc_sc, rows, s, v):
    """Online-softmax update of scratch rows `rows` (a static slice) with logits s and values v."""
    m = m_sc[rows]
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe)
    l_sc[rows] = alpha * l_sc[rows] + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[rows] = alpha * acc_sc[rows] + _dot(p.astype(v.dtype), v)
    m_sc[rows] = m_new


def _init(j, m_sc, l_sc, acc_sc):
    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)


def _finish(j, nk, o_ref, m_sc, l_sc, acc_sc):
    @pl.when(j == nk - 1)
    def _():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def _decode_kernel(
    len_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    m_sc,
    l_sc,
    acc_sc,
    *,
    scale,
    softcap,
    window,
    bk: int,
    nk: int,
    kv_heads: int,
    groups: int,
):
    b, j = pl.program_id(0), pl.program_id(1)
    length = len_ref[b]
    _init(j, m_sc, l_sc, acc_sc)
    lo = 0 if window is None else jnp.maximum(length - 1 - window, 0) // bk

    @pl.when((j * bk < length) & (j >= lo))
    def _():
        pos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        ok = pos < length
        if window is not None:
            ok = ok & (pos >= length - 1 - window)
        for kh in range(kv_heads):  # static: each KV head serves its group of query rows
            rows = slice(kh * groups, (kh + 1) * groups)
            s = _dot(q_ref[rows, :], k_ref[:, kh, :], trans_b=True) * scale
            if softcap is not None:
                s = softcap * jnp.tanh(s / softcap)
            s = jnp.where(ok, s, NEG_INF)
            softmax_update(m_sc, l_sc, acc_sc, rows, s, v_ref[:, kh, :])

    _finish(j, nk, o_ref, m_sc, l_sc, acc_sc)


def _mla_kernel(
    len_ref, q_ref, qr_ref, c_ref, kr_ref, o_ref, m_sc, l_sc, acc_sc, *, scale, bk: int, nk: int
):
    b, j = pl.program_id(0), pl.program_id(1)
    length = len_ref[b]
    _init(j, m_sc, l_sc, acc_sc)

    @pl.when(j * bk < length)
    def _():
        c = c_ref[...]
        s = _dot(q_ref[...], c, trans_b=True) + _dot(qr_ref[...], kr_ref[...], trans_b=True)
        pos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        s = jnp.where(pos < length, s * scale, NEG_INF)
        softmax_update(m_sc, l_sc, acc_sc, slice(None), s, c)

    _finish(j, nk, o_ref, m_sc, l_sc, acc_sc)


def _last_block(j, length, bk):
    """Past the sequence's end, keep the last valid block index so no new DMA is issued."""
    return jnp.minimum(j, jnp.maximum(length - 1, 0) // bk)


def _interp(interpret):
    return pltpu.InterpretParams() if interpret is True else interpret


def decode_attention(
    call: DecodeCall,
    *,
    config: Config | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """`call.q` [B, H, D] over its caches -> [B, H, D] (see the reference).

    Stacked caches ([L, B, S, K, D] with `call.layer`) are read in place (the layer index is
    scalar-prefetched with the lengths), not copied out as `cache[layer]` would be."""
    q, k_cache, v_cache, layer = call.q, call.k_cache, call.v_cache, call.layer
    cfg = config or Config()
    b, h, d = q.shape
    s, kh = k_cache.shape[-3], k_cache.shape[-2]
    if h % kh:
        raise ValueError(f"kv heads {kh} must divide query heads {h}")
    bk = min(cfg.block_k, round_up(s, 8))
    sp = round_up(s, bk)
    nk = sp // bk
    if layer is not None and sp != s:
        # a last block overhanging the cache would leave stale VMEM rows, and 0 * NaN there
        # poisons the output: such a cache is sliced and padded (a copy) as before
        k_cache, v_cache, layer = k_cache[layer], v_cache[layer], None
    if layer is None:
        k_cache, v_cache, layer = pad_seq(k_cache, sp)[None], pad_seq(v_cache, sp)[None], 0
    scale = d**-0.5 if call.scale is None else call.scale
    cache_spec = pl.BlockSpec(
        (None, None, bk, kh, d),
        lambda bb, j, lens, lay: (lay[0], bb, _last_block(j, lens[bb], bk), 0, 0),
    )
    q_spec = pl.BlockSpec((None, h, d), lambda bb, j, lens, lay: (bb, 0, 0))
    kernel = functools.partial(
        _decode_kernel,
        scale=float(scale),
        softcap=call.softcap,
        window=call.sliding_window,
        bk=bk,
        nk=nk,
        kv_heads=kh,
        groups=h // kh,
    )
    return pl.pallas_call(
        lambda len_ref, lay_ref, *refs: kernel(len_ref, *refs),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, nk),
            in_specs=[q_spec, cache_spec, cache_spec],
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((h, 1), jnp.float32),
                pltpu.VMEM((h, 1), jnp.float32),
                pltpu.VMEM((h, d), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((b, h, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=_interp(interpret),
        name="jaxturbo_decode_tpu",
    )(call.lengths.astype(jnp.int32), jnp.asarray(layer, jnp.int32).reshape(1), q, k_cache, v_cache)


def mla_decode_attention(
    call: MLADecodeCall,
    *,
    config: Config | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """MLA latent decode of `call` (q_latent [B, H, R], q_rope [B, H, Dr] over the latent and
    rope caches) -> [B, H, R] (see `mla_decode_reference`).

    Stacked caches (with `call.layer`) are read in place as in `decode_attention`.  Any R, Dr
    and H: every block spans whole rows (and all heads), which Mosaic accepts at any width,
    padding lanes in VMEM, not in HBM."""
    q_latent, q_rope, latent_cache, rope_cache = (
        call.q_latent,
        call.q_rope,
        call.latent_cache,
        call.rope_cache,
    )
    layer = call.layer
    cfg = config or Config()
    b, h, r = q_latent.shape
    dr = q_rope.shape[-1]
    s = latent_cache.shape[-2]
    bk = min(cfg.block_k, round_up(s, 8))
    sp = round_up(s, bk)
    nk = sp // bk
    if layer is not None and sp != s:  # see decode_attention
        latent_cache, rope_cache, layer = latent_cache[layer], rope_cache[layer], None
    if layer is None:
        latent_cache, rope_cache = pad_seq(latent_cache, sp)[None], pad_seq(rope_cache, sp)[None]
        layer = 0
    cmap = lambda bb, j, lens, lay: (lay[0], bb, _last_block(j, lens[bb], bk), 0)
    qmap = lambda bb, j, lens, lay: (bb, 0, 0)
    kernel = functools.partial(_mla_kernel, scale=float(call.scale), bk=bk, nk=nk)
    return pl.pallas_call(
        lambda len_ref, lay_ref, *refs: kernel(len_ref, *refs),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, nk),
            in_specs=[
                pl.BlockSpec((None, h, r), qmap),
                pl.BlockSpec((None, h, dr), qmap),
                pl.BlockSpec((None, None, bk, r), cmap),
                pl.BlockSpec((None, None, bk, dr), cmap),
            ],
            out_specs=pl.BlockSpec((None, h, r), qmap),
            scratch_shapes=[
                pltpu.VMEM((h, 1), jnp.float32),
                pltpu.VMEM((h, 1), jnp.float32),
                pltpu.VMEM((h, r), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((b, h, r), q_latent.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=_interp(interpret),
        name="jaxturbo_mla_decode_tpu",
    )(
        call.lengths.astype(jnp.int32),
        jnp.asarray(layer, jnp.int32).reshape(1),
        q_latent,
        q_rope,
        latent_cache,
        rope_cache,
    )
