"""`attention_backward`: the backward from a saved output and lse, per K/V block.

The property ring attention relies on: with the output and lse of attention over the *whole*
key sequence, the backward of each key block gives that block's dk/dv and a share of dq that
sums to the full gradient.  Checked for the pure-jnp reference, the Pallas-Triton kernel, the
Mosaic TPU kernel and our Mosaic GPU kernels (interpret mode on CPU; the latter also compiled,
on a Hopper GPU); the cuDNN path is only shape-checked here (on a GPU: test_cudnn_lse.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import api
from pallas_kernels.flash_attention import pallas_triton as flash_triton
from pallas_kernels.flash_attention.reference import attention_reference


def _inputs(t=32, s=32, h=4, kh=2, d=16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (2, t, h, d), jnp.float32)
    k = jax.random.normal(ks[1], (2, s, kh, d), jnp.float32)
    v = jax.random.normal(ks[2], (2, s, kh, d), jnp.float32)
    do = jax.random.normal(ks[3], (2, t, h, d), jnp.float32)
    return q, k, v, do


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("impl", ["xla", "pallas_triton"])
def test_blockwise_backward_sums_to_full_grad(causal, softcap, impl):
    extra = {} if impl == "xla" else dict(config=flash_triton.Config(16, 16, 16, 16))
    _check_blockwise(causal, softcap, impl, extra)


def test_mosaic_tpu_blockwise_backward_sums_to_full_grad():
    """The Mosaic TPU backward (TPU interpret mode: slow, so one case), what ring attention runs
    per key block on a TPU (`attention_backward(implementation="mosaic_tpu")`): each block
    given as its own k/v slice, with its key segment ids, soft-cap on, GQA 2.  Ring attention
    itself with it, causal blocks included: tests/parallel/test_sequence_attention.py."""
    from pallas_kernels.flash_attention import mosaic_tpu as flash_tpu
    _check_blockwise(False, 5.0, "mosaic_tpu", dict(config=flash_tpu.Config(16, 16, 16, 16)))


def _check_blockwise(causal, softcap, impl, extra):
    q, k, v, do = _inputs()
    seg = jnp.array([[0] * 20 + [1] * 12, [0] * 32])
    kw = dict(causal=causal, segment_ids=seg, softcap=softcap)
    out, lse = attention_reference(q, k, v, return_lse=True, **kw)
    _, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, **kw), q, k, v)
    gq, gk, gv = vjp(do)
    # Two key blocks: block j holds keys [16j, 16j+16).
    dq = 0.0
    dks, dvs = [], []
    for j in range(2):
        sl = slice(16 * j, 16 * j + 16)
        if causal:  # keep absolute positions for the causal mask: full-length keys, the
            # other block's keys hidden behind segment id -1
            kseg = jnp.where((jnp.arange(32) // 16 == j)[None], seg, -1)
            g = api.attention_backward(q, k, v, out, lse, do, causal=True, segment_ids=seg,
                                       kv_segment_ids=kseg, softcap=softcap,
                                       implementation=impl, **extra)
            dq = dq + g[0].astype(jnp.float32)
            dks.append(g[1][:, sl])
            dvs.append(g[2][:, sl])
        else:
            g = api.attention_backward(q, k[:, sl], v[:, sl], out, lse, do, segment_ids=seg,
                                       kv_segment_ids=seg[:, sl], softcap=softcap,
                                       implementation=impl, **extra)
            dq = dq + g[0].astype(jnp.float32)
            dks.append(g[1])
            dvs.append(g[2])
    tol = 1e-5
    assert _rel(dq, gq) < tol
    assert _rel(jnp.concatenate(dks, 1), gk) < tol
    assert _rel(jnp.concatenate(dvs, 1), gv) < tol


def test_cudnn_backward_shapes():
    """The cuDNN backward primitive's abstract evaluation (no GPU needed): argument order and
    output shapes, GQA included."""
    from pallas_kernels.flash_attention import cudnn_lse
    sd = jax.ShapeDtypeStruct
    q = sd((1, 128, 8, 64), jnp.bfloat16)
    k = sd((1, 256, 2, 64), jnp.bfloat16)
    lse = sd((1, 8, 128), jnp.float32)
    dq, dk, dv = jax.eval_shape(
        lambda *a: cudnn_lse.cudnn_attention_bwd(*a, causal=False), q, k, k, q, lse, q)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, k.shape)
    assert dq.dtype == dk.dtype == jnp.bfloat16


def test_cudnn_lse_rejects_unsupported():
    q = jnp.zeros((1, 8, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="bf16/fp16"):
        api.attention(q, q, q, return_lse=True, implementation="cudnn")
    with pytest.raises(ValueError, match="bf16/fp16"):
        api.attention_backward(q, q, q, q, jnp.zeros((1, 2, 8)), q, implementation="cudnn")


@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("backward", ["mosaic_gpu", "mosaic_gpu_fused"])
def test_mosaic_gpu_blockwise_backward_sums_to_full_grad(backward, interpret):
    """Our Hopper backward kernels (GPU interpret mode on CPU, compiled on a Hopper GPU) from
    the whole row's out/lse, per key block: bf16, GQA 2, two key blocks of 80 (padded to the
    kernels' 128-key tiles)."""
    from pallas_kernels.flash_attention import mosaic_gpu as flash_mgpu
    q, k, v, do = _inputs(t=96, s=160, h=4, kh=2, d=32)
    q, k, v, do = (x.astype(jnp.bfloat16) for x in (q, k, v, do))
    up = lambda x: x.astype(jnp.float32)
    out, lse = attention_reference(up(q), up(k), up(v), return_lse=True)
    with jax.default_matmul_precision("highest"):
        _, vjp = jax.vjp(lambda *a: attention_reference(*a), up(q), up(k), up(v))
        gq, gk, gv = vjp(up(do))
    dq, dks, dvs = 0.0, [], []
    for j in range(2):
        sl = slice(80 * j, 80 * j + 80)
        g = api.attention_backward(q, k[:, sl], v[:, sl], out, lse, do,
                                   implementation="mosaic_gpu", interpret=interpret,
                                   config=flash_mgpu.Config(backward=backward))
        assert g[0].dtype == g[1].dtype == jnp.bfloat16
        dq = dq + up(g[0])
        dks.append(up(g[1]))
        dvs.append(up(g[2]))
    tol = 2e-2  # bf16 operands (the conformance tests' bound)
    assert _rel(dq, gq) < tol
    assert _rel(jnp.concatenate(dks, 1), gk) < tol
    assert _rel(jnp.concatenate(dvs, 1), gv) < tol


def test_mosaic_gpu_backward_refuses_what_it_lacks():
    q = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
    lse = jnp.zeros((1, 2, 8))
    with pytest.raises(ValueError, match="segment ids"):
        api.attention_backward(q, q, q, q, lse, q, segment_ids=jnp.zeros((1, 8), jnp.int32),
                               implementation="mosaic_gpu")
    with pytest.raises(ValueError, match="float32"):
        api.attention_backward(*(x.astype(jnp.float32) for x in (q, q, q, q)), lse, q,
                               implementation="mosaic_gpu")
