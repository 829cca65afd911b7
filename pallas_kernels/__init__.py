"""Pallas kernels for GPU (Pallas-Triton; Mosaic GPU not yet) and TPU (Mosaic TPU).

One folder per kernel family, each with a pure-jnp reference and one file per implementation
(`pallas_triton.py`, `mosaic_tpu.py`, `cudnn_lse.py`); `attention`, `attention_backward`,
`decode_attention`, `decode_attention_append` and `mla_decode_attention` dispatch between them (see `api.py`).
"""

from pallas_kernels.api import (attention, attention_backward, decode_attention,
                                decode_attention_append, mla_decode_attention)

__all__ = ["attention", "attention_backward", "decode_attention", "decode_attention_append",
           "mla_decode_attention"]
