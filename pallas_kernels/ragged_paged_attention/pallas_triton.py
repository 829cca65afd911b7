"""Ragged paged attention through the Pallas-Triton lowering (GPU; interpret mode on CPU).

One kernel serves a flat batch of prefill chunks and decode tokens (see `reference.py` for the
semantics).  The batch is cut into q tiles: up to `block_q` consecutive new tokens of ONE
sequence; the tokens past query_start_loc[S] (padding) form tiles of their own, which write
zeros.  A program takes one q tile, one block of query heads that share a KV head (GQA: the G
heads of one KV head; MLA: `block_h` heads over the shared latent) and one split of the tile's
KV range: its rows are (token, head) pairs, block_q * heads of them (padded to a power of two,
at least 16 for tl.dot).  It walks the sequence's KV positions in blocks of `block_k` rows,
gathering each row from its page through the page table, with an online softmax; blocks
entirely outside the tile's causal / sliding-window range are never visited, and rows outside
it load as zeros (the null page and stale page tails are never read).

Each program finds its tile from query_start_loc itself (a cumulative sum over the sequences'
tile counts, vectorised in registers): no metadata kernels run before it.

Decode at small batch (few tiles) splits the KV range across programs (flash-decoding): each
split writes a partial output and its log-sum-exp, merged afterwards by the contiguous decode
kernel's merge.  The split count comes from the static shapes (bucketed T and S): enough
programs for the GPU.  With one split the kernel writes the output directly.

The caches are read in place: stacked-layer pools [L, num_pages, page_size, ...] are viewed
(a free reshape) as rows [L * num_pages * page_size, ...] and the layer index offsets the rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode_attention import pallas_triton as decode_triton
from pallas_kernels.decode_attention.pallas_triton import merge_chunks, merge_partials
from pallas_kernels.flash_attention.common import NEG_INF
from pallas_kernels.ragged_paged_attention import common
from pallas_kernels.triton_dot import dot as _dot


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes and Triton launch parameters (static).  None: chosen from the shapes."""

    block_k: int | None = None  # KV rows per loop step (a power of two); None: see _plan
    block_rows: int | None = None  # query rows (tokens x heads) per program, a power of two
    num_splits: int | None = None  # KV splits per tile; None: enough for ~_TARGET_PROGRAMS
    num_warps: int | None = None  # None: 4, or 8 for programs of more than 8K accumulators
    num_stages: int = 2
    block_h: int = 16  # MLA: query heads per program (they share the latent)
    merge: str = "kernel"  # splits merged by a Pallas kernel ("kernel") or jnp ("xla")


