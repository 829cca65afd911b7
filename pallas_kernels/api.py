"""The public entry points, one import away, and the dispatch record benchmarks read.

attention / attention_backward (`flash_attention.api`), decode_attention /
decode_attention_append / mla_decode_attention (`decode_attention.api`),
ragged_paged_attention / ragged_paged_mla_attention (`ragged_paged_attention.api`), gmm / tgmm
/ gmv (`grouped_matmul.api`); each takes `implementation` ("auto", "pallas" or a backend: see
`registry`).  What "auto" picks, and any fallback from a fused or kernel path, is logged once per
distinct (op, implementation, reason) on the "pallas_kernels" logger (`log_choice`); `CHOICES`
holds each op's latest choice.
"""

from pallas_kernels.decode_attention.api import (
    decode_attention,
    decode_attention_append,
    mla_decode_attention,
)
from pallas_kernels.flash_attention.api import attention, attention_backward, cudnn_lse_supported
from pallas_kernels.grouped_matmul.api import gmm, gmv, tgmm
from pallas_kernels.ragged_paged_attention.api import (
    ragged_paged_attention,
    ragged_paged_mla_attention,
)
from pallas_kernels.registry import CHOICES, REGISTRY, log_choice

__all__ = [
    "CHOICES",
    "REGISTRY",
    "attention",
    "attention_backward",
    "cudnn_lse_supported",
    "decode_attention",
    "decode_attention_append",
    "gmm",
    "gmv",
    "log_choice",
    "mla_decode_attention",
    "ragged_paged_attention",
    "ragged_paged_mla_attention",
    "tgmm",
]
