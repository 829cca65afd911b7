"""Our GGML dequantisers against gguf-py's reference on random blocks of every supported type."""

from __future__ import annotations

import numpy as np
import pytest

from jaxturbo.bridge.dequant import DEQUANT, dequantize
from jaxturbo.errors import UserError

gguf = pytest.importorskip("gguf")  # gguf-py, the reference; the GPU machine's image lacks it

# byte offsets of the float16 scale fields inside one block, per type
SCALE_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,)}


def random_raw(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random raw bytes `[rows, bytes_per_row]` whose float16 scales are finite."""
    rng = np.random.default_rng(seed)
    t = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[t]
    if type_name in ("F32", "F16", "BF16"):
        vals = rng.standard_normal((rows, cols)).astype(np.float32)
        if type_name == "F32":
            return vals.view(np.uint8)
        if type_name == "F16":
            return vals.astype(np.float16).view(np.uint8)
        return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)  # bf16 = top half
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for off in SCALE_FIELDS[type_name]:
        scales = rng.uniform(-2, 2, raw.shape[:2]).astype(np.float16)
        raw[:, :, off : off + 2] = scales.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", list(DEQUANT))
def test_matches_gguf_reference(type_name):
    rows, cols = 8, 512
    raw = random_raw(type_name, rows, cols)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])
    ours = dequantize(raw, type_name, (rows, cols))
    assert ours.dtype == np.float32 and ours.shape == (rows, cols)
    np.testing.assert_array_equal(ours, np.asarray(ref, np.float32))


def test_q8_0_quantize_round_trip():
    """Values quantised by gguf-py come back within half a quantisation step."""
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    y = dequantize(q, "Q8_0", x.shape)
    step = np.abs(x).reshape(4, 2, 32).max(-1, keepdims=True) / 127
    assert np.all(np.abs(y - x).reshape(4, 2, 32) <= step * 0.51)


def test_unsupported_type_names_type_and_supported_list():
    with pytest.raises(UserError, match=r"unsupported type Q5_0; supported: F32, F16, .*Q4_1"):
        dequantize(np.zeros(22, np.uint8), "Q5_0", (32,), tensor="blk.0.attn_q.weight")


def test_wrong_byte_count_is_user_error():
    with pytest.raises(UserError, match=r"blk.3.ffn_up.weight .*has 33 bytes, expected 34"):
        dequantize(np.zeros(33, np.uint8), "Q8_0", (32,), tensor="blk.3.ffn_up.weight")
