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

from pallas_kernels.decode_attention.common import DecodeCall, MLADecodeCall
from pallas_kernels.flash_attention.common import NEG_INF, round_up
from pallas_kernels.triton_dot import dot as _dot


@dataclasses.dataclass(frozen=True)
class Config:
    """Cache block size, number of parallel chunks, Triton launch parameters, MLA head tile."""

    block_k: int = 128  # an H100 sweep's best (experiments/attention/RESULTS.md)
    num_splits: int | None = None  # None: enough chunks for ~_TARGET_PROGRAMS programs
    num_warps: int = 4
    num_stages: int = 3
    block_h: int = 16  # MLA: query heads per program (they share the latent cache)
    # GQA decode: merge the chunks in a second Pallas kernel ("kernel": one launch) or in jnp
    # ("xla": XLA makes two kernels of it, a max-and-exp and a weighted sum)
    merge: str = "kernel"


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


def _split_kernel(
    len_ref,
    q_ref,
    k_ref,
    v_ref,
    qr_ref,
    kr_ref,
    o_ref,
    lse_ref,
    *,
    scale: float,
    softcap: float | None,
    window: int | None,
    block_k: int,
    chunk: int,
    read: Callable | None = None,
    appended: Callable | None = None,
    k_cols: Pieces | None = None,
    kr_cols: Pieces | None = None,
):
    """One (sequence, head tile, chunk): partial softmax over the chunk's valid cache slots.

    v_ref is None for MLA, where the latent cache is both key and value.  read(ref, start,
    cols): the [block_k, d] cache block at slot `start` as a tuple of column pieces (cols, or
    one piece for None; default: rows of a per-sequence [S, d] block).
    appended(slot, owns, q): the token being appended at `slot` (the last of `length`), which
    is not read from the cache: its raw scores against the query tile q [rows] and its value
    [dv] (float32); the chunk that holds its slot (`owns`) adds it to the softmax.
    k_cols, kr_cols: column pieces of k (and q, and the output when v_ref is None) and of the
    rope key kr (and qr), for widths that are not one power of two (`_column_pieces`).
    """
    if read is None:
        read = lambda ref, start, cols: (ref[pl.ds(start, block_k), :],)  # noqa: E731
    split = pl.program_id(2)
    length = len_ref[...]
    q = _load_pieces(q_ref, k_cols)
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
    acc, m, l = lax.fori_loop(
        lo,
        hi,
        body,
        (
            tuple(jnp.zeros((rows, w), jnp.float32) for _, w, _ in out_cols),
            jnp.full((rows,), NEG_INF, jnp.float32),
            jnp.zeros((rows,), jnp.float32),
        ),
    )
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


def merge_partials(o: jax.Array, lse: jax.Array, axis: int) -> jax.Array:
    """Merge partial softmax results along `axis` by their log-sum-exp (empty chunks: -inf)."""
    m = jnp.max(lse, axis=axis, keepdims=True)
    w = jnp.exp(lse - jnp.where(jnp.isfinite(m), m, 0.0))
    w = w / jnp.maximum(jnp.sum(w, axis=axis, keepdims=True), 1e-30)
    return jnp.sum(o * w[..., None], axis=axis)


def _merge_kernel(o_ref, lse_ref, out_ref, *, splits: int):
    """One (sequence, KV head, slice of D): `merge_partials` over the chunk axis, every chunk
    loaded at once (a loop over the chunks is a chain of dependent loads: slower than XLA's two
    kernels, experiments/ladder/RESULTS.md).  The chunk axis is padded to a power of two; the
    padding (index >= splits) is never written by the chunks' kernel and is masked here."""
    real = jnp.arange(lse_ref.shape[0]) < splits
    lse = jnp.where(real[:, None], lse_ref[...], NEG_INF)  # [chunks, G]
    m = jnp.max(lse, axis=0)
    w = jnp.exp(lse - jnp.where(m == NEG_INF, 0.0, m)[None, :])
    w = w / jnp.maximum(jnp.sum(w, axis=0), 1e-30)[None, :]
    o = jnp.where(real[:, None, None], o_ref[...], 0.0)  # [chunks, G, Dblk]
    out_ref[...] = jnp.sum(o * w[:, :, None], axis=0).astype(out_ref.dtype)