# Programs to aim for when splitting the KV range (the contiguous decode kernel's target:
# about four per H100 SM).
_TARGET_PROGRAMS = decode_triton._TARGET_PROGRAMS
# The merge kernel holds chunks x head rows x 32 float32 values per program: beyond this many
# chunk x head rows it would spill, and the jnp merge runs instead.
_MERGE_KERNEL_MAX_ROWS = 256
# float32 accumulator values (rows x padded dim) per program: 64 registers a thread at 8 warps;
# programs above half of it take 8 warps, the rest 4
_MAX_ACC = 16384
# shared memory for the pipelined KV blocks (an H100 / H200 SM has 228 KB)
_SMEM_BUDGET = 160 * 1024


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call."""

    tokens: int  # T
    seqs: int  # S
    heads: int  # H (query heads)
    group: int  # query heads per program block (GQA: H / K; MLA: block_h)
    head_blocks: int  # programs along the head axis
    mla: bool
    dim: int  # D (GQA) or R (MLA): the value / latent width
    rope_dim: int  # Dr (MLA) or 0
    page_size: int
    pool_pages: int  # pages per layer
    max_pages: int  # page table width
    block_q: int  # tokens per q tile
    rows: int  # rows per program (power of two >= 16)
    block_k: int
    splits: int
    max_tiles: int
    scale: float
    softcap: float | None
    window: int | None

    @property
    def dim_p(self) -> int:
        return max(16, pl.next_power_of_2(self.dim))

    @property
    def rope_p(self) -> int:
        return max(16, pl.next_power_of_2(self.rope_dim)) if self.rope_dim else 0

    @property
    def group_p(self) -> int:
        return pl.next_power_of_2(self.group)


def _plan(
    t: int,
    s: int,
    h: int,
    group: int,
    head_blocks: int,
    *,
    mla: bool,
    dim: int,
    rope_dim: int,
    page_size: int,
    pool_pages: int,
    max_pages: int,
    itemsize: int,
    scale: float,
    softcap: float | None,
    window: int | None,
    cfg: Config,
) -> _Plan:
    """Tile sizes from the static shapes: rows = block_q * group per program (by the mean
    new tokens per sequence of the bucket, see below), block_k within shared memory, and KV
    splits enough for ~_TARGET_PROGRAMS programs over the most tiles the bucket can hold."""
    if cfg.block_rows is not None:
        want = cfg.block_rows
    else:
        # the bucket's mean new tokens per sequence: ~1 is a decode batch (the fewest rows
        # that fill a tl.dot); a mixed one keeps 64 (every decode token's tile computes all
        # its rows, so taller tiles waste more on them); long chunks take 128
        per_seq = -(-t // max(s, 1))
        want = 16 if per_seq <= 1 else 64 if per_seq < 64 else 128
        # the float32 accumulator rows x dim within ~64 registers a thread at 8 warps
        want = min(want, max(16, _MAX_ACC // max(16, pl.next_power_of_2(dim))))
    rows = max(16, pl.next_power_of_2(max(want, group)))
    block_q = max(1, rows // group)
    # tiles: every sequence's ceil(q_len / block_q) plus the padding's, each >= 1 token
    max_tiles = max(1, min(t, (t + (s + 1) * (block_q - 1)) // block_q))
    block_k = cfg.block_k
    if block_k is None:
        block_k = max(page_size, 128 if rows <= 16 else 64)
        # the pipelined K (and V) blocks stay within shared memory
        dim_p = max(16, pl.next_power_of_2(dim))
        row_bytes = itemsize * (
            dim_p * (1 if mla else 2) + (max(16, pl.next_power_of_2(rope_dim)) if rope_dim else 0)
        )
        while block_k > 16 and cfg.num_stages * block_k * row_bytes > _SMEM_BUDGET:
            block_k //= 2
    if block_k & (block_k - 1) or block_k < 16:
        raise ValueError(f"Config.block_k={block_k} must be a power of two >= 16")
    kv_blocks = -(-(max_pages * page_size) // block_k)
    splits = cfg.num_splits or -(-_TARGET_PROGRAMS // (max_tiles * head_blocks))
    splits = max(1, min(splits, kv_blocks))
    return _Plan(
        tokens=t,
        seqs=s,
        heads=h,
        group=group,
        head_blocks=head_blocks,
        mla=mla,
        dim=dim,
        rope_dim=rope_dim,
        page_size=page_size,
        pool_pages=pool_pages,
        max_pages=max_pages,
        block_q=block_q,
        rows=rows,
        block_k=block_k,
        splits=splits,
        max_tiles=max_tiles,
        scale=float(scale),
        softcap=softcap,
        window=window,
    )


def _tile(qsl_ref, lens_ref, tile, plan: _Plan):
    """(sequence, first token, tokens, position of the first token, real) of q tile `tile`.

    Sequence s has ceil(q_len_s / block_q) tiles, in sequence order; then come the padding
    tokens' tiles (real = False, sequence S).  Tiles past those own no token (0 tokens)."""
    s, bq = plan.seqs, plan.block_q
    idx = jnp.arange(max(16, pl.next_power_of_2(s)))
    in_s = idx < s
    # (every sequence's length loaded with the starts, not after the search: one round trip
    # to memory fewer before the first page is read)
    starts = plgpu.load(qsl_ref.at[jnp.minimum(idx, s)], mask=in_s, other=0)
    ends = plgpu.load(qsl_ref.at[jnp.minimum(idx + 1, s)], mask=in_s, other=0)
    lens = plgpu.load(lens_ref.at[jnp.minimum(idx, s - 1)], mask=in_s, other=0)
    q_len = ends - starts
    n_tiles = (q_len + bq - 1) // bq
    cum = jnp.cumsum(n_tiles)  # inclusive: sequence i owns tiles [cum_i - n_i, cum_i)
    seq = jnp.sum((cum <= tile).astype(jnp.int32))
    sel = idx == seq
    first_tile = jnp.sum(jnp.where(sel, cum - n_tiles, 0))
    start = jnp.sum(jnp.where(sel, starts, 0))
    q_len_s = jnp.sum(jnp.where(sel, q_len, 0))
    real = seq < s
    kv_len = jnp.sum(jnp.where(sel, lens, 0))
    j = tile - first_tile  # tile index within the sequence (or within the padding)
    pad_tile = tile - jnp.sum(n_tiles)
    tok0 = jnp.where(real, start + j * bq, qsl_ref[s] + pad_tile * bq)
    n_tok = jnp.where(real, jnp.minimum(bq, q_len_s - j * bq), jnp.clip(plan.tokens - tok0, 0, bq))
    pos0 = kv_len - q_len_s + j * bq
    return jnp.minimum(seq, s - 1), tok0, n_tok, pos0, real


