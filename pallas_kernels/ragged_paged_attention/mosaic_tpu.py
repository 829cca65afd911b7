"""Ragged paged attention through Mosaic TPU (TPU interpret mode on CPU).

The flat token batch is cut into aligned q blocks of `block_q` tokens, so every output block is
a plain BlockSpec block written once.  A q block can hold tokens of several sequences (decode
tokens, chunk boundaries): the grid's first axis walks *work items*, one per (q block,
sequence with tokens in it), sorted by q block, so consecutive items of one q block keep its
output block and softmax state resident (both axes are "arbitrary").  The second axis walks the
item's sequence's KV pages: each step's K/V page is a BlockSpec block whose index comes from
the scalar-prefetched page table (the pipeline copies HBM -> VMEM one step ahead); steps past
the item's page range repeat the last index (no copy) and skip the compute.  Pages before the
sliding window of the item's first token are never visited (the null page included).

A step updates the online softmax of all rows of the q block, masked to the item's tokens
(causal, window) and to positions [window start, end) of the page; the other rows are left
unchanged.  Each KV page block carries every KV head ([page_size, K, D]: full trailing dims),
and a static loop serves each head's G query heads, laid out [K, G, block_q, D] so a head's
rows are one [G * block_q, D] matrix.

Work items are computed with jnp from query_start_loc and seq_lens (a few small XLA ops) and
scalar-prefetched with the page tables.  Only tested in TPU interpret mode (no TPU lent here);
untuned: the grid is (work items) x (page-table width) steps whatever the sequences' lengths,
one page per step, and the flattened page tables must fit in SMEM.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode_attention.mosaic_tpu import _dot, _interp, softmax_update
from pallas_kernels.flash_attention.common import NEG_INF, round_up
from pallas_kernels.ragged_paged_attention import common
from pallas_kernels.ragged_paged_attention.reference import sequence_of


@dataclasses.dataclass(frozen=True)
class Config:
    block_q: int = 16  # tokens per q block: a power of two >= 16 (bf16 sublane tiles)


# per-item metadata fields, in the flat prefetched array [items * _FIELDS]
_FIELDS = 9
_QB, _SEQ, _TOK_LO, _TOK_HI, _POS_LO, _KV_LO, _KV_HI, _FIRST, _LAST = range(_FIELDS)


def work_items(
    query_start_loc: jax.Array,
    seq_lens: jax.Array,
    num_blocks: int,
    block_q: int,
    window: int | None,
) -> jax.Array:
    """Flat int32 [items * _FIELDS]: per work item (q block, sequence, its tokens [lo, hi) in
    the block, the position of token lo, the KV range [lo, hi) the tokens attend, first / last
    item of its q block).  items = num_blocks + S bounds the count (each sequence boundary
    inside a q block adds one); unused items repeat the last q block with empty ranges, as do
    q blocks of padding only (their output is zeros)."""
    s = seq_lens.shape[0]
    n_items = num_blocks + s
    total = query_start_loc[s]
    start = jnp.arange(num_blocks) * block_q
    end = jnp.minimum(start + block_q, total)  # the block's real tokens: [start, end)
    has_real = start < total
    first_seq = sequence_of(query_start_loc, start)
    last_seq = sequence_of(query_start_loc, jnp.maximum(end - 1, 0))
    count = jnp.where(has_real, last_seq - first_seq + 1, 1)
    offset = jnp.cumsum(count) - count  # first item of each q block
    w = jnp.arange(n_items)
    qb = jnp.sum(offset[None, :] <= w[:, None], axis=1) - 1
    seq = jnp.clip(first_seq[qb] + w - offset[qb], 0, s - 1)
    q0, q1 = query_start_loc[seq], query_start_loc[seq + 1]
    tok_lo = jnp.maximum(q0, qb * block_q)
    tok_hi = jnp.minimum(q1, qb * block_q + block_q)
    valid = (w < jnp.sum(count)) & has_real[qb] & (tok_hi > tok_lo)
    tok_lo, tok_hi = jnp.where(valid, tok_lo, 0), jnp.where(valid, tok_hi, 0)
    pos_lo = jnp.where(valid, seq_lens[seq] - (q1 - q0) + (tok_lo - q0), 0)
    kv_hi = jnp.where(valid, pos_lo + tok_hi - tok_lo, 0)
    kv_lo = jnp.zeros_like(kv_hi)
    if window is not None:
        kv_lo = jnp.clip(pos_lo - window + 1, 0, kv_hi)
    first = jnp.concatenate([jnp.ones((1,), bool), qb[1:] != qb[:-1]])
    last = jnp.concatenate([qb[1:] != qb[:-1], jnp.ones((1,), bool)])
    fields = [qb, seq, tok_lo, tok_hi, pos_lo, kv_lo, kv_hi, first, last]
    return jnp.stack([f.astype(jnp.int32) for f in fields], axis=1).reshape(-1)


def _page_range(meta_ref, w, page_size):
    """[first, last + 1) pages of item w's KV range."""
    kv_lo, kv_hi = meta_ref[w * _FIELDS + _KV_LO], meta_ref[w * _FIELDS + _KV_HI]
    return kv_lo // page_size, (kv_hi + page_size - 1) // page_size


