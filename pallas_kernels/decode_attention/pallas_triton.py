"""Decode attention and MLA latent decode through the Pallas-Triton lowering (GPU; interpret on CPU).

Split-K ("flash-decoding"): one query token per sequence gives too few rows to fill a GPU, so
the cache is cut into `num_splits` chunks processed in parallel, each writing a partial output
and its log-sum-exp; a small jnp step merges the chunks.  The query heads that share a KV head
(GQA) form the rows of one tile, so each cache block is read once per KV head.  Blocks past a
sequence's length (or before its sliding window) are never loaded.

`decode_attention_append` is the decode step's whole attention in the same kernel: the new
token's key is rotated and written, with its value, into the cache in place (the caches are
aliased to outputs), and the token joins the softmax of the chunk that holds its slot from
registers; XLA would need four more small kernels per layer for the write.

The model's cache stacks every layer ([L, B, S, K, D]).  Handing a kernel `cache[layer]` costs a
copy of that layer's whole cache on every decode step (a custom call's operand must be a buffer
of its own: XLA materialises the slice), more bytes than the kernel itself reads.  So the decode
kernel takes the stacked cache and the layer index and reads its blocks in place.

MLA latent and rope widths need not be powers of two (CARE conversions give ranks like 160 or
187): the kernel reads such a row as power-of-two column pieces (`_column_pieces`: 160 = 128 +
32; 187 = 128 + a 64-wide piece moved back to end at column 187), each piece a Triton tile, so
only the row's own bytes are read and the cache keeps its layout.
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
    # GQA decode: merge the chunks in a second Pallas kernel ("kernel": one launch) or in jnp
    # ("xla": XLA makes two kernels of it, a max-and-exp and a weighted sum)
    merge: str = "kernel"


# Used when no config is passed (the models pass none); benchmarks may swap it.
DEFAULT_CONFIG = Config()


def _dot(a, b, trans_b=False):
    """a [M, K] @ b [K, N] (b [N, K] with trans_b) in float32.  tl.dot needs every dimension
    >= 16: narrower products (an 8-wide rope key) are a broadcast multiply and sum."""
    if min(*a.shape, *b.shape) < 16:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        if trans_b:
            return jnp.sum(a[:, None, :] * b[None, :, :], axis=2)
        return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((1,), (1 if trans_b else 0,)), ((), ())), precision=prec,
                           preferred_element_type=jnp.float32)


# (start, width, owned_from): columns [start, start + width) of a row, of which the first
# `owned_from` also belong to the piece before (see `_column_pieces`).
Pieces = tuple[tuple[int, int, int], ...]


def _column_pieces(n: int) -> Pieces:
    """Power-of-two column pieces covering a row of width n, none reaching past column n.

    n >= 16: the binary digits of round_up(n, 16) (each >= 16, tl.dot's least width), the last
    moved back to end at n, so it overlaps the piece before by round_up(n, 16) - n columns
    (187 -> 128 + 64 at column 123); a power-of-two round_up(n, 16) above n is cut in halves
    (120 -> 64 + 64 at column 56).  n < 16: its binary digits exactly (then `_dot` multiplies
    and sums).  Overlapped columns are read twice from the same cache lines; no byte outside
    the row is read.
    """
    if n < 16:
        widths = [1 << i for i in reversed(range(n.bit_length())) if n >> i & 1]
    else:
        m = round_up(n, 16)
        widths = [1 << i for i in reversed(range(m.bit_length())) if m >> i & 1]
        if len(widths) == 1 and m > n:
            widths = [m // 2, m // 2]
    pieces, end = [], 0
    for w in widths:
        start = min(end, n - w)
        pieces.append((start, w, end - start))
        end = start + w
    return tuple(pieces)


def _load_pieces(ref, cols: Pieces | None):
    """ref's [rows, width] block as a tuple of column pieces (cols None: one piece), each
    piece's overlapped columns zeroed so that summed products count every column once."""
    if cols is None:
        return (ref[...],)
    out = []
    for start, w, own in cols:
        x = ref[:, pl.ds(start, w)]
        out.append(x if own == 0 else jnp.where(jnp.arange(w)[None, :] >= own, x, 0))
    return tuple(out)


def _split_kernel(len_ref, q_ref, k_ref, v_ref, qr_ref, kr_ref, o_ref, lse_ref, *, scale: float,
                  softcap: float | None, window: int | None, block_k: int, chunk: int,
                  read: Callable | None = None, appended: Callable | None = None,
                  load_q: Callable | None = None, k_cols: Pieces | None = None,
                  kr_cols: Pieces | None = None):
    """One (sequence, head tile, chunk): partial softmax over the chunk's valid cache slots.

    v_ref is None for MLA, where the latent cache is both key and value.  read(ref, start,
    cols): the [block_k, d] cache block at slot `start` as a tuple of column pieces (cols, or
    one piece for None; default: rows of a per-sequence [S, d] block).
    appended(slot, owns, q): the token being appended at `slot` (the last of `length`), which
    is not read from the cache: its raw scores against the query tile q [rows] and its value
    [dv] (float32); the chunk that holds its slot (`owns`) adds it to the softmax.
    load_q(): the query tile, when it is not simply q_ref's block.
    k_cols, kr_cols: column pieces of k (and q, and the output when v_ref is None) and of the
    rope key kr (and qr), for widths that are not one power of two (`_column_pieces`).
    """
    if read is None:
        read = lambda ref, start, cols: (ref[pl.ds(start, block_k), :],)  # noqa: E731
    split = pl.program_id(2)
    length = len_ref[...]
    q = _load_pieces(q_ref, k_cols) if load_q is None else (load_q(),)
    qr = _load_pieces(qr_ref, kr_cols) if qr_ref is not None else ()
    begin = split * chunk
    cached = length if appended is None else length - 1
    owns = (cached >= begin) & (cached < begin + chunk)
    end = jnp.minimum(begin + chunk, cached)
    if window is not None:
        begin = jnp.maximum(begin, (jnp.maximum(length - 1 - window, 0) // block_k) * block_k)
    lo = begin // block_k
    hi = jnp.maximum(lo, (end + block_k - 1) // block_k)

    def scores(qs, ks):  # products summed over the column pieces
        return sum(_dot(a, b, trans_b=True) for a, b in zip(qs, ks, strict=True))

    def body(j, carry):
        acc, m, l = carry
        start = pl.multiple_of(j * block_k, block_k)
        k = read(k_ref, start, k_cols)
        s = scores(q, k)
        if qr:
            s = s + scores(qr, read(kr_ref, start, kr_cols))
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
        v = k if v_ref is None else read(v_ref, start, None)
        acc = tuple(a * alpha[:, None] + _dot(p.astype(x.dtype), x) for a, x in zip(acc, v))
        return acc, m_new, alpha * l + jnp.sum(p, axis=1)

    rows = q[0].shape[0]
    out_cols = k_cols if v_ref is None and k_cols is not None else ((0, o_ref.shape[-1], 0),)
    acc, m, l = lax.fori_loop(lo, hi, body, (tuple(jnp.zeros((rows, w), jnp.float32)
                                                   for _, w, _ in out_cols),
                                             jnp.full((rows,), NEG_INF, jnp.float32),
                                             jnp.zeros((rows,), jnp.float32)))
    if appended is not None:  # one more column of the online softmax, in the owning chunk
        (a,) = acc  # (the GQA kernel: one piece)
        s, v = appended(cached, owns, q[0])
        s = s * scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        s = jnp.where(owns, s, NEG_INF)
        m_new = jnp.maximum(m, s)
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        alpha, p = jnp.exp(m - m_safe), jnp.exp(s - m_safe)
        acc = (a * alpha[:, None] + p[:, None] * v[None, :],)
        m, l = m_new, alpha * l + p
    empty = l == 0.0
    denom = jnp.where(empty, 1.0, l)[:, None]
    for (start, w, _), a in zip(out_cols, acc, strict=True):
        o_ref[:, pl.ds(start, w)] = a / denom  # an overlapped column gets the same value twice
    lse_ref[...] = jnp.where(empty, NEG_INF, m + jnp.log(jnp.where(empty, 1.0, l)))


def _merge(o: jax.Array, lse: jax.Array, axis: int) -> jax.Array:
    """Merge partial softmax results along `axis` by their log-sum-exp (empty chunks: -inf)."""
    m = jnp.max(lse, axis=axis, keepdims=True)
    w = jnp.exp(lse - jnp.where(jnp.isfinite(m), m, 0.0))
    w = w / jnp.maximum(jnp.sum(w, axis=axis, keepdims=True), 1e-30)
    return jnp.sum(o * w[..., None], axis=axis)


def _merge_kernel(o_ref, lse_ref, out_ref, *, splits: int):
    """One (sequence, KV head, slice of D): `_merge` over the chunk axis, every chunk loaded at
    once (a loop over the chunks is a chain of dependent loads: slower than XLA's two kernels,
    experiments/ladder/NOTES.md).  The chunk axis is padded to a power of two; the padding
    (index >= splits) is never written by the chunks' kernel and is masked here."""
    real = jnp.arange(lse_ref.shape[0]) < splits
    lse = jnp.where(real[:, None], lse_ref[...], NEG_INF)          # [chunks, G]
    m = jnp.max(lse, axis=0)
    w = jnp.exp(lse - jnp.where(m == NEG_INF, 0.0, m)[None, :])
    w = w / jnp.maximum(jnp.sum(w, axis=0), 1e-30)[None, :]
    o = jnp.where(real[:, None, None], o_ref[...], 0.0)            # [chunks, G, Dblk]
    out_ref[...] = jnp.sum(o * w[:, :, None], axis=0).astype(out_ref.dtype)


def _merge_chunks(o: jax.Array, lse: jax.Array, splits: int, dtype, cfg: Config,
                  interpret: bool) -> jax.Array:
    """o [B, K, C, G, D], lse [B, K, C, G] (chunks C >= splits: a power of two, padding
    unwritten) -> [B, K, G, D] in `dtype`."""
    if cfg.merge == "xla":
        return _merge(o[:, :, :splits], lse[:, :, :splits], axis=2).astype(dtype)
    if cfg.merge != "kernel":
        raise ValueError(f"Config.merge={cfg.merge!r}; choose 'kernel' or 'xla'")
    b, kh, chunks, gp, d = o.shape
    dblk = min(d, 32)  # chunks x G x 32 float32 tiles: 64 registers a thread at 16 x 16
    return pl.pallas_call(
        functools.partial(_merge_kernel, splits=splits),
        grid=(b, kh, d // dblk),
        in_specs=[pl.BlockSpec((None, None, chunks, gp, dblk),
                               lambda bb, hh, dd: (bb, hh, 0, 0, dd)),
                  pl.BlockSpec((None, None, chunks, gp), lambda bb, hh, dd: (bb, hh, 0, 0))],
        out_specs=pl.BlockSpec((None, None, gp, dblk), lambda bb, hh, dd: (bb, hh, 0, dd)),
        out_shape=jax.ShapeDtypeStruct((b, kh, gp, d), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=interpret,
        name="jaxturbo_decode_merge",
    )(o, lse)


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
    """read(ref, start, cols) for a stacked cache ref [L, B, S, K, D] (per_head) or
    [L, B, S, R]: this program's (layer, sequence[, KV head]) rows [start, start + block_k), as
    the tuple of column pieces `cols` (None: the whole row, one piece).  Rows past S (a last
    block that overhangs the cache) load as zeros rather than as the next sequence's or layer's
    slots."""
    # (read outside the block loop: interpret mode substitutes program ids at the top level only)
    layer, seq = layer_ref[...], pl.program_id(0)
    head = (pl.program_id(1),) if per_head else ()

    def read(ref, start, cols=None):
        out = []
        for col in (slice(None),) if cols is None else (pl.ds(c, w) for c, w, _ in cols):
            view = ref.at[(layer, seq, pl.ds(start, block_k), *head, col)]
            if s % block_k == 0:
                out.append(view[...])
            else:
                inside = (start + jnp.arange(block_k) < s)[:, None]
                out.append(plgpu.load(view, mask=inside, other=0))
        return tuple(out)

    return read


def _swap_halves(d: int) -> tuple[jax.Array, jax.Array]:
    """Column order of a head vector with its two halves swapped, and whether each column is in
    the first half: rotate_half(x) = where(first, -x[swap], x[swap]) (HF's half-split RoPE)
    from one gather-load, since a register tile cannot be sliced into halves."""
    cols = jnp.arange(d)
    return (cols + d // 2) % d, cols < d // 2


def _prepare_new(load: Callable, dtype, d: int, rope: tuple | None, ss_ref,
                 rms: tuple[int, float] | None) -> jax.Array:
    """The new token's q, k or v [..., d] as the unfused path makes them: times the sequence's
    RMS factor rsqrt(ss / n + eps) (ss_ref and rms = (n, eps), if given; rounded to `dtype`),
    then rotated by rope = (cos_ref, sin_ref) if given (float32, rounded to `dtype`).
    load(cols) reads the vector's columns `cols` in that order."""
    f = None if ss_ref is None else lax.rsqrt(ss_ref[...] / rms[0] + rms[1])

    def scaled(x):
        x = x.astype(jnp.float32)
        return x if f is None else (x * f).astype(dtype).astype(jnp.float32)

    x = scaled(load(jnp.arange(d)))
    if rope is None:
        return x.astype(dtype)
    swap, first = _swap_halves(d)
    x_sw = scaled(load(swap))
    return (x * rope[0][...] + jnp.where(first, -x_sw, x_sw) * rope[1][...]).astype(dtype)


def _append_writer(layer_ref, kn_ref, vn_ref, kc_out, vc_out, s: int,
                   prepare: Callable) -> Callable:
    """appended(slot, owns, q) for `_split_kernel`: this program's new key and value, made by
    prepare(load, dtype, rotate) (`_prepare_new`: scaled, the key rotated), are written at
    `slot` of the stacked caches (the owning chunk only); returns the query tile's raw scores
    against the key and the value, as the cache holds them."""
    layer, seq, head = layer_ref[...], pl.program_id(0), pl.program_id(1)

    def appended(slot, owns, q):
        k = prepare(lambda cols: kn_ref[cols], kn_ref.dtype, True).astype(kc_out.dtype)
        v = prepare(lambda cols: vn_ref[cols], vn_ref.dtype, False).astype(vc_out.dtype)

        @pl.when(owns & (slot < s))  # a slot past the cache is dropped, as by a scatter
        def _():
            row = (layer, seq, slot, head)
            kc_out[(*row, slice(None))] = k
            vc_out[(*row, slice(None))] = v

        score = jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32)[None, :], axis=1)
        return score, v.astype(jnp.float32)

    return appended


def _decode(q, k_cache, v_cache, lengths, layer, new, *, scale, softcap, sliding_window,
            config, interpret, q_heads: int | None = None):
    """The GQA decode kernel over stacked caches [L, B, S, K, D]; lengths counts the valid
    slots including an appended token.  new: None, or (k_new, v_new, cos, sin [B, D] or None,
    k_off, v_off, rms (sum_sq [B], n, eps) or None) to append in-kernel (the new key heads
    are k_new[:, k_off:k_off + K], the values v_new[:, v_off:v_off + K], both times
    rsqrt(sum_sq[b] / n + eps)); then the updated caches are returned too.
    q_heads: q is raw (appending only): its first q_heads heads are the queries, which the
    kernel scales and rotates like the key, read in place (q may be a fused projection's
    output); otherwise q [B, H, D] is ready."""
    cfg = config or DEFAULT_CONFIG
    b, h, d = q.shape
    if q_heads is not None:
        h = q_heads
    s, kh = k_cache.shape[2], k_cache.shape[3]
    if h % kh:
        raise ValueError(f"kv heads {kh} must divide query heads {h}")
    g = h // kh
    # tl.dot wants at least 16 rows: pad the GQA group (padded rows are dropped).
    gp = max(16, pl.next_power_of_2(g))
    scale = d ** -0.5 if scale is None else scale
    splits, chunk, _ = _chunking(s, b * kh, cfg)
    grid = (b, kh, splits)
    whole = pl.BlockSpec(k_cache.shape, lambda bb, hh, ss: (0,) * 5)  # indexed in-kernel
    if q_heads is None:
        q_in = jnp.pad(q.reshape(b, kh, g, d), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
        q_spec = pl.BlockSpec((None, None, gp, d), lambda bb, hh, ss: (bb, hh, 0, 0))
    else:  # the sequence's whole row of heads; the group's rows are gathered in-kernel
        q_in = q
        q_spec = pl.BlockSpec((None, q.shape[1], d), lambda bb, hh, ss: (bb, 0, 0))
    in_specs = [pl.BlockSpec((None,), lambda bb, hh, ss: (0,)),
                pl.BlockSpec((None,), lambda bb, hh, ss: (bb,)), q_spec, whole, whole]
    out_specs = [pl.BlockSpec((None, None, None, gp, d), lambda bb, hh, ss: (bb, hh, ss, 0, 0)),
                 pl.BlockSpec((None, None, None, gp), lambda bb, hh, ss: (bb, hh, ss, 0))]
    chunks = pl.next_power_of_2(splits)  # the merge kernel's tile (the padding stays unwritten)
    out_shape = [jax.ShapeDtypeStruct((b, kh, chunks, gp, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, chunks, gp), jnp.float32)]
    args = [jnp.asarray(layer, jnp.int32).reshape(1), lengths.astype(jnp.int32), q_in, k_cache,
            v_cache]
    aliases = {}
    if new is not None:
        k_new, v_new, cos, sin, k_off, v_off, rms = new

        def row(off):  # this program's KV head, `off` heads into the array
            return pl.BlockSpec((None, None, d), lambda bb, hh, ss: (bb, hh + off, 0))

        in_specs += [row(k_off), row(v_off)]
        args += [k_new, v_new]
        if cos is not None:
            per_seq = pl.BlockSpec((None, d), lambda bb, hh, ss: (bb, 0))
            in_specs += [per_seq, per_seq]
            args += [cos.astype(jnp.float32), sin.astype(jnp.float32)]
        if rms is not None:
            in_specs.append(pl.BlockSpec((None,), lambda bb, hh, ss: (bb,)))
            args.append(rms[0].astype(jnp.float32))
        out_specs += [whole, whole]
        out_shape += [jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                      jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)]
        aliases = {3: 2, 4: 3}  # the caches are updated in place
    elif q_heads is not None:
        raise ValueError("a raw q (q_heads) needs a token to append")

    def kernel(*refs):
        layer_ref, len_ref, q_ref, k_ref, v_ref = refs[:5]
        appended = load_q = None
        if new is None:
            o_ref, lse_ref = refs[5:]
        else:
            extra = list(refs[7:-4])  # [cos, sin], [sum_sq]
            rope = (extra.pop(0), extra.pop(0)) if cos is not None else None
            ss_ref = extra.pop(0) if rms is not None else None
            o_ref, lse_ref, kc_out, vc_out = refs[-4:]

            def prepare(load, dtype, rotate):
                return _prepare_new(load, dtype, d, rope if rotate else None, ss_ref,
                                    None if rms is None else tuple(rms[1:]))

            appended = _append_writer(layer_ref, refs[5], refs[6], kc_out, vc_out, s, prepare)
            if q_heads is not None:
                idx = jnp.arange(gp)
                # the group's rows (padding rows clamped inside the array, zeroed after)
                rows = jnp.minimum(pl.program_id(1) * g + idx, q_ref.shape[0] - 1)[:, None]

                def load_q():
                    qt = prepare(lambda cols: q_ref[rows, cols[None, :]], q_ref.dtype, True)
                    return jnp.where((idx < g)[:, None], qt, 0).astype(q_ref.dtype)

        _split_kernel(len_ref, q_ref, k_ref, v_ref, None, None, o_ref, lse_ref,
                      scale=float(scale), softcap=softcap,
                      window=sliding_window, block_k=cfg.block_k, chunk=chunk,
                      read=_layer_block_reader(layer_ref, s, cfg.block_k), appended=appended,
                      load_q=load_q)

    res = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages),
        interpret=interpret,
        name="jaxturbo_decode" if new is None else "jaxturbo_decode_append",
    )(*args)
    out = _merge_chunks(res[0], res[1], splits, q.dtype, cfg, interpret)[:, :, :g].reshape(b, h, d)
    return out, res[2:]


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
    if layer is None:  # one layer's cache: a stack of one (a free reshape)
        k_cache, v_cache, layer = k_cache[None], v_cache[None], 0
    out, _ = _decode(q, k_cache, v_cache, lengths, layer, None, scale=scale, softcap=softcap,
                     sliding_window=sliding_window, config=config, interpret=interpret)
    return out


def decode_attention_append(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    layer: jax.Array | int | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    config: Config | None = None,
    interpret: bool = False,
    k_head_offset: int = 0,
    v_head_offset: int = 0,
    rms: tuple[jax.Array, int, float] | None = None,
    q_heads: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step's attention in one kernel (see `decode_append_reference`): the new key
    k_new [B, K, D] (rotated in-kernel by rope = (cos, sin) [B, D]) and value are written at
    slot lengths[b] of the caches (in place: the caches are aliased to the outputs), and
    q [B, H, D] attends to slots [0, lengths[b]].  Returns (out [B, H, D], k_cache, v_cache).

    k_head_offset, v_head_offset: the new keys are heads [off, off + K) of k_new (likewise
    v_new), so both can be the one output of a fused q/k/v projection, read without a copy.
    rms (sum_sq [B], n, eps): k_new and v_new (and a raw q) times rsqrt(sum_sq[b] / n + eps),
    an RMSNorm's factor moved past the projection (`jaxturbo.inference.fused.fold_norms`),
    applied here: as an XLA product it would cost a copy (and its rsqrt a kernel) per layer.
    q_heads: q is the projection's raw output, its first q_heads heads the queries; the kernel
    scales (rms) and rotates (rope) them as it reads them (XLA would spend a kernel per layer
    on it), so q may be the same fused array as k_new and v_new.

    In XLA the same step is four kernels more per layer (the key's rotation, two scatter
    guards, two cache writes): at batch 1 such kernels cost more in launches than in bytes."""
    d = q.shape[-1]
    if d % 2 or pl.next_power_of_2(d) != d:
        raise ValueError(f"decode_attention_append needs a power-of-two head_dim; "
                         f"got {d} (use decode_attention after writing the cache)")
    stacked = layer is not None
    if not stacked:
        k_cache, v_cache, layer = k_cache[None], v_cache[None], 0
    cos, sin = rope if rope is not None else (None, None)
    new = (k_new, v_new, cos, sin, k_head_offset, v_head_offset, rms)
    out, (kc, vc) = _decode(q, k_cache, v_cache, lengths + 1, layer, new,
                            scale=scale, softcap=softcap, sliding_window=sliding_window,
                            config=config, interpret=interpret, q_heads=q_heads)
    return (out, kc, vc) if stacked else (out, kc[0], vc[0])


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
    in place.  Any R and Dr: rows are read as power-of-two column pieces (`_column_pieces`)."""
    cfg = config or DEFAULT_CONFIG
    if layer is None:
        latent_cache, rope_cache, layer = latent_cache[None], rope_cache[None], 0
    b, h, r = q_latent.shape
    dr = q_rope.shape[-1]
    s = latent_cache.shape[2]
    # Column pieces of the unpadded rows rather than a cache padded to powers of two: padding
    # would cost every decode step the padding's bytes (160 -> 256 reads 1.6x the latent).
    r_cols, dr_cols = _column_pieces(r), _column_pieces(dr)
    cfg = dataclasses.replace(cfg, block_k=mla_block_k(
        cfg, sum(w for _, w, _ in r_cols + dr_cols), latent_cache.dtype.itemsize))
    bh = max(16, min(cfg.block_h, pl.next_power_of_2(h)))
    hp = round_up(h, bh)
    splits, chunk, _ = _chunking(s, b * (hp // bh), cfg)
    # partial outputs laid out as `_merge_chunks` takes them ([B, head tiles, chunks, bh, .]):
    # a power-of-two chunk axis, rows of whole 32-column slices (the chunks past `splits` and
    # the columns past R are never written, and are dropped by the merge)
    tiles, chunks, rw = hp // bh, pl.next_power_of_2(splits), round_up(r, 32)
    ql = jnp.pad(q_latent, ((0, 0), (0, hp - h), (0, 0)))
    qr = jnp.pad(q_rope, ((0, 0), (0, hp - h), (0, 0)))

    def kernel(layer_ref, len_ref, q_ref, qr_ref, c_ref, kr_ref, o_ref, lse_ref):
        _split_kernel(len_ref, q_ref, c_ref, None, qr_ref, kr_ref, o_ref, lse_ref,
                      scale=float(scale), softcap=None, window=None, block_k=cfg.block_k,
                      chunk=chunk, read=_layer_block_reader(layer_ref, s, cfg.block_k,
                                                            per_head=False),
                      k_cols=r_cols, kr_cols=dr_cols)

    def whole(x):  # indexed in-kernel
        return pl.BlockSpec(x.shape, lambda bb, hh, ss: (0,) * x.ndim)

    o, lse = pl.pallas_call(
        kernel,
        grid=(b, tiles, splits),
        in_specs=[pl.BlockSpec((None,), lambda bb, hh, ss: (0,)),
                  pl.BlockSpec((None,), lambda bb, hh, ss: (bb,)),
                  pl.BlockSpec((None, bh, r), lambda bb, hh, ss: (bb, hh, 0)),
                  pl.BlockSpec((None, bh, dr), lambda bb, hh, ss: (bb, hh, 0)),
                  whole(latent_cache), whole(rope_cache)],
        out_specs=[pl.BlockSpec((None, None, None, bh, rw),
                                lambda bb, hh, ss: (bb, hh, ss, 0, 0)),
                   pl.BlockSpec((None, None, None, bh), lambda bb, hh, ss: (bb, hh, ss, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, tiles, chunks, bh, rw), jnp.float32),
                   jax.ShapeDtypeStruct((b, tiles, chunks, bh), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages),
        interpret=interpret,
        name="jaxturbo_mla_decode",
    )(jnp.asarray(layer, jnp.int32).reshape(1), lengths.astype(jnp.int32), ql, qr, latent_cache,
      rope_cache)
    out = _merge_chunks(o, lse, splits, q_latent.dtype, cfg, interpret)
    return out.reshape(b, hp, rw)[:, :h, :r]


# Shared memory the pipelined cache tiles of the MLA kernel may take (num_stages copies of a
# [block_k, R + Dr] tile): an H100/H200 block gets 227 KiB, the rest is for the dots' operands.
_MLA_TILE_SMEM = 160 * 1024


def mla_block_k(cfg: Config, cols: int, itemsize: int) -> int:
    """The MLA kernel's cache block: cfg.block_k, halved (not below 16) while num_stages tiles
    of `cols` (the column pieces' total width) would overflow `_MLA_TILE_SMEM` (a 352 + 32
    bf16 row: 64)."""
    bk = cfg.block_k
    while bk > 16 and max(cfg.num_stages, 1) * bk * cols * itemsize > _MLA_TILE_SMEM:
        bk //= 2
    return bk