def _kernel(*refs, plan: _Plan):
    """One (q tile, head block, KV split) program."""
    refs = list(refs)
    layer_ref, qsl_ref, lens_ref, pt_ref, q_ref = refs[:5]
    del refs[:5]
    qr_ref = refs.pop(0) if plan.mla else None
    k_ref = refs.pop(0)
    kr_ref = refs.pop(0) if plan.mla else None
    v_ref = None if plan.mla else refs.pop(0)
    out_refs = refs

    # (program ids read at the top level: interpret mode substitutes them there only)
    tile, hblk, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[...]
    seq, tok0, n_tok, pos0, real = _tile(qsl_ref, lens_ref, tile, plan)

    hb, rows = plan.group, plan.rows
    r = jnp.arange(rows)
    rt, rh = r // hb, r % hb  # (token within the tile, head within the block) of each row
    head = hblk * hb + rh
    row_ok = (rt < n_tok) & (head < plan.heads)
    q_row = jnp.where(row_ok, (tok0 + rt) * plan.heads + head, 0)
    q_pos = pos0 + rt  # position of each row's token

    def load_rows(ref, idx, ok, width_p, width, col0=0):
        cols = jnp.arange(width_p)
        mask = ok[:, None] & (cols < width)[None, :]
        return plgpu.load(ref.at[idx[:, None], col0 + cols[None, :]], mask=mask, other=0)

    # (in the pages' dtype: tl.dot takes operands of one type)
    q = load_rows(q_ref, q_row, row_ok, plan.dim_p, plan.dim).astype(k_ref.dtype)
    qr = (
        load_rows(qr_ref, q_row, row_ok, plan.rope_p, plan.rope_dim).astype(kr_ref.dtype)
        if plan.mla
        else None
    )

    # the tile's KV range: [first token's window start, last token's position]
    kv_hi = jnp.where(real, pos0 + n_tok, 0)
    kv_lo = jnp.zeros_like(kv_hi)
    if plan.window is not None:
        kv_lo = jnp.minimum(jnp.maximum(pos0 - plan.window + 1, 0), kv_hi)
    bk = plan.block_k
    lo, hi = kv_lo // bk, (kv_hi + bk - 1) // bk
    per = (hi - lo + plan.splits - 1) // plan.splits
    b0 = jnp.minimum(lo + split * per, hi)
    b1 = jnp.minimum(b0 + per, hi)
    kv_head = 0 if plan.mla else hblk
    row_base = layer * plan.pool_pages

    def body(j, carry):
        acc, m, l = carry
        pos = j * bk + jnp.arange(bk)
        col_ok = (pos >= kv_lo) & (pos < kv_hi)
        page_idx = jnp.minimum(pos // plan.page_size, plan.max_pages - 1)
        page = plgpu.load(pt_ref.at[seq * plan.max_pages + page_idx], mask=col_ok, other=0)
        slot = (row_base + page) * plan.page_size + pos % plan.page_size
        k = load_rows(k_ref, slot, col_ok, plan.dim_p, plan.dim, kv_head * plan.dim)
        s = _dot(q, k, trans_b=True)
        if plan.mla:
            s = s + _dot(
                qr, load_rows(kr_ref, slot, col_ok, plan.rope_p, plan.rope_dim), trans_b=True
            )
        s = s * plan.scale
        if plan.softcap is not None:
            s = plan.softcap * jnp.tanh(s / plan.softcap)
        vis = col_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        if plan.window is not None:
            vis = vis & (pos[None, :] > q_pos[:, None] - plan.window)
        s = jnp.where(vis, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        v = (
            k
            if plan.mla
            else load_rows(v_ref, slot, col_ok, plan.dim_p, plan.dim, kv_head * plan.dim)
        )
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, alpha * l + jnp.sum(p, axis=1)

    acc, m, l = lax.fori_loop(
        b0,
        b1,
        body,
        (
            jnp.zeros((rows, plan.dim_p), jnp.float32),
            jnp.full((rows,), NEG_INF, jnp.float32),
            jnp.zeros((rows,), jnp.float32),
        ),
    )
    empty = l == 0.0
    o = acc / jnp.where(empty, 1.0, l)[:, None]
    cols = jnp.arange(plan.dim_p)
    # Masked rows store to one past the end: never touched on a GPU (masked), and dropped by
    # interpret mode's scatter, where a duplicate in-bounds index could overwrite a real row.
    if plan.splits == 1:
        (o_ref,) = out_refs
        mask = row_ok[:, None] & (cols < plan.dim)[None, :]
        rows_at = jnp.where(row_ok, q_row, o_ref.shape[0])
        plgpu.store(o_ref.at[rows_at[:, None], cols[None, :]], o.astype(o_ref.dtype), mask=mask)
        return
    # partials [T, head_blocks, chunks, group_p, dim_p] and lse [..., group_p], flattened
    o_ref, lse_ref = out_refs
    chunks = pl.next_power_of_2(plan.splits)
    part = jnp.where(
        row_ok,
        (((tok0 + rt) * plan.head_blocks + hblk) * chunks + split) * plan.group_p + rh,
        lse_ref.shape[0],
    )
    plgpu.store(o_ref.at[part[:, None], cols[None, :]], o, mask=row_ok[:, None])
    lse = jnp.where(empty, NEG_INF, m + jnp.log(jnp.where(empty, 1.0, l)))
    plgpu.store(lse_ref.at[part], lse, mask=row_ok)


def _num_warps(plan: _Plan, cfg: Config) -> int:
    if cfg.num_warps is not None:
        return cfg.num_warps
    return 8 if plan.rows * plan.dim_p > _MAX_ACC // 2 else 4


def _run(
    q,
    qr,
    k_rows,
    kr_rows,
    v_rows,
    layer,
    qsl,
    seq_lens,
    page_tables,
    plan: _Plan,
    cfg: Config,
    interpret: bool,
    name: str,
) -> jax.Array:
    """The pallas_call and the merge: q [T, H, dim] -> [T, H, dim] in q.dtype."""
    t, h = plan.tokens, plan.heads
    args = [
        jnp.asarray(layer, jnp.int32).reshape(1),
        qsl.astype(jnp.int32),
        seq_lens.astype(jnp.int32),
        page_tables.astype(jnp.int32).reshape(-1),
        q.reshape(t * h, -1),
    ]
    if plan.mla:
        args.append(qr.reshape(t * h, -1))
    args.append(k_rows)
    args += [kr_rows] if plan.mla else [v_rows]

    def whole(x):  # indexed in-kernel
        return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)

    in_specs = [pl.BlockSpec((None,), lambda *_: (0,))] + [whole(x) for x in args[1:]]
    chunks = pl.next_power_of_2(plan.splits)
    gp, dp = plan.group_p, plan.dim_p
    if plan.splits == 1:
        out_shape = [jax.ShapeDtypeStruct((t * h, plan.dim), q.dtype)]
    else:
        n = t * plan.head_blocks * chunks * gp
        out_shape = [
            jax.ShapeDtypeStruct((n, dp), jnp.float32),
            jax.ShapeDtypeStruct((n,), jnp.float32),
        ]
    res = pl.pallas_call(
        functools.partial(_kernel, plan=plan),
        grid=(plan.max_tiles, plan.head_blocks, plan.splits),
        in_specs=in_specs,
        out_specs=[whole(o) for o in out_shape],
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=_num_warps(plan, cfg), num_stages=cfg.num_stages
        ),
        interpret=interpret,
        name=name,
    )(*args)
    if plan.splits == 1:
        return res[0].reshape(t, h, plan.dim)
    o = res[0].reshape(t, plan.head_blocks, chunks, gp, dp)
    lse = res[1].reshape(t, plan.head_blocks, chunks, gp)
    if cfg.merge == "kernel" and chunks * gp <= _MERGE_KERNEL_MAX_ROWS:
        merged = merge_chunks(o, lse, plan.splits, q.dtype, decode_triton.Config(), interpret)
    elif cfg.merge in ("kernel", "xla"):
        merged = merge_partials(o[:, :, : plan.splits], lse[:, :, : plan.splits], axis=2).astype(
            q.dtype
        )
    else:
        raise ValueError(f"Config.merge={cfg.merge!r}; choose 'kernel' or 'xla'")
    merged = merged[:, :, : plan.group, : plan.dim]
    return merged.reshape(t, plan.head_blocks * plan.group, plan.dim)[:, :h]


