"""Ragged paged attention: one call serves a flat batch that mixes prefill chunks and decode
tokens, reading K/V (or MLA's latent) through per-sequence page tables.

`ragged_paged_attention` and `ragged_paged_mla_attention` dispatch between the pure-jnp
reference ("xla"), the Pallas-Triton kernel (GPU) and the Mosaic TPU kernel (`api.py`);
`write_kv_pages` / `write_mla_pages` scatter a step's new K/V into the pages.
"""

from pallas_kernels.ragged_paged_attention.api import (
    IMPLEMENTATIONS,
    ragged_paged_attention,
    ragged_paged_mla_attention,
)
from pallas_kernels.ragged_paged_attention.reference import write_kv_pages, write_mla_pages

__all__ = [
    "IMPLEMENTATIONS",
    "ragged_paged_attention",
    "ragged_paged_mla_attention",
    "write_kv_pages",
    "write_mla_pages",
]
