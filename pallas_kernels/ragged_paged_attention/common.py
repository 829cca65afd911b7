"""The call descriptions every ragged paged attention backend takes (`RaggedCall`,
`RaggedMLACall`), their input checks, and layer stacking."""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True, eq=False)
class RaggedCall:
    """GQA attention of a flat ragged batch over paged K/V.

    q [T, H, D]: the new tokens of every sequence back to back, padding at the end; k_pages,
    v_pages [num_pages, page_size, K, D] (or [L, ...] with `layer`, read in place);
    page_tables [S, max_pages] int32 (0-padded; page 0 is the null page); seq_lens [S] tokens
    of each sequence after this step's writes (0: padding); query_start_loc [S + 1] cumulative
    new-token counts.  scale (default D ** -0.5), softcap, sliding_window (positions attended,
    the token's own included) as in `reference.ragged_paged_attention_reference`."""

    q: jax.Array
    k_pages: jax.Array
    v_pages: jax.Array
    page_tables: jax.Array
    seq_lens: jax.Array
    query_start_loc: jax.Array
    layer: jax.Array | int | None = None
    scale: float | None = None
    sliding_window: int | None = None
    softcap: float | None = None

    def batch(self) -> tuple[jax.Array, ...]:
        """(q, k_pages, v_pages, page_tables, seq_lens, query_start_loc): the reference's
        positional arguments."""
        return (
            self.q,
            self.k_pages,
            self.v_pages,
            self.page_tables,
            self.seq_lens,
            self.query_start_loc,
        )

    def stacked(self) -> tuple[jax.Array, jax.Array, jax.Array | int]:
        """(k_pages, v_pages, layer) with one layer's pools as a stack of one."""
        return stack_layers(self.k_pages, self.v_pages, self.layer)

    def check(self) -> None:
        """Shapes of a GQA call (pools [num_pages, page_size, K, D] or [L, ...])."""
        q, (k_pages, v_pages, _) = self.q, self.stacked()
        if q.ndim != 3:
            raise ValueError(f"q must be [tokens, heads, head_dim]; got shape {q.shape}")
        if k_pages.ndim != 5 or k_pages.shape != v_pages.shape:
            raise ValueError(
                f"k_pages and v_pages must be equal [num_pages, page_size, "
                f"kv_heads, head_dim] (or [layers, ...] with layer=); got "
                f"{self.k_pages.shape} and {self.v_pages.shape}"
            )
        h, d = q.shape[1:]
        kh, dk = k_pages.shape[3:]
        if d != dk:
            raise ValueError(f"q head_dim {d} differs from the pages' head_dim {dk}")
        if h % kh:
            raise ValueError(f"kv heads {kh} must divide query heads {h}")
        check_window(self.sliding_window)
        _check_batch(q.shape[0], self.page_tables, self.seq_lens, self.query_start_loc)


@dataclasses.dataclass(frozen=True, eq=False)
class RaggedMLACall:
    """MLA (absorbed queries) of a flat ragged batch over paged latent caches: q_latent
    [T, H, R], q_rope [T, H, Dr]; latent_pages [num_pages, page_size, R], rope_pages
    [num_pages, page_size, Dr] (or [L, ...] both, with `layer`); the batch as in `RaggedCall`;
    scale as in `reference.ragged_paged_mla_reference`."""

    q_latent: jax.Array
    q_rope: jax.Array
    latent_pages: jax.Array
    rope_pages: jax.Array
    page_tables: jax.Array
    seq_lens: jax.Array
    query_start_loc: jax.Array
    scale: float
    layer: jax.Array | int | None = None

    def batch(self) -> tuple[jax.Array, ...]:
        """The reference's positional arguments."""
        return (
            self.q_latent,
            self.q_rope,
            self.latent_pages,
            self.rope_pages,
            self.page_tables,
            self.seq_lens,
            self.query_start_loc,
        )

    def stacked(self) -> tuple[jax.Array, jax.Array, jax.Array | int]:
        """(latent_pages, rope_pages, layer) with one layer's pools as a stack of one."""
        return stack_layers(self.latent_pages, self.rope_pages, self.layer)

    def check(self) -> None:
        """Shapes of an MLA call (pools [num_pages, page_size, R | Dr] or [L, ...])."""
        q_latent, q_rope = self.q_latent, self.q_rope
        latent_pages, rope_pages, _ = self.stacked()
        if q_latent.ndim != 3 or q_rope.shape[:2] != q_latent.shape[:2] or q_rope.ndim != 3:
            raise ValueError(
                f"q_latent [tokens, heads, R] and q_rope [tokens, heads, Dr] must "
                f"agree on tokens and heads; got {q_latent.shape} and "
                f"{q_rope.shape}"
            )
        if (
            latent_pages.ndim != 4
            or rope_pages.shape[:3] != latent_pages.shape[:3]
            or latent_pages.shape[-1] != q_latent.shape[-1]
            or rope_pages.shape[-1] != q_rope.shape[-1]
        ):
            raise ValueError(
                f"latent_pages must be [num_pages, page_size, {q_latent.shape[-1]}]"
                f" and rope_pages [num_pages, page_size, {q_rope.shape[-1]}] (or "
                f"[layers, ...] with layer=); got {self.latent_pages.shape} and "
                f"{self.rope_pages.shape}"
            )
        _check_batch(q_latent.shape[0], self.page_tables, self.seq_lens, self.query_start_loc)


def stack_layers(a: jax.Array, b: jax.Array, layer: jax.Array | int | None):
    """(a, b, layer) with one layer's pools given as a stack of one (a free reshape)."""
    if layer is None:
        return a[None], b[None], 0
    return a, b, layer


def check_window(sliding_window: int | None) -> None:
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(
            f"sliding_window={sliding_window} must be >= 1 (positions attended, "
            "the token's own included) or None"
        )


def _check_batch(t: int, page_tables, seq_lens, query_start_loc) -> None:
    if page_tables.ndim != 2:
        raise ValueError(
            f"page_tables must be [sequences, max_pages]; got shape {page_tables.shape}"
        )
    s = page_tables.shape[0]
    if seq_lens.shape != (s,) or query_start_loc.shape != (s + 1,):
        raise ValueError(
            f"page_tables {page_tables.shape} is for {s} sequences: seq_lens must "
            f"be [{s}] and query_start_loc [{s + 1}]; got {seq_lens.shape} and "
            f"{query_start_loc.shape}"
        )
    if t < 1:
        raise ValueError(f"the batch must hold at least one token slot; got T={t}")
