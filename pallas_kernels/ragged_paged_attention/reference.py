"""Pure-jnp ragged paged attention: the reference for the kernels, written for clarity.

A step's batch is flat: `q [T, H, D]` holds the new tokens of every scheduled sequence back to
back; sequence s owns tokens [query_start_loc[s], query_start_loc[s + 1]) and, after this
step's K/V writes, seq_lens[s] cached tokens whose K/V sit in pages: position p of sequence s
is row p % page_size of page page_tables[s, p // page_size].  The new tokens are the last of
the sequence (new token j sits at position seq_lens[s] - q_len_s + j), so a prefill chunk, a
chunk that continues a partly computed prompt and a decode token are the same case.

Token t of sequence s at position p attends positions [max(0, p - window + 1), p] of s: causal,
and `sliding_window=w` keeps w positions including its own (the Hugging Face convention;
`flash_attention.reference.attention_reference(sliding_window=w - 1)` is the same mask).
Tokens past query_start_loc[S] are padding: their output is 0 here (the kernels only promise
finite values).  Scores and softmax run in float32.

The reference gathers each sequence's pages into one contiguous [max_pages * page_size, K, D]
K and V and every token's sequence's copy of them: memory T * max_pages * page_size * K * D,
fine for tests and small batches, not a serving path for long prefills.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention.reference import NEG_INF
from pallas_kernels.ragged_paged_attention.common import check_window


def sequence_of(query_start_loc: jax.Array, tokens: jax.Array) -> jax.Array:
    """Sequence index of each flat token index in `tokens` [n] (clamped to [0, S - 1]: tokens
    past query_start_loc[S] get S - 1)."""
    s = query_start_loc.shape[0] - 1
    # sequence s holds t iff qsl[s] <= t < qsl[s + 1]: count the starts at or before t (a
    # sequence without new tokens shares its start with the next and is never picked)
    seq = jnp.sum(query_start_loc[None, :s] <= tokens[:, None], axis=1) - 1
    return jnp.clip(seq, 0, s - 1)


def token_sequences(query_start_loc: jax.Array, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Sequence index [T] of every token of the flat batch and whether it is real (not
    padding past query_start_loc[S]); padding tokens get index S - 1."""
    t = jnp.arange(num_tokens)
    return sequence_of(query_start_loc, t), t < query_start_loc[-1]


def token_positions(
    query_start_loc: jax.Array, seq_lens: jax.Array, num_tokens: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sequence [T], position [T], real [T]) of every token: its new tokens are the last
    q_len of the sequence's seq_lens[s] tokens."""
    seq, real = token_sequences(query_start_loc, num_tokens)
    q_len = query_start_loc[1:] - query_start_loc[:-1]
    pos = seq_lens[seq] - q_len[seq] + (jnp.arange(num_tokens) - query_start_loc[seq])
    return seq, jnp.where(real, pos, 0), real


def gather_pages(pages: jax.Array, page_tables: jax.Array) -> jax.Array:
    """Pages [num_pages, page_size, ...] through page_tables [S, max_pages] -> each sequence's
    contiguous cache [S, max_pages * page_size, ...]."""
    g = pages[page_tables]  # [S, max_pages, page_size, ...]
    return g.reshape(g.shape[0], g.shape[1] * g.shape[2], *g.shape[3:])


def visible_positions(
    query_start_loc: jax.Array,
    seq_lens: jax.Array,
    num_tokens: int,
    kv_len: int,
    sliding_window: int | None,
) -> jax.Array:
    """Mask [T, kv_len]: True where token t may attend position j of its own sequence."""
    _, pos, real = token_positions(query_start_loc, seq_lens, num_tokens)
    j = jnp.arange(kv_len)[None, :]
    ok = (j <= pos[:, None]) & real[:, None]
    if sliding_window is not None:
        ok &= j >= pos[:, None] - sliding_window + 1
    return ok


def _softmax_rows(logits: jax.Array, ok: jax.Array) -> jax.Array:
    """Softmax over the last axis of float32 logits where `ok`; rows with nothing visible: 0."""
    logits = jnp.where(ok, logits, NEG_INF)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.where(ok, p, 0.0)
    return p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)