def merge_chunks(
    o: jax.Array, lse: jax.Array, splits: int, dtype, cfg: Config, interpret: bool
) -> jax.Array:
    """o [B, K, C, G, D], lse [B, K, C, G] (chunks C >= splits: a power of two, padding
    unwritten) -> [B, K, G, D] in `dtype`."""
    if cfg.merge == "xla":
        return merge_partials(o[:, :, :splits], lse[:, :, :splits], axis=2).astype(dtype)
    if cfg.merge != "kernel":
        raise ValueError(f"Config.merge={cfg.merge!r}; choose 'kernel' or 'xla'")
    b, kh, chunks, gp, d = o.shape
    dblk = min(d, 32)  # chunks x G x 32 float32 tiles: 64 registers a thread at 16 x 16
    return pl.pallas_call(
        functools.partial(_merge_kernel, splits=splits),
        grid=(b, kh, d // dblk),
        in_specs=[
            pl.BlockSpec((None, None, chunks, gp, dblk), lambda bb, hh, dd: (bb, hh, 0, 0, dd)),
            pl.BlockSpec((None, None, chunks, gp), lambda bb, hh, dd: (bb, hh, 0, 0)),
        ],
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


def _rotate_new(ref, rope: tuple | None, d: int) -> jax.Array:
    """The new token's key (rope = (cos_ref, sin_ref): rotated, float32 math rounded to its
    dtype, as `reference.rope_rotate`) or value (rope None) [d] from its row ref."""
    x = ref[...]
    if rope is None:
        return x
    swap, first = _swap_halves(d)
    x_sw = ref[swap].astype(jnp.float32)
    out = x.astype(jnp.float32) * rope[0][...] + jnp.where(first, -x_sw, x_sw) * rope[1][...]
    return out.astype(x.dtype)


def _append_writer(
    layer_ref, kn_ref, vn_ref, kc_out, vc_out, s: int, rope: tuple | None
) -> Callable:
    """appended(slot, owns, q) for `_split_kernel`: this program's new key (rotated by rope)
    and value are written at `slot` of the stacked caches (the owning chunk only); returns the
    query tile's raw scores against the key and the value, as the cache holds them."""
    layer, seq, head = layer_ref[...], pl.program_id(0), pl.program_id(1)
    d = kn_ref.shape[-1]

    def appended(slot, owns, q):
        k = _rotate_new(kn_ref, rope, d).astype(kc_out.dtype)
        v = _rotate_new(vn_ref, None, d).astype(vc_out.dtype)

        @pl.when(owns & (slot < s))  # a slot past the cache is dropped, as by a scatter
        def _():
            row = (layer, seq, slot, head)
            kc_out[(*row, slice(None))] = k
            vc_out[(*row, slice(None))] = v

        score = jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32)[None, :], axis=1)
        return score, v.astype(jnp.float32)

    return appended


def _stacked(call: DecodeCall) -> tuple[jax.Array, jax.Array, jax.Array | int]:
    """(k_cache, v_cache, layer) with one layer's caches given as a stack of one (a free
    reshape)."""
    if call.layer is None:
        return call.k_cache[None], call.v_cache[None], 0
    return call.k_cache, call.v_cache, call.layer


