"""cuDNN attention with its log-sum-exp (`flash_attention/cudnn_lse.py`, private JAX API) against
the pure-jnp reference, on a GPU: the forward's output and lse, and the backward from a saved
output and lse, for a whole sequence and per key block as ring attention runs it (each block's
backward given the whole row's output and lse; the blocks' dq sum, and their dk/dv make up, the
whole gradient).  bf16, GQA 4, causal and not.  Skipped without a GPU (tests/conftest.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxturbo.parallel.ring import _merge  # partial results combined by their lse
from pallas_kernels import api
from pallas_kernels.flash_attention import cudnn_lse
from pallas_kernels.flash_attention.reference import attention_reference

pytestmark = pytest.mark.gpu

BF16_TOL = 2e-2  # bf16 operands: the conformance tests' bound (a ~1e-2 relative error)
IMPL = "cudnn"


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "non-finite values in the kernel's result"
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _up(x):
    return x.astype(jnp.float32)


def _inputs(t, s, *, b=2, h=8, kh=2, d=64, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, kh, d), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, kh, d), jnp.float32).astype(jnp.bfloat16)
    do = jax.random.normal(ks[3], (b, t, h, d), jnp.float32).astype(jnp.bfloat16)
    return q, k, v, do


def _reference(q, k, v, do, causal):
    """float32 reference on the bf16-valued inputs: (out, lse, (dq, dk, dv)) of the loss
    sum(out * do) (no lse cotangent, as the saved-lse backward)."""
    with jax.default_matmul_precision("highest"):  # else TF32 on the GPU
        out, lse = attention_reference(_up(q), _up(k), _up(v), causal=causal, return_lse=True)
        _, vjp = jax.vjp(lambda *a: attention_reference(*a, causal=causal), _up(q), _up(k), _up(v))
        return out, lse, vjp(_up(do))


def _forward(q, k, v, causal):
    return jax.jit(
        lambda q, k, v: api.attention(q, k, v, causal=causal, return_lse=True, implementation=IMPL)
    )(q, k, v)


def _backward(q, k, v, out, lse, do, causal):
    return jax.jit(lambda *a: api.attention_backward(*a, causal=causal, implementation=IMPL))(
        q, k, v, out, lse, do
    )


@pytest.mark.parametrize("causal", [False, True])
def test_forward_output_and_lse(causal):
    """The lse is jaxturbo's convention: ln sum_j exp(scale * q.k_j), natural log."""
    q, k, v, do = _inputs(256, 256)
    out, lse = _forward(q, k, v, causal)
    ref_out, ref_lse, _ = _reference(q, k, v, do, causal)
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    assert lse.shape == (2, 8, 256) and lse.dtype == jnp.float32
    assert _rel(out, ref_out) <= BF16_TOL
    assert _rel(lse, ref_lse) <= BF16_TOL


@pytest.mark.parametrize("core", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_from_its_own_forward(causal, core, monkeypatch):
    """Whole sequence: dq/dk/dv from cuDNN's own output and lse (how the Mosaic GPU forward's
    default backward runs), through the wrapper primitive and the core one
    (JAXTURBO_CUDNN_CORE_PRIMITIVE=1)."""
    monkeypatch.setattr(cudnn_lse, "_CORE", core)
    q, k, v, do = _inputs(256, 256, seed=1)
    out, lse = _forward(q, k, v, causal)
    grads = _backward(q, k, v, out, lse, do, causal)
    _, _, ref = _reference(q, k, v, do, causal)
    for name, g, r in zip("qkv", grads, ref):
        assert g.shape == r.shape and g.dtype == jnp.bfloat16, name
        assert _rel(g, r) <= BF16_TOL, (name, _rel(g, r))


@pytest.mark.parametrize("causal", [False, True])
def test_per_block_as_ring_attention(causal):
    """128 queries against 256 keys in two blocks of 128 (for causal the queries are the
    second block's rows: the first key block is fully visible, the second is the diagonal,
    causal with q_len == kv_len).  Forward: the blocks' (out, lse) merged equal the whole.
    Backward: each block's backward from the *whole* row's out/lse; the blocks' dq sum to the
    whole dq, their dk/dv are the whole's slices."""
    q, k, v, do = _inputs(128, 256, seed=2)
    ref_out, ref_lse, (rdq, rdk, rdv) = _reference(q, k, v, do, causal)
    blocks = [(slice(0, 128), False), (slice(128, 256), causal)]

    o = jnp.zeros(q.shape, jnp.float32)
    lse = jnp.full((2, 8, 128), -jnp.inf, jnp.float32)
    for sl, c in blocks:
        ob, lb = _forward(q, k[:, sl], v[:, sl], c)
        o, lse = _merge(o, lse, _up(ob), lb)
    assert _rel(o, ref_out) <= BF16_TOL
    assert _rel(lse, ref_lse) <= BF16_TOL

    dq, dks, dvs = 0.0, [], []
    for sl, c in blocks:  # the saved output as ring attention saves it: merged, float32
        g = _backward(q, k[:, sl], v[:, sl], ref_out, ref_lse, do, c)
        dq = dq + _up(g[0])
        dks.append(_up(g[1]))
        dvs.append(_up(g[2]))
    assert _rel(dq, rdq) <= BF16_TOL
    assert _rel(jnp.concatenate(dks, 1), rdk) <= BF16_TOL
    assert _rel(jnp.concatenate(dvs, 1), rdv) <= BF16_TOL
    # one block alone is not the whole: the sum above is what matches
    assert _rel(_up(g[0]), rdq) > 0.1
