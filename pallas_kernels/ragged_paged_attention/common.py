"""Input checks and layer stacking shared by the ragged paged attention implementations."""

from __future__ import annotations

import jax


def stack_layers(a: jax.Array, b: jax.Array, layer: jax.Array | int | None):
    """(a, b, layer) with one layer's pools given as a stack of one (a free reshape)."""
    if layer is None:
        return a[None], b[None], 0
    return a, b, layer


def check_window(sliding_window: int | None) -> None:
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window} must be >= 1 (positions attended, "
                         "the token's own included) or None")


def _check_batch(t: int, page_tables, seq_lens, query_start_loc) -> None:
    if page_tables.ndim != 2:
        raise ValueError(f"page_tables must be [sequences, max_pages]; got shape "
                         f"{page_tables.shape}")
    s = page_tables.shape[0]
    if seq_lens.shape != (s,) or query_start_loc.shape != (s + 1,):
        raise ValueError(f"page_tables {page_tables.shape} is for {s} sequences: seq_lens must "
                         f"be [{s}] and query_start_loc [{s + 1}]; got {seq_lens.shape} and "
                         f"{query_start_loc.shape}")
    if t < 1:
        raise ValueError(f"the batch must hold at least one token slot; got T={t}")


def check_gqa(q, k_pages, v_pages, page_tables, seq_lens, query_start_loc,
              sliding_window: int | None) -> None:
    """Shapes of a GQA call with stacked pools [L, num_pages, page_size, K, D]."""
    if q.ndim != 3:
        raise ValueError(f"q must be [tokens, heads, head_dim]; got shape {q.shape}")
    if k_pages.ndim != 5 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must be equal [num_pages, page_size, kv_heads, "
                         f"head_dim] (or [layers, ...] with layer=); got {k_pages.shape} and "
                         f"{v_pages.shape}")
    h, d = q.shape[1:]
    kh, dk = k_pages.shape[3:]
    if d != dk:
        raise ValueError(f"q head_dim {d} differs from the pages' head_dim {dk}")
    if h % kh:
        raise ValueError(f"kv heads {kh} must divide query heads {h}")
    check_window(sliding_window)
    _check_batch(q.shape[0], page_tables, seq_lens, query_start_loc)


def check_mla(q_latent, q_rope, latent_pages, rope_pages, page_tables, seq_lens,
              query_start_loc) -> None:
    """Shapes of an MLA call with stacked pools [L, num_pages, page_size, R | Dr]."""
    if q_latent.ndim != 3 or q_rope.shape[:2] != q_latent.shape[:2] or q_rope.ndim != 3:
        raise ValueError(f"q_latent [tokens, heads, R] and q_rope [tokens, heads, Dr] must "
                         f"agree on tokens and heads; got {q_latent.shape} and {q_rope.shape}")
    if (latent_pages.ndim != 4 or rope_pages.shape[:3] != latent_pages.shape[:3]
            or latent_pages.shape[-1] != q_latent.shape[-1]
            or rope_pages.shape[-1] != q_rope.shape[-1]):
        raise ValueError(f"latent_pages must be [num_pages, page_size, {q_latent.shape[-1]}] "
                         f"and rope_pages [num_pages, page_size, {q_rope.shape[-1]}] (or "
                         f"[layers, ...] with layer=); got {latent_pages.shape} and "
                         f"{rope_pages.shape}")
    _check_batch(q_latent.shape[0], page_tables, seq_lens, query_start_loc)