def _decode(call: DecodeCall, config: Config | None, interpret: bool):
    """The GQA decode kernel over stacked caches [L, B, S, K, D]; with `call.new`, the token is
    appended in-kernel (its key heads read at their offset and rotated, key and value written
    at slot lengths[b]) and the updated caches are returned too."""
    cfg = config or Config()
    k_cache, v_cache, layer = _stacked(call)
    q, new = call.q, call.new
    lengths = call.lengths if new is None else call.lengths + 1  # the new token is attended
    b, h, d = q.shape
    s, kh = k_cache.shape[2], k_cache.shape[3]
    if h % kh:
        raise ValueError(f"kv heads {kh} must divide query heads {h}")
    g = h // kh
    # tl.dot wants at least 16 rows: pad the GQA group (padded rows are dropped).
    gp = max(16, pl.next_power_of_2(g))
    scale = d**-0.5 if call.scale is None else call.scale
    splits, chunk, _ = _chunking(s, b * kh, cfg)
    grid = (b, kh, splits)
    whole = pl.BlockSpec(k_cache.shape, lambda bb, hh, ss: (0,) * 5)  # indexed in-kernel
    q_in = jnp.pad(q.reshape(b, kh, g, d), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    in_specs = [
        pl.BlockSpec((None,), lambda bb, hh, ss: (0,)),
        pl.BlockSpec((None,), lambda bb, hh, ss: (bb,)),
        pl.BlockSpec((None, None, gp, d), lambda bb, hh, ss: (bb, hh, 0, 0)),
        whole,
        whole,
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, gp, d), lambda bb, hh, ss: (bb, hh, ss, 0, 0)),
        pl.BlockSpec((None, None, None, gp), lambda bb, hh, ss: (bb, hh, ss, 0)),
    ]
    chunks = pl.next_power_of_2(splits)  # the merge kernel's tile (the padding stays unwritten)
    out_shape = [
        jax.ShapeDtypeStruct((b, kh, chunks, gp, d), jnp.float32),
        jax.ShapeDtypeStruct((b, kh, chunks, gp), jnp.float32),
    ]
    args = [
        jnp.asarray(layer, jnp.int32).reshape(1),
        lengths.astype(jnp.int32),
        q_in,
        k_cache,
        v_cache,
    ]
    aliases = {}
    if new is not None:

        def row(off):  # this program's KV head, `off` heads into the array
            return pl.BlockSpec((None, None, d), lambda bb, hh, ss: (bb, hh + off, 0))

        in_specs += [row(new.k_head_offset), row(new.v_head_offset)]
        args += [new.k, new.v]
        if new.rope is not None:
            per_seq = pl.BlockSpec((None, d), lambda bb, hh, ss: (bb, 0))
            in_specs += [per_seq, per_seq]
            args += [x.astype(jnp.float32) for x in new.rope]
        out_specs += [whole, whole]
        out_shape += [
            jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
            jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
        ]
        aliases = {3: 2, 4: 3}  # the caches are updated in place

    def kernel(*refs):
        layer_ref, len_ref, q_ref, k_ref, v_ref = refs[:5]
        appended = None
        if new is None:
            o_ref, lse_ref = refs[5:]
        else:
            rope = tuple(refs[7:-4]) or None  # (cos, sin)
            o_ref, lse_ref, kc_out, vc_out = refs[-4:]
            appended = _append_writer(layer_ref, refs[5], refs[6], kc_out, vc_out, s, rope)
        _split_kernel(
            len_ref,
            q_ref,
            k_ref,
            v_ref,
            None,
            None,
            o_ref,
            lse_ref,
            scale=float(scale),
            softcap=call.softcap,
            window=call.sliding_window,
            block_k=cfg.block_k,
            chunk=chunk,
            read=_layer_block_reader(layer_ref, s, cfg.block_k),
            appended=appended,
        )

    res = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="jaxturbo_decode" if new is None else "jaxturbo_decode_append",
    )(*args)
    out = merge_chunks(res[0], res[1], splits, q.dtype, cfg, interpret)[:, :, :g].reshape(b, h, d)
    return out, res[2:]


def decode_attention(
    call: DecodeCall, *, config: Config | None = None, interpret: bool = False
) -> jax.Array:
    """`call.q` [B, H, D] over its caches -> [B, H, D] (see the reference).  Stacked caches
    ([L, B, S, K, D] with `call.layer`, an int or int32 scalar, traced or not) are read in
    place."""
    out, _ = _decode(dataclasses.replace(call, new=None), config, interpret)
    return out


