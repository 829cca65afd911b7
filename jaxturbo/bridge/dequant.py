"""Dequantisation of GGML tensor blocks to float32, in numpy.

Each function takes the raw bytes of a tensor (`uint8`, any shape, whole blocks) and returns
the float32 values in storage order, `[n_blocks * block_size]`.  Block layouts follow ggml's
`block_q*` structs (ggml-common.h); all scales are little-endian float16.

    type   block  bytes  value
    Q8_0   32     34     d * q                       (d f16, q int8[32])
    Q4_0   32     18     d * (nibble - 8)            (d f16, 16 bytes: low nibbles = 0..15, high = 16..31)
    Q4_1   32     20     d * nibble + m              (d f16, m f16, nibbles as Q4_0)
    Q4_K   256    144    d*sc*nibble - dmin*mn       (8 sub-blocks of 32, 6-bit sc/mn packed in 12 bytes)
    Q6_K   256    210    d * sc * (q6 - 32)          (16 sub-blocks of 16, int8 scales)
"""

from __future__ import annotations

from collections.abc import Callable

import ml_dtypes
import numpy as np

from jaxturbo.errors import UserError


def _blocks(raw: np.ndarray, nbytes: int, name: str) -> np.ndarray:
    """View raw bytes as `[n_blocks, nbytes]`."""
    flat = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if flat.size % nbytes:
        raise UserError(
            f"{name} data of {flat.size} bytes is not a whole number of {nbytes}-byte blocks"
        )
    return flat.reshape(-1, nbytes)


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian float16 from a `[n, 2]` uint8 slice, as float32 `[n, 1]`."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """`[n, 16]` packed bytes -> `[n, 32]` values: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def dequant_f32(raw: np.ndarray) -> np.ndarray:
    """float32 values, `[n]`."""
    return np.ascontiguousarray(raw).view("<f4").reshape(-1).astype(np.float32)


def dequant_f16(raw: np.ndarray) -> np.ndarray:
    """float16 values widened to float32, `[n]`."""
    return np.ascontiguousarray(raw).view("<f2").reshape(-1).astype(np.float32)


def dequant_bf16(raw: np.ndarray) -> np.ndarray:
    """bfloat16 values widened to float32, `[n]`."""
    return (
        np.ascontiguousarray(raw)
        .view("<u2")
        .reshape(-1)
        .view(ml_dtypes.bfloat16)
        .astype(np.float32)
    )


def dequant_q8_0(raw: np.ndarray) -> np.ndarray:
    """Q8_0 blocks -> float32 `[n_blocks * 32]`."""
    b = _blocks(raw, 34, "Q8_0")
    d = _f16(b[:, :2])
    q = b[:, 2:].view(np.int8).astype(np.float32)
    return (d * q).reshape(-1)


def dequant_q4_0(raw: np.ndarray) -> np.ndarray:
    """Q4_0 blocks -> float32 `[n_blocks * 32]`."""
    b = _blocks(raw, 18, "Q4_0")
    d = _f16(b[:, :2])
    return (d * (_nibbles(b[:, 2:]) - 8.0)).reshape(-1)


def dequant_q4_1(raw: np.ndarray) -> np.ndarray:
    """Q4_1 blocks -> float32 `[n_blocks * 32]`."""
    b = _blocks(raw, 20, "Q4_1")
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return (d * _nibbles(b[:, 4:]) + m).reshape(-1)


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack Q4_K's 12 bytes into 8 six-bit scales and 8 six-bit mins, each `[n, 8]`.

    Bytes 0-3 hold scales 0-3 (low 6 bits), bytes 4-7 mins 0-3; sub-blocks 4-7 keep their low
    4 bits in bytes 8-11 and borrow the top 2 bits of bytes 0-7.
    """
    lo_sc, lo_mn, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo_sc & 63, (hi & 0x0F) | ((lo_sc >> 6) << 4)], axis=1)
    mn = np.concatenate([lo_mn & 63, (hi >> 4) | ((lo_mn >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def dequant_q4_k(raw: np.ndarray) -> np.ndarray:
    """Q4_K super-blocks -> float32 `[n_blocks * 256]`."""
    b = _blocks(raw, 144, "Q4_K")
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k4_scales(b[:, 4:16])
    # 4 chunks of 32 bytes; each chunk's low nibbles are sub-block 2j, high nibbles 2j+1
    qs = b[:, 16:].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32).astype(np.float32)
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(-1)


def dequant_q6_k(raw: np.ndarray) -> np.ndarray:
    """Q6_K super-blocks -> float32 `[n_blocks * 256]`."""
    b = _blocks(raw, 210, "Q6_K")
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 2, 32)  # [half, low/high 32 bytes, 32]
    qh = b[:, 128:192].reshape(n, 2, 1, 32)  # [half, 32]
    sc = b[:, 192:208].view(np.int8).astype(np.float32).reshape(n, 2, 8)
    d = _f16(b[:, 208:210])
    # each half has 128 values in 4 runs of 32: low nibbles of ql[0:32], ql[32:64], then the
    # high nibbles; the 2 high bits of run r come from qh bits 2r..2r+1
    lo = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # [n, 2, 4, 32]
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    hi = (qh >> shifts) & 3
    q = (lo | (hi << 4)).astype(np.float32) - 32.0  # [n, 2, 4, 32]
    # scale index = 8*half + 2*run + (position // 16)
    s = sc.reshape(n, 2, 4, 2, 1)
    vals = q.reshape(n, 2, 4, 2, 16) * s * d.reshape(n, 1, 1, 1, 1)
    return vals.reshape(-1)


# GGML type name -> (dequantiser, elements per block, bytes per block)
DEQUANT: dict[str, tuple[Callable[[np.ndarray], np.ndarray], int, int]] = {
    "F32": (dequant_f32, 1, 4),
    "F16": (dequant_f16, 1, 2),
    "BF16": (dequant_bf16, 1, 2),
    "Q8_0": (dequant_q8_0, 32, 34),
    "Q4_0": (dequant_q4_0, 32, 18),
    "Q4_1": (dequant_q4_1, 32, 20),
    "Q4_K": (dequant_q4_k, 256, 144),
    "Q6_K": (dequant_q6_k, 256, 210),
}


def dequantize(
    raw: np.ndarray, type_name: str, shape: tuple[int, ...], tensor: str = "tensor"
) -> np.ndarray:
    """Dequantise one tensor's raw bytes of GGML type `type_name` to float32 of `shape`.

    `shape` is the numpy (row-major) shape, i.e. GGUF's dims reversed.
    """
    if type_name not in DEQUANT:
        raise UserError(
            f"GGUF tensor {tensor} has unsupported type {type_name}; "
            f"supported: {', '.join(DEQUANT)}"
        )
    fn, block, nbytes = DEQUANT[type_name]
    n = int(np.prod(shape))
    raw_bytes = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if n % block or raw_bytes.size != n // block * nbytes:
        raise UserError(
            f"GGUF tensor {tensor} ({type_name}, shape {list(shape)}) has {raw_bytes.size} bytes, "
            f"expected {n // block * nbytes}; the file is damaged or truncated"
        )
    return fn(raw_bytes).reshape(shape)
