"""`ragged_paged_attention` and `ragged_paged_mla_attention`, dispatched by `registry`.

Backends, in "auto"'s order: "pallas_triton" (GPU; interpret mode elsewhere), "mosaic_tpu"
(TPU; TPU interpret mode elsewhere), "xla" (the pure-jnp reference; any platform; it gathers
every token's sequence's pages: memory T x max_pages x page_size x K x D).  Every one takes
every call.
"""

from __future__ import annotations

import jax

from pallas_kernels import registry
from pallas_kernels.ragged_paged_attention.common import RaggedCall, RaggedMLACall
from pallas_kernels.ragged_paged_attention.reference import (
    ragged_paged_attention_reference,
    ragged_paged_mla_reference,
)


def _kernel(name: str, fn: str):
    return registry.kernel(f"pallas_kernels.ragged_paged_attention.{name}", fn)


def _xla(call: RaggedCall, *, config, interpret):
    return ragged_paged_attention_reference(
        *call.batch(),
        layer=call.layer,
        scale=call.scale,
        sliding_window=call.sliding_window,
        softcap=call.softcap,
    )


def _xla_mla(call: RaggedMLACall, *, config, interpret):
    return ragged_paged_mla_reference(*call.batch(), scale=call.scale, layer=call.layer)


def _backends(fn: str, xla) -> tuple[registry.Backend, ...]:
    return (
        registry.Backend(
            "pallas_triton", _kernel("pallas_triton", fn), platform="gpu", pallas=True
        ),
        registry.Backend("mosaic_tpu", _kernel("mosaic_tpu", fn), platform="tpu", pallas=True),
        registry.Backend("xla", xla),
    )


RAGGED = registry.register(
    registry.Op("ragged_paged_attention", _backends("ragged_paged_attention", _xla))
)
RAGGED_MLA = registry.register(
    registry.Op("ragged_paged_mla_attention", _backends("ragged_paged_mla_attention", _xla_mla))
)
IMPLEMENTATIONS = RAGGED.implementations


def ragged_paged_attention(
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
    implementation: str = "auto",
    interpret: bool | None = None,
    config=None,
) -> jax.Array:
    """Attention of a flat batch of prefill chunks and decode tokens over paged K/V.

    Args:
      q: [T, H, D]: the new tokens of every sequence back to back, padding at the end.
      k_pages, v_pages: [num_pages, page_size, K, D], or [L, num_pages, page_size, K, D] with
        `layer` (int or int32 scalar, traced or not): that layer is read in place.
      page_tables: [S, max_pages] int32 page ids (0-padded; page 0 is the null page).
      seq_lens: [S] int32 tokens of each sequence after this step's K/V writes (0: padding).
      query_start_loc: [S + 1] int32 cumulative new-token counts (padding sequences add 0).
      scale: logit scale (default D ** -0.5); softcap: logits -> softcap * tanh(logits /
        softcap); sliding_window: positions attended, the token's own included.
      implementation: "auto", "pallas" or a backend (module docstring, `registry`).
      interpret: kernels only; default True off their platform.  config: the
        implementation's Config.
    Returns:
      [T, H, D] in q.dtype: token t of sequence s at position p (new token j of s sits at
      seq_lens[s] - q_len_s + j) attends positions [max(0, p - window + 1), p] of s.
      Padding tokens' outputs are finite (0 from every implementation here).
    """
    call = RaggedCall(
        q,
        k_pages,
        v_pages,
        page_tables,
        seq_lens,
        query_start_loc,
        layer=layer,
        scale=scale,
        sliding_window=sliding_window,
        softcap=softcap,
    )
    return RAGGED(call, implementation=implementation, config=config, interpret=interpret)


def ragged_paged_mla_attention(
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
    implementation: str = "auto",
    interpret: bool | None = None,
    config=None,
) -> jax.Array:
    """MLA (absorbed queries) over paged latent caches, for a flat ragged batch.

    Args:
      q_latent: [T, H, R]; q_rope: [T, H, Dr] (any R and Dr).
      latent_pages: [num_pages, page_size, R]; rope_pages: [num_pages, page_size, Dr] (or
        [L, ...] both, with `layer`).
      page_tables, seq_lens, query_start_loc, implementation, interpret, config: as in
        `ragged_paged_attention`.
      scale: softmax scale (1 / sqrt(qk_nope_head_dim + qk_rope_head_dim) in DeepSeek models).
    Returns:
      out_latent [T, H, R] in q_latent.dtype (causal, as `ragged_paged_attention`).
    """
    call = RaggedMLACall(
        q_latent,
        q_rope,
        latent_pages,
        rope_pages,
        page_tables,
        seq_lens,
        query_start_loc,
        scale=scale,
        layer=layer,
    )
    return RAGGED_MLA(call, implementation=implementation, config=config, interpret=interpret)