def _kv_index(w, j, layer_ref, pt_ref, meta_ref, *, page_size: int, max_pages: int):
    """Pool page (and layer) of step (w, j): page j of the item's range, clamped into it so
    steps outside repeat a neighbouring block index (no copy)."""
    lo, hi = _page_range(meta_ref, w, page_size)
    jj = jnp.maximum(jnp.minimum(j, hi - 1), lo)
    seq = meta_ref[w * _FIELDS + _SEQ]
    return layer_ref[0], pt_ref[seq * max_pages + jnp.minimum(jj, max_pages - 1)]


def _kernel(
    layer_ref,
    pt_ref,
    meta_ref,
    q_ref,
    *refs,
    scale,
    softcap,
    window,
    page_size: int,
    block_q: int,
    kv_heads: int,
    groups: int,
    mla: bool,
    last_step: int,
):
    if mla:
        qr_ref, c_ref, kr_ref, o_ref, m_sc, l_sc, acc_sc = refs
    else:
        k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc = refs
    w, j = pl.program_id(0), pl.program_id(1)
    at = lambda f: meta_ref[w * _FIELDS + f]  # noqa: E731
    qb = at(_QB)
    tok_lo, tok_hi, pos_lo = at(_TOK_LO), at(_TOK_HI), at(_POS_LO)
    kv_lo, kv_hi = at(_KV_LO), at(_KV_HI)
    lo, hi = _page_range(meta_ref, w, page_size)
    rows = groups * block_q

    @pl.when((at(_FIRST) == 1) & (j == 0))
    def _():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((j >= lo) & (j < hi))
    def _():
        # row r = g * block_q + i holds token qb * block_q + i (block_q a power of two)
        r = lax.broadcasted_iota(jnp.int32, (rows, page_size), 0)
        tok = qb * block_q + jnp.bitwise_and(r, block_q - 1)
        q_pos = pos_lo + tok - tok_lo
        pos = j * page_size + lax.broadcasted_iota(jnp.int32, (rows, page_size), 1)
        vis = (tok >= tok_lo) & (tok < tok_hi) & (pos <= q_pos) & (pos >= kv_lo)
        if window is not None:
            vis = vis & (pos > q_pos - window)
        col = j * page_size + lax.broadcasted_iota(jnp.int32, (page_size, 1), 0)
        in_range = (col >= kv_lo) & (col < kv_hi)  # rows of the page the item may read
        for kh in range(kv_heads):  # static: each KV head serves its G query heads
            q = q_ref[kh].reshape(rows, q_ref.shape[-1])
            if mla:
                c = jnp.where(in_range, c_ref[...], 0)
                s = _dot(q, c, trans_b=True) + _dot(
                    qr_ref[kh].reshape(rows, qr_ref.shape[-1]), kr_ref[...], trans_b=True
                )
                v = c
            else:
                s = _dot(q, k_ref[:, kh, :], trans_b=True)
                # a page's stale tail or a freed neighbour must not reach p @ v as 0 * NaN
                v = jnp.where(in_range, v_ref[:, kh, :], 0)
            s = s * scale
            if softcap is not None:
                s = softcap * jnp.tanh(s / softcap)
            softmax_update(m_sc, l_sc, acc_sc, kh, jnp.where(vis, s, NEG_INF), v)

    @pl.when((at(_LAST) == 1) & (j == last_step))
    def _():
        for kh in range(kv_heads):
            l = l_sc[kh]
            o = acc_sc[kh] / jnp.where(l == 0.0, 1.0, l)
            o_ref[kh] = o.reshape(o_ref.shape[1:]).astype(o_ref.dtype)