def ragged_paged_attention(
    call: common.RaggedCall, *, config: Config | None = None, interpret: bool = False
) -> jax.Array:
    """`call.q` [T, H, D] over its paged K/V -> [T, H, D] (see
    `reference.ragged_paged_attention_reference`; padding tokens' outputs are 0).

    Stacked pools ([L, ...] with `call.layer`, int or int32 scalar, traced or not) are read
    in place.  head_dim: any (padded to a power of two in registers; a power of two reads
    without masked columns)."""
    cfg = config or Config()
    call.check()
    k_pages, v_pages, layer = call.stacked()
    q, scale = call.q, call.scale
    t, h, d = q.shape
    n_layers, pool, page, kh, _ = k_pages.shape
    plan = _plan(
        t,
        call.seq_lens.shape[0],
        h,
        h // kh,
        kh,
        mla=False,
        dim=d,
        rope_dim=0,
        page_size=page,
        pool_pages=pool,
        max_pages=call.page_tables.shape[1],
        itemsize=k_pages.dtype.itemsize,
        scale=d**-0.5 if scale is None else scale,
        softcap=call.softcap,
        window=call.sliding_window,
        cfg=cfg,
    )
    rows = (n_layers * pool * page, kh * d)  # a free reshape: no copy of the pool
    return _run(
        q,
        None,
        k_pages.reshape(rows),
        None,
        v_pages.reshape(rows),
        layer,
        call.query_start_loc,
        call.seq_lens,
        call.page_tables,
        plan,
        cfg,
        interpret,
        "jaxturbo_ragged_paged_attention",
    )