def ragged_paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_tables: jax.Array,
    seq_lens: jax.Array,
    query_start_loc: jax.Array,
    *,
    layer: jax.Array | int | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Attention of a flat ragged batch over paged K/V.

    Args:
      q: [T, H, D] new tokens of all sequences, back to back (padding at the end).
      k_pages, v_pages: [num_pages, page_size, K, D], or [L, num_pages, page_size, K, D] with
        `layer` (int or int32 scalar) picking the layer; H % K == 0.
      page_tables: [S, max_pages] int page ids (0-padded); seq_lens: [S] cached tokens per
        sequence after this step's writes (0 for padding sequences);
        query_start_loc: [S + 1] cumulative new-token counts.
      scale: logit scale (default D ** -0.5); softcap: logits -> softcap * tanh(logits /
        softcap); sliding_window: positions attended, the token's own included.
    Returns:
      [T, H, D] in q.dtype (0 for padding tokens).
    """
    check_window(sliding_window)
    if layer is not None:
        k_pages, v_pages = k_pages[layer], v_pages[layer]
    t, h, d = q.shape
    kh = k_pages.shape[2]
    g = h // kh
    scale = d**-0.5 if scale is None else scale
    k_seq = gather_pages(k_pages, page_tables)  # [S, Smax, K, D]
    v_seq = gather_pages(v_pages, page_tables)
    seq, _, _ = token_positions(query_start_loc, seq_lens, t)
    ok = visible_positions(query_start_loc, seq_lens, t, k_seq.shape[1], sliding_window)
    k_tok = k_seq[seq].astype(jnp.float32)  # [T, Smax, K, D]: each token's sequence
    v_tok = jnp.where(ok[:, :, None, None], v_seq[seq].astype(jnp.float32), 0.0)
    qg = q.astype(jnp.float32).reshape(t, kh, g, d)
    logits = jnp.einsum("tkgd,tjkd->tkgj", qg, k_tok, precision=jax.lax.Precision.HIGHEST) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    p = _softmax_rows(logits, ok[:, None, None, :])
    out = jnp.einsum("tkgj,tjkd->tkgd", p, v_tok, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(t, h, d).astype(q.dtype)


def ragged_paged_mla_reference(
    q_latent: jax.Array,
    q_rope: jax.Array,
    latent_pages: jax.Array,
    rope_pages: jax.Array,
    page_tables: jax.Array,
    seq_lens: jax.Array,
    query_start_loc: jax.Array,
    *,
    scale: float,
    layer: jax.Array | int | None = None,
) -> jax.Array:
    """Multi-head latent attention (absorbed queries) of a flat ragged batch over paged caches.

    Every head attends over the one shared latent: score = scale * (q_latent . c_j +
    q_rope . k_rope_j), output = sum_j p_j c_j in latent space (see
    `decode_attention.reference.mla_decode_reference` for the absorption).

    Args:
      q_latent: [T, H, R]; q_rope: [T, H, Dr].
      latent_pages: [num_pages, page_size, R]; rope_pages: [num_pages, page_size, Dr] (or
        [L, ...] both, with `layer`).
      page_tables, seq_lens, query_start_loc: as in `ragged_paged_attention_reference`.
    Returns:
      out_latent [T, H, R] in q_latent.dtype (0 for padding tokens).
    """
    if layer is not None:
        latent_pages, rope_pages = latent_pages[layer], rope_pages[layer]
    t = q_latent.shape[0]
    c_seq = gather_pages(latent_pages, page_tables)  # [S, Smax, R]
    kr_seq = gather_pages(rope_pages, page_tables)
    seq, _, _ = token_positions(query_start_loc, seq_lens, t)
    ok = visible_positions(query_start_loc, seq_lens, t, c_seq.shape[1], None)
    c_tok = jnp.where(ok[:, :, None], c_seq[seq].astype(jnp.float32), 0.0)  # [T, Smax, R]
    kr_tok = kr_seq[seq].astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    logits = jnp.einsum(
        "thr,tjr->thj", q_latent.astype(jnp.float32), c_tok, precision=hi
    ) + jnp.einsum("thr,tjr->thj", q_rope.astype(jnp.float32), kr_tok, precision=hi)
    p = _softmax_rows(logits * scale, ok[:, None, :])
    out = jnp.einsum("thj,tjr->thr", p, c_tok, precision=hi)
    return out.astype(q_latent.dtype)


def _page_slots(pages: jax.Array, slot_mapping: jax.Array, layer) -> tuple:
    """Scatter index of flat slots (page * page_size + row) into pages [(L,) N, P, ...]."""
    page_size = pages.shape[1 if layer is None else 2]
    at = (slot_mapping // page_size, slot_mapping % page_size)
    return at if layer is None else (layer, *at)


def write_kv_pages(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
    layer: jax.Array | int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Write k_new, v_new [T, K, D] at flat slots slot_mapping [T] (slot = page * page_size +
    row) of k_pages, v_pages [num_pages, page_size, K, D] (or layer `layer` of [L, ...]).

    An XLA scatter: in place under jit when the caches are donated.  Padding tokens map into
    the null page 0, whose contents nothing reads; a slot past the pool is dropped."""
    at = _page_slots(k_pages, slot_mapping, layer)
    return (
        k_pages.at[at].set(k_new.astype(k_pages.dtype), mode="drop"),
        v_pages.at[at].set(v_new.astype(v_pages.dtype), mode="drop"),
    )


def write_mla_pages(
    latent_pages: jax.Array,
    rope_pages: jax.Array,
    latent_new: jax.Array,
    rope_new: jax.Array,
    slot_mapping: jax.Array,
    layer: jax.Array | int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`write_kv_pages` for MLA: latent_new [T, R] and rope_new [T, Dr] into latent_pages
    [num_pages, page_size, R] and rope_pages [num_pages, page_size, Dr] (or layer `layer`)."""
    return write_kv_pages(latent_pages, rope_pages, latent_new, rope_new, slot_mapping, layer)
