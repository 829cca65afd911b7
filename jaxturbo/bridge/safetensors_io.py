"""Minimal safetensors reader/writer on numpy, bf16 included (via ml_dtypes).

Format (huggingface/safetensors): 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the
tensor bytes, offsets relative to the end of the header.  We read it ourselves so that a damaged
file gives a message naming the file and what is short, and so bf16 stays bitwise bf16.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxturbo.errors import UserError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in DTYPES.items()}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one file as read-only, memory-mapped numpy arrays (no copy)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weight file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(
                f"{path} is truncated: {size} bytes, too short for a safetensors header"
            )
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise UserError(
                f"{path} is truncated: header claims {n} bytes but the file has {size - 8} after the length"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not a safetensors file (bad header: {e})") from None
    header.pop("__metadata__", None)
    start = 8 + n
    need = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if start + need > size:
        raise UserError(
            f"{path} is truncated: its header needs {need} bytes of tensor data, "
            f"the file holds {size - start}"
        )
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        dt = DTYPES.get(info.get("dtype"))
        if dt is None:
            raise UserError(
                f"tensor {name} in {path} has unsupported dtype {info.get('dtype')!r}; "
                f"supported: {', '.join(DTYPES)}"
            )
        shape = tuple(int(s) for s in info["shape"])
        b, e = (int(x) for x in info["data_offsets"])
        if e - b != int(np.prod(shape)) * dt.itemsize:
            raise UserError(
                f"tensor {name} in {path}: {e - b} bytes stored for shape {list(shape)} "
                f"of {info['dtype']} ({int(np.prod(shape)) * dt.itemsize} expected)"
            )
        out[name] = mm[start + b : start + e].view(dt).reshape(shape)
    return out


def write_safetensors(
    path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> int:
    """Write `tensors` (in the given order) to `path`; returns the data bytes written."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    arrays = []
    offset = 0
    for name, a in tensors.items():
        a = np.asarray(a)
        dt = _NAMES.get(a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype)
        if dt is None:
            raise UserError(f"tensor {name} has dtype {a.dtype}, which safetensors cannot store")
        a = np.ascontiguousarray(a, dtype=DTYPES[dt])
        header[name] = {
            "dtype": dt,
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.reshape(-1).view(np.uint8).data)
    return offset
