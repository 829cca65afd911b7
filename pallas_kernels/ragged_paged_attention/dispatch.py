"""Entry points of the ragged paged attention family: pick an implementation and call it.

`implementation`:
  "xla"            the pure-jnp reference compiled by XLA (any platform; gathers every
                   token's sequence's pages: memory T x max_pages x page_size x K x D);
  "pallas_triton"  the Pallas-Triton kernel (GPU; interpret mode elsewhere);
  "mosaic_tpu"     the Mosaic TPU kernel (TPU; TPU interpret mode elsewhere);
  "auto"           Pallas-Triton on GPU, Mosaic TPU on TPU, XLA on CPU; the choice and its
                   reason are logged once per distinct reason (logger "pallas_kernels").
"""

from __future__ import annotations

import logging
from typing import Literal

import jax

from pallas_kernels.ragged_paged_attention.reference import (ragged_paged_attention_reference,
                                                             ragged_paged_mla_reference)

Implementation = Literal["auto", "xla", "pallas_triton", "mosaic_tpu"]
IMPLEMENTATIONS = ("auto", "xla", "pallas_triton", "mosaic_tpu")


def _platform() -> str:
    return jax.devices()[0].platform


def _log_choice(op: str, impl: str, reason: str) -> str:
    # (imported here: pallas_kernels.api may import this package at its top)
    from pallas_kernels.api import log_choice
    return log_choice(op, impl, reason, logging.INFO)


def _choose(op: str, implementation: str) -> str:
    """The implementation to run: `implementation` itself unless "auto"."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{op} implementation {implementation!r} is unknown; choose one of "
                         f"{IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    platform = _platform()
    if platform == "gpu":
        return _log_choice(op, "pallas_triton", "GPU: the Pallas-Triton kernel")
    if platform == "tpu":
        return _log_choice(op, "mosaic_tpu", "TPU: the Mosaic TPU kernel")
    return _log_choice(op, "xla", f"no GPU or TPU ({platform}): the XLA reference")


def _interpret(implementation: str, interpret: bool | None) -> bool:
    """Kernels run in interpret mode when asked, or when their platform is absent."""
    if interpret is not None:
        return interpret
    return _platform() != ("tpu" if implementation == "mosaic_tpu" else "gpu")


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
    implementation: Implementation = "auto",
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
      implementation: "auto" | "xla" | "pallas_triton" | "mosaic_tpu" (module docstring).
      interpret: kernels only; default True off their platform.  config: the
        implementation's Config.
    Returns:
      [T, H, D] in q.dtype: token t of sequence s at position p (new token j of s sits at
      seq_lens[s] - q_len_s + j) attends positions [max(0, p - window + 1), p] of s.
      Padding tokens' outputs are finite (0 from every implementation here).
    """
    impl = _choose("ragged_paged_attention", implementation)
    kw = dict(layer=layer, scale=scale, sliding_window=sliding_window, softcap=softcap)
    args = (q, k_pages, v_pages, page_tables, seq_lens, query_start_loc)
    if impl == "xla":
        return ragged_paged_attention_reference(*args, **kw)
    if impl == "pallas_triton":
        from pallas_kernels.ragged_paged_attention import pallas_triton as kernels
    else:
        from pallas_kernels.ragged_paged_attention import mosaic_tpu as kernels
    return kernels.ragged_paged_attention(*args, config=config,
                                          interpret=_interpret(impl, interpret), **kw)


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
    implementation: Implementation = "auto",
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
    impl = _choose("ragged_paged_mla_attention", implementation)
    args = (q_latent, q_rope, latent_pages, rope_pages, page_tables, seq_lens,
            query_start_loc)
    if impl == "xla":
        return ragged_paged_mla_reference(*args, scale=scale, layer=layer)
    if impl == "pallas_triton":
        from pallas_kernels.ragged_paged_attention import pallas_triton as kernels
    else:
        from pallas_kernels.ragged_paged_attention import mosaic_tpu as kernels
    return kernels.ragged_paged_mla_attention(*args, scale=scale, layer=layer, config=config,
                                              interpret=_interpret(impl, interpret))
