"""The Pallas-Triton GEMV (`pallas_kernels/gemv`) against its pure-jnp reference, in interpret
mode on CPU, plus its benchmark's CPU preset (which checks every config against XLA)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gemv import pallas_triton as gemv_triton
from pallas_kernels.gemv.reference import gemv_reference


@pytest.mark.parametrize("b,n,k,cfg", [
    (1, 40, 64, gemv_triton.Config(block_n=8, block_k=16)),    # rows not a multiple of the block
    (3, 37, 96, gemv_triton.Config(block_n=8, block_k=32)),    # batch padded to 4
    (1, 64, 128, gemv_triton.Config(block_n=16, block_k=128)),  # one contraction step
])
def test_gemv_matches_reference_on_one_layer_of_a_stack(b, n, k, cfg):
    """Layer 1 of a [3, N, K] stack is read; the other layers are NaN, so a read outside it (a
    wrong layer offset, an unmasked row block past N) poisons the output."""
    ks = jax.random.split(jax.random.PRNGKey(n + k), 2)
    x = jax.random.normal(ks[0], (b, k))
    w1 = jax.random.normal(ks[1], (n, k))
    stack = jnp.full((3, n, k), jnp.nan).at[1].set(w1)
    got = jax.jit(lambda lay: gemv_triton.gemv(x, stack, layer=lay, config=cfg,
                                               interpret=True))(1)
    want = gemv_reference(x, w1)
    assert got.shape == (b, n)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    flat = gemv_triton.gemv(x, w1, config=cfg, interpret=True)  # an unstacked weight
    np.testing.assert_allclose(np.asarray(flat), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_gemv_rejects_bad_shapes():
    x = jnp.ones((1, 64))
    with pytest.raises(ValueError, match="features"):
        gemv_triton.gemv(x, jnp.ones((8, 32)), interpret=True)
    with pytest.raises(ValueError, match="block_k"):
        gemv_triton.gemv(x, jnp.ones((8, 64)), config=gemv_triton.Config(block_k=48),
                         interpret=True)


def test_gemv_bench_cpu_preset(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
    import gemv_bench

    assert gemv_bench.main(["--preset", "tiny", "--tp", "1", "--reps", "1", "--inner", "2",
                            "--out", str(tmp_path)]) == 0
    text = (tmp_path / "gemv_bench.md").read_text()
    assert text.count("| pallas bn") == 2 and "xla (cuBLAS)" in text
