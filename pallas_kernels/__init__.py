"""Pallas kernels for GPU (Pallas-Triton, and Mosaic GPU for Hopper's attention forward and
backward) and TPU (Mosaic TPU), with interpret mode on CPU.

One folder per op family, in the shape of tokamax's ops: a pure-jnp reference, one file per
backend (`pallas_triton.py`, `mosaic_gpu.py`, `mosaic_tpu.py`, `cudnn_lse.py`), the call
description every backend takes (`common.py`), and `api.py` with the public functions and the
family's backends in `registry` (which one runs a call, and why).
"""

from pallas_kernels.api import (
    attention,
    attention_backward,
    decode_attention,
    decode_attention_append,
    gmm,
    gmv,
    mla_decode_attention,
    ragged_paged_attention,
    ragged_paged_mla_attention,
    tgmm,
)

__all__ = [
    "attention",
    "attention_backward",
    "decode_attention",
    "decode_attention_append",
    "gmm",
    "gmv",
    "mla_decode_attention",
    "ragged_paged_attention",
    "ragged_paged_mla_attention",
    "tgmm",
]
