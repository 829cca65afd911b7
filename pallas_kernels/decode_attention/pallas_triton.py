"""Decode attention and MLA latent decode through the Pallas-Triton lowering (GPU; interpret on CPU).

Split-K ("flash-decoding"): one query token per sequence gives too few rows to fill a GPU, so
the cache is cut into `num_splits` chunks processed in parallel, each writing a partial output
and its log-sum-exp; a small jnp step merges the chunks.  The query heads that share a KV head
(GQA) form the rows of one tile, so each cache block is read once per KV head.  Blocks past a
sequence's length (or before its sliding window) are never loaded.

The model's cache stacks every layer ([L, B, S, K, D]).  Handing a kernel `cache[layer]` costs a
copy of that layer's whole cache on every decode step (a custom call's operand must be a buffer
of its own: XLA materialises the slice), more bytes than the kernel itself reads.  So the decode
kernel takes the stacked cache and the layer index and reads its blocks in place.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.common import NEG_INF, round_up


@dataclasses.dataclass(frozen=True)
class Config:
    """Cache block size, number of parallel chunks, Triton launch parameters, MLA head tile."""

    block_k: int = 128  # H100 sweep (experiments/attention/NOTES.md): 0.80 vs 0.71 of copy BW
    num_splits: int | None = None  # None: enough chunks for ~_TARGET_PROGRAMS programs
    num_warps: int = 4
    num_stages: int = 3
    block_h: int = 16  # MLA: query heads per program (they share the latent cache)


def _dot(a, b, trans_b=False):
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((1,), (1 if trans_b else 0,)), ((), ())), precision=prec,
                           preferred_element_type=jnp.float32)


def _split_kernel(len_ref, q_ref, k_ref, v_ref, qr_ref, kr_ref, o_ref, lse_ref, *, scale: float,
                  softcap: float | None, window: int | None, block_k: int, chunk: int,
                  read: Callable | None = None):
    """One (sequence, head tile, chunk): partial softmax over the chunk's valid cache slots.

    v_ref is None for MLA, where the latent cache is both key and value.  read(ref, start): the
    [block_k, d] cache block at slot `start` (default: rows of a per-sequence [S, d] block).
    """
    if read is None:
        read = lambda ref, start: ref[pl.ds(start, block_k), :]  # noqa: E731
    split = pl.program_id(2)
    length = len_ref[...]
    q = q_ref[...]
    qr = qr_ref[...] if qr_ref is not None else None
    begin = split * chunk
    end = jnp.minimum(begin + chunk, length)
    if window is not None:
        begin = jnp.maximum(begin, (jnp.maximum(length - 1 - window, 0) // block_k) * block_k)
    lo = begin // block_k
    hi = jnp.maximum(lo, (end + block_k - 1) // block_k)

    def body(j, carry):
        acc, m, l = carry
        start = pl.multiple_of(j * block_k, block_k)
        k = read(k_ref, start)
        s = _dot(q, k, trans_b=True)
        if qr is not None:
            s = s + _dot(qr, read(kr_ref, start), trans_b=True)
        s = s * scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        pos = start + jnp.arange(block_k)
        ok = pos < end
        if window is not None:
            ok = ok & (pos >= length - 1 - window)
        s = jnp.where(ok[None, :], s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        v = k if v_ref is None else read(v_ref, start)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, alpha * l + jnp.sum(p, axis=1)

    rows = q.shape[0]
    dv = o_ref.shape[-1]
    acc, m, l = lax.fori_loop(lo, hi, body, (jnp.zeros((rows, dv), jnp.float32),
                                             jnp.full((rows,), NEG_INF, jnp.float32),
                                             jnp.zeros((rows,), jnp.float32)))
    empty = l == 0.0
    o_ref[...] = acc / jnp.where(empty, 1.0, l)[:, None]
    lse_ref[...] = jnp.where(empty, NEG_INF, m + jnp.log(jnp.where(empty, 1.0, l)))


def _merge(o: jax.Array, lse: jax.Array, axis: int) -> jax.Array:
    """Merge partial softmax results along `axis` by their log-sum-exp (empty chunks: -inf)."""
    m = jnp.max(lse, axis=axis, keepdims=True)
    w = jnp.exp(lse - jnp.where(jnp.isfinite(m), m, 0.0))
    w = w / jnp.maximum(jnp.sum(w, axis=axis, keepdims=True), 1e-30)
    return jnp.sum(o * w[..., None], axis=axis)


# About four programs per H100 SM: small batches need many chunks to keep HBM busy, large
# batches need few (each chunk costs a partial-output write and a merge).
_TARGET_PROGRAMS = 512


def _chunking(s: int, rows: int, cfg: Config) -> tuple[int, int, int]:
    """(chunks, chunk length, padded cache length) for `rows` (batch x head tiles) programs."""
    want = cfg.num_splits or -(-_TARGET_PROGRAMS // rows)
    blocks = -(-s // cfg.block_k)
    splits = max(1, min(want, blocks))
    if s % cfg.block_k == 0:
        # Prefer a split count that divides the blocks: the chunks then tile the cache exactly
        # (no chunk of only overhang).
        exact = next(n for n in range(splits, 0, -1) if blocks % n == 0)
        if 2 * exact >= splits:
            splits = exact
    chunk = round_up(-(-s // splits), cfg.block_k)
    splits = -(-s // chunk)
    return splits, chunk, splits * chunk


def _layer_block_reader(layer_ref, s: int, block_k: int, per_head: bool = True) -> Callable:
    """read(ref, start) for a stacked cache ref [L, B, S, K, D] (per_head) or [L, B, S, R]:
    this program's (layer, sequence[, KV head]) rows [start, start + block_k).  Rows past S (a
    last block that overhangs the cache) load as zeros rather than as the next sequence's or
    layer's slots."""
    # (read outside the block loop: interpret mode substitutes program ids at the top level only)
    layer, seq = layer_ref[...], pl.program_id(0)
    head = (pl.program_id(1),) if per_head else ()

    def read(ref, start):
        view = ref.at[(layer, seq, pl.ds(start, block_k), *head, slice(None))]
        if s % block_k == 0:
            return view[...]
        inside = (start + jnp.arange(block_k) < s)[:, None]
        return plgpu.load(view, mask=inside, other=0)

    return read


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    layer: jax.Array | int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    config: Config | None = None,
    interpret: bool = False,
) -> jax.Array:
    """q [B, H, D] over caches [B, S, K, D] with lengths [B] -> [B, H, D] (see the reference).

    layer: with it, the caches are every layer's, [L, B, S, K, D], and layer `layer` (an int or
    int32 scalar, traced or not) is read in place."""
    cfg = config or Config()
    if layer is None:  # one layer's cache: a stack of one (a free reshape)
        k_cache, v_cache, layer = k_cache[None], v_cache[None], 0
    b, h, d = q.shape
    s, kh = k_cache.shape[2], k_cache.shape[3]
    if h % kh:
        raise ValueError(f"kv heads {kh} must divide query heads {h}")
    g = h // kh
    # tl.dot wants at least 16 rows: pad the GQA group (padded rows are dropped).
    gp = max(16, pl.next_power_of_2(g))
    scale = d ** -0.5 if scale is None else scale
    splits, chunk, _ = _chunking(s, b * kh, cfg)
    qg = jnp.pad(q.reshape(b, kh, g, d), ((0, 0), (0, 0), (0, gp - g), (0, 0)))

    def kernel(layer_ref, len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
        _split_kernel(len_ref, q_ref, k_ref, v_ref, None, None, o_ref, lse_ref,
                      scale=float(scale), softcap=softcap,
                      window=sliding_window, block_k=cfg.block_k, chunk=chunk,
                      read=_layer_block_reader(layer_ref, s, cfg.block_k))

    whole = pl.BlockSpec(k_cache.shape, lambda bb, hh, ss: (0,) * 5)  # indexed in-kernel
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, kh, splits),
        in_specs=[pl.BlockSpec((None,), lambda bb, hh, ss: (0,)),
                  pl.BlockSpec((None,), lambda bb, hh, ss: (bb,)),
                  pl.BlockSpec((None, None, gp, d), lambda bb, hh, ss: (bb, hh, 0, 0)),
                  whole, whole],
        out_specs=[pl.BlockSpec((None, None, None, gp, d), lambda bb, hh, ss: (bb, hh, ss, 0, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda bb, hh, ss: (bb, hh, ss, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, kh, splits, gp, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, splits, gp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages),
        interpret=interpret,
        name="jaxturbo_decode",
    )(jnp.asarray(layer, jnp.int32).reshape(1), lengths.astype(jnp.int32), qg, k_cache, v_cache)
    out = _merge(o, lse, axis=2)[:, :, :g]
    return out.reshape(b, h, d).astype(q.dtype)


def mla_decode_attention(
    q_latent: jax.Array,
    q_rope: jax.Array,
    latent_cache: jax.Array,
    rope_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    layer: jax.Array | int | None = None,
    config: Config | None = None,
    interpret: bool = False,
) -> jax.Array:
    """MLA latent decode: q_latent [B, H, R], q_rope [B, H, Dr], latent_cache [B, S, R],
    rope_cache [B, S, Dr], lengths [B] -> [B, H, R] (see `mla_decode_reference`).

    layer: the caches are every layer's ([L, B, S, R], [L, B, S, Dr]); layer `layer` is read
    in place."""
    cfg = config or Config()
    if layer is None:
        latent_cache, rope_cache, layer = latent_cache[None], rope_cache[None], 0
    b, h, r = q_latent.shape
    dr = q_rope.shape[-1]
    s = latent_cache.shape[2]
    bh = max(16, min(cfg.block_h, pl.next_power_of_2(h)))
    hp = round_up(h, bh)
    splits, chunk, _ = _chunking(s, b * (hp // bh), cfg)
    ql = jnp.pad(q_latent, ((0, 0), (0, hp - h), (0, 0)))
    qr = jnp.pad(q_rope, ((0, 0), (0, hp - h), (0, 0)))

    def kernel(layer_ref, len_ref, q_ref, qr_ref, c_ref, kr_ref, o_ref, lse_ref):
        _split_kernel(len_ref, q_ref, c_ref, None, qr_ref, kr_ref, o_ref, lse_ref,
                      scale=float(scale), softcap=None, window=None, block_k=cfg.block_k,
                      chunk=chunk, read=_layer_block_reader(layer_ref, s, cfg.block_k,
                                                            per_head=False))

    def whole(x):  # indexed in-kernel
        return pl.BlockSpec(x.shape, lambda bb, hh, ss: (0,) * x.ndim)

    o, lse = pl.pallas_call(
        kernel,
        grid=(b, hp // bh, splits),
        in_specs=[pl.BlockSpec((None,), lambda bb, hh, ss: (0,)),
                  pl.BlockSpec((None,), lambda bb, hh, ss: (bb,)),
                  pl.BlockSpec((None, bh, r), lambda bb, hh, ss: (bb, hh, 0)),
                  pl.BlockSpec((None, bh, dr), lambda bb, hh, ss: (bb, hh, 0)),
                  whole(latent_cache), whole(rope_cache)],
        out_specs=[pl.BlockSpec((None, None, bh, r), lambda bb, hh, ss: (bb, ss, hh, 0)),
                   pl.BlockSpec((None, None, bh), lambda bb, hh, ss: (bb, ss, hh))],
        out_shape=[jax.ShapeDtypeStruct((b, splits, hp, r), jnp.float32),
                   jax.ShapeDtypeStruct((b, splits, hp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages),
        interpret=interpret,
        name="jaxturbo_mla_decode",
    )(jnp.asarray(layer, jnp.int32).reshape(1), lengths.astype(jnp.int32), ql, qr, latent_cache,
      rope_cache)
    return _merge(o, lse, axis=1)[:, :h].astype(q_latent.dtype)
