"""Pallas kernels for GPU (Mosaic GPU, Pallas-Triton) and TPU (Mosaic TPU).

One folder per kernel family, each with a pure-jnp reference; `attention` and
`decode_attention` dispatch between implementations.
"""

from pallas_kernels.api import attention, decode_attention

__all__ = ["attention", "decode_attention"]
