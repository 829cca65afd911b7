"""Grouped matmuls for mixture-of-experts (dropless routing: rows sorted by expert).

`gmm` (differentiable grouped GEMM), `tgmm` (its weight gradient), `gmv` (decode: one expert
per row, no sorting); references in `reference.py`, kernels in `pallas_triton.py` (GPU) and
`mosaic_tpu.py` (TPU), dispatch in `api.py` (through `pallas_kernels.registry`).
"""

from pallas_kernels.grouped_matmul.api import IMPLEMENTATIONS, gmm, gmv, tgmm
from pallas_kernels.grouped_matmul.reference import gmm_reference, gmv_reference, tgmm_reference

__all__ = [
    "IMPLEMENTATIONS",
    "gmm",
    "gmm_reference",
    "gmv",
    "gmv_reference",
    "tgmm",
    "tgmm_reference",
]