def _heads_major(x: jax.Array, kv_heads: int, tokens_p: int) -> jax.Array:
    """[T, H, D] -> [K, G, Tp, D] (tokens padded to Tp): one KV head's query rows per slab."""
    t, h, d = x.shape
    x = jnp.pad(x, ((0, tokens_p - t), (0, 0), (0, 0)))
    return x.reshape(tokens_p, kv_heads, h // kv_heads, d).transpose(1, 2, 0, 3)


def _run(
    qs,
    pools,
    layer,
    page_tables,
    seq_lens,
    query_start_loc,
    *,
    kv_heads: int,
    scale: float,
    softcap,
    window,
    mla: bool,
    cfg: Config,
    interpret,
    name: str,
):
    """qs: (q,) or (q_latent, q_rope) [T, H, *]; pools: (k, v) [L, N, P, K, D] or
    (latent, rope) [L, N, P, *] -> [T, H, D or R]."""
    bq = cfg.block_q
    if bq < 16 or bq & (bq - 1):
        raise ValueError(f"Config.block_q={bq} must be a power of two >= 16")
    t, h, dv = qs[0].shape
    s, max_pages = page_tables.shape
    page_size = pools[0].shape[2]
    g = h // kv_heads
    tp = round_up(t, bq)
    n_blocks = tp // bq
    meta = work_items(
        query_start_loc.astype(jnp.int32), seq_lens.astype(jnp.int32), n_blocks, bq, window
    )
    n_items = n_blocks + s
    # in the pages' dtype: one operand type per matmul
    q_in = [_heads_major(x.astype(p.dtype), kv_heads, tp) for x, p in zip(qs, pools)]

    def q_spec(x):
        return pl.BlockSpec(
            (kv_heads, g, bq, x.shape[-1]), lambda w, j, lay, pt, m: (0, 0, m[w * _FIELDS + _QB], 0)
        )

    kv_index = functools.partial(_kv_index, page_size=page_size, max_pages=max_pages)

    def pool_spec(x):
        trailing = x.shape[3:]  # [K, D] or [R] / [Dr]: whole, as Mosaic's tiling wants
        return pl.BlockSpec(
            (None, None, page_size, *trailing),
            lambda w, j, lay, pt, m: (*kv_index(w, j, lay, pt, m), 0, *(0,) * len(trailing)),
        )

    kernel = functools.partial(
        _kernel,
        scale=float(scale),
        softcap=softcap,
        window=window,
        page_size=page_size,
        block_q=bq,
        kv_heads=kv_heads,
        groups=g,
        mla=mla,
        last_step=max_pages - 1,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(n_items, max_pages),
            in_specs=[q_spec(x) for x in q_in] + [pool_spec(x) for x in pools],
            out_specs=q_spec(q_in[0]),
            scratch_shapes=[
                pltpu.VMEM((kv_heads, g * bq, 1), jnp.float32),
                pltpu.VMEM((kv_heads, g * bq, 1), jnp.float32),
                pltpu.VMEM((kv_heads, g * bq, dv), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((kv_heads, g, tp, dv), qs[0].dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
        interpret=_interp(interpret),
        name=name,
    )(
        jnp.asarray(layer, jnp.int32).reshape(1),
        page_tables.astype(jnp.int32).reshape(-1),
        meta,
        *q_in,
        *pools,
    )
    return out.transpose(2, 0, 1, 3).reshape(tp, h, dv)[:t]


def ragged_paged_attention(
    call: common.RaggedCall,
    *,
    config: Config | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """`call.q` [T, H, D] over its paged K/V -> [T, H, D] (see
    `reference.ragged_paged_attention_reference`; padding tokens' outputs are 0).  Stacked
    pools are read in place (the layer index is scalar-prefetched with the page tables)."""
    call.check()
    k_pages, v_pages, layer = call.stacked()
    d = call.q.shape[-1]
    return _run(
        (call.q,),
        (k_pages, v_pages),
        layer,
        call.page_tables,
        call.seq_lens,
        call.query_start_loc,
        kv_heads=k_pages.shape[3],
        scale=d**-0.5 if call.scale is None else call.scale,
        softcap=call.softcap,
        window=call.sliding_window,
        mla=False,
        cfg=config or Config(),
        interpret=interpret,
        name="jaxturbo_ragged_paged_attention_tpu",
    )


def ragged_paged_mla_attention(
    call: common.RaggedMLACall,
    *,
    config: Config | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """MLA latent attention of a ragged batch (`call`: q_latent [T, H, R], q_rope [T, H, Dr]
    over paged latent and rope pools) -> [T, H, R] (see `reference.ragged_paged_mla_reference`):
    one "KV head" (the latent) whose G = H query heads all share each page."""
    call.check()
    latent_pages, rope_pages, layer = call.stacked()
    return _run(
        (call.q_latent, call.q_rope),
        (latent_pages, rope_pages),
        layer,
        call.page_tables,
        call.seq_lens,
        call.query_start_loc,
        kv_heads=1,
        scale=call.scale,
        softcap=None,
        window=None,
        mla=True,
        cfg=config or Config(),
        interpret=interpret,
        name="jaxturbo_ragged_paged_mla_tpu",
    )