def ragged_paged_mla_attention(
    call: common.RaggedMLACall, *, config: Config | None = None, interpret: bool = False
) -> jax.Array:
    """MLA latent attention of a ragged batch (`call`: q_latent [T, H, R], q_rope [T, H, Dr]
    over paged latent and rope pools) -> [T, H, R] (see `reference.ragged_paged_mla_reference`).
    Any R and Dr: the kernel pads them to powers of two in registers and masks the extra
    columns."""
    cfg = config or Config()
    call.check()
    latent_pages, rope_pages, layer = call.stacked()
    q_latent, q_rope = call.q_latent, call.q_rope
    t, h, r = q_latent.shape
    dr = q_rope.shape[-1]
    n_layers, pool, page, _ = latent_pages.shape
    bh = min(pl.next_power_of_2(h), pl.next_power_of_2(cfg.block_h))
    plan = _plan(
        t,
        call.seq_lens.shape[0],
        h,
        bh,
        -(-h // bh),
        mla=True,
        dim=r,
        rope_dim=dr,
        page_size=page,
        pool_pages=pool,
        max_pages=call.page_tables.shape[1],
        itemsize=latent_pages.dtype.itemsize,
        scale=call.scale,
        softcap=None,
        window=None,
        cfg=cfg,
    )
    n = n_layers * pool * page
    return _run(
        q_latent,
        q_rope,
        latent_pages.reshape(n, r),
        rope_pages.reshape(n, dr),
        None,
        layer,
        call.query_start_loc,
        call.seq_lens,
        call.page_tables,
        plan,
        cfg,
        interpret,
        "jaxturbo_ragged_paged_mla",
    )