def decode_attention_append(
    call: DecodeCall, *, config: Config | None = None, interpret: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step's attention in one kernel (see `decode_append_reference`): the new key
    (`call.new`: read at its head offset, rotated in-kernel) and value are written at slot
    lengths[b] of the caches (in place: the caches are aliased to the outputs), and q [B, H, D]
    attends to slots [0, lengths[b]].  Returns (out [B, H, D], k_cache, v_cache).  head_dim: a
    power of two.

    In XLA the same step is four kernels more per layer (the key's rotation, two scatter
    guards, two cache writes): at batch 1 such kernels cost more in launches than in bytes."""
    d = call.head_dim
    if d % 2 or pl.next_power_of_2(d) != d:
        raise ValueError(
            f"decode_attention_append needs a power-of-two head_dim; "
            f"got {d} (use decode_attention after writing the cache)"
        )
    out, (kc, vc) = _decode(call, config, interpret)
    return (out, kc, vc) if call.layer is not None else (out, kc[0], vc[0])


def mla_decode_attention(
    call: MLADecodeCall, *, config: Config | None = None, interpret: bool = False
) -> jax.Array:
    """MLA latent decode of `call` (q_latent [B, H, R], q_rope [B, H, Dr] over the latent and
    rope caches) -> [B, H, R] (see `mla_decode_reference`).  Stacked caches (with
    `call.layer`) are read in place.  Any R and Dr: rows are read as power-of-two column pieces
    (`_column_pieces`)."""
    cfg = config or Config()
    q_latent, q_rope, latent_cache, rope_cache = (
        call.q_latent,
        call.q_rope,
        call.latent_cache,
        call.rope_cache,
    )
    layer, scale = call.layer, call.scale
    if layer is None:
        latent_cache, rope_cache, layer = latent_cache[None], rope_cache[None], 0
    b, h, r = q_latent.shape
    dr = q_rope.shape[-1]
    s = latent_cache.shape[2]
    # Column pieces of the unpadded rows rather than a cache padded to powers of two: padding
    # would cost every decode step the padding's bytes (160 -> 256 reads 1.6x the latent).
    r_cols, dr_cols = _column_pieces(r), _column_pieces(dr)
    cfg = dataclasses.replace(
        cfg,
        block_k=mla_block_k(
            cfg, sum(w for _, w, _ in r_cols + dr_cols), latent_cache.dtype.itemsize
        ),
    )
    bh = max(16, min(cfg.block_h, pl.next_power_of_2(h)))
    hp = round_up(h, bh)
    splits, chunk, _ = _chunking(s, b * (hp // bh), cfg)
    # partial outputs laid out as `merge_chunks` takes them ([B, head tiles, chunks, bh, .]):
    # a power-of-two chunk axis, rows of whole 32-column slices (the chunks past `splits` and
    # the columns past R are never written, and are dropped by the merge)
    tiles, chunks, rw = hp // bh, pl.next_power_of_2(splits), round_up(r, 32)
    ql = jnp.pad(q_latent, ((0, 0), (0, hp - h), (0, 0)))
    qr = jnp.pad(q_rope, ((0, 0), (0, hp - h), (0, 0)))

    def kernel(layer_ref, len_ref, q_ref, qr_ref, c_ref, kr_ref, o_ref, lse_ref):
        _split_kernel(
            len_ref,
            q_ref,
            c_ref,
            None,
            qr_ref,
            kr_ref,
            o_ref,
            lse_ref,
            scale=float(scale),
            softcap=None,
            window=None,
            block_k=cfg.block_k,
            chunk=chunk,
            read=_layer_block_reader(layer_ref, s, cfg.block_k, per_head=False),
            k_cols=r_cols,
            kr_cols=dr_cols,
        )

    def whole(x):  # indexed in-kernel
        return pl.BlockSpec(x.shape, lambda bb, hh, ss: (0,) * x.ndim)

    o, lse = pl.pallas_call(
        kernel,
        grid=(b, tiles, splits),
        in_specs=[
            pl.BlockSpec((None,), lambda bb, hh, ss: (0,)),
            pl.BlockSpec((None,), lambda bb, hh, ss: (bb,)),
            pl.BlockSpec((None, bh, r), lambda bb, hh, ss: (bb, hh, 0)),
            pl.BlockSpec((None, bh, dr), lambda bb, hh, ss: (bb, hh, 0)),
            whole(latent_cache),
            whole(rope_cache),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, bh, rw), lambda bb, hh, ss: (bb, hh, ss, 0, 0)),
            pl.BlockSpec((None, None, None, bh), lambda bb, hh, ss: (bb, hh, ss, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, tiles, chunks, bh, rw), jnp.float32),
            jax.ShapeDtypeStruct((b, tiles, chunks, bh), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="jaxturbo_mla_decode",
    )(
        jnp.asarray(layer, jnp.int32).reshape(1),
        call.lengths.astype(jnp.int32),
        ql,
        qr,
        latent_cache,
        rope_cache,
    )
    out = merge_chunks(o, lse, splits, q_latent.dtype, cfg, interpret)
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
