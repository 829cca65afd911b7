"""`attention_backward`: the backward from a saved output and lse, per K/V block.

The property ring attention relies on: with the output and lse of attention over the *whole*
key sequence, the backward of each key block gives that block's dk/dv and a share of dq that
sums to the full gradient.  The op's conformance test runs it for every backend the registry
lists (kernels in interpret mode on CPU; our Mosaic GPU kernels also compiled, on a Hopper GPU),
skipped where the registry says a backend cannot take the case; cuDNN runs on a GPU only (and
test_cudnn_lse.py checks it there), its primitive's shapes are checked here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import api
from pallas_kernels.flash_attention import mosaic_gpu as flash_mgpu
from pallas_kernels.flash_attention import mosaic_tpu as flash_tpu
from pallas_kernels.flash_attention import pallas_triton as flash_triton
from pallas_kernels.flash_attention.api import ATTENTION_BACKWARD
from pallas_kernels.flash_attention.common import AttentionCall
from pallas_kernels.flash_attention.reference import attention_reference
from tests.pallas_kernels.conformance import normals, only, require

CONFIGS = {
    "pallas_triton": flash_triton.Config(16, 16, 16, 16),
    "mosaic_tpu": flash_tpu.Config(16, 16, 16, 16),
}


def _inputs(t=32, s=32, h=4, kh=2, d=16, seed=0, dtype=jnp.float32):
    shapes = [(2, t, h, d), (2, s, kh, d), (2, s, kh, d), (2, t, h, d)]
    return tuple(jnp.asarray(x, dtype) for x in normals(seed, *shapes))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


SEG = jnp.array([[0] * 20 + [1] * 12, [0] * 32])
# (name, options): float32 with packed segments (two key blocks of 16); bf16 without (two key
# blocks of 80, padded to the Mosaic GPU kernels' 128-key tiles)
CASES = [
    ("f32_segments", dict()),
    ("f32_segments_softcap", dict(softcap=5.0)),
    ("f32_causal_segments", dict(causal=True)),
    ("f32_causal_segments_softcap", dict(causal=True, softcap=5.0)),
    ("bf16_gqa2", dict(dtype=jnp.bfloat16)),
]
# The Mosaic TPU backward (TPU interpret mode: slow) runs one case, what ring attention runs
# per key block on a TPU (ring attention itself with it: tests/parallel/test_sequence_attention.py);
# the Mosaic GPU backward's Config variants run in test_mosaic_gpu_blockwise_backward_...
RUNS = {"mosaic_tpu": {"f32_segments_softcap"}}


@pytest.mark.parametrize("impl", ATTENTION_BACKWARD.names)
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_attention_backward_conformance(impl, case):
    kw = dict(dict(CASES)[case])
    dtype = kw.pop("dtype", jnp.float32)
    q, k, v, _ = _inputs(t=96, s=160, d=32, dtype=dtype) if dtype != jnp.float32 else _inputs()
    seg = SEG if dtype == jnp.float32 else None
    require(ATTENTION_BACKWARD, impl, AttentionCall(q, k, v, segment_ids=seg, **kw))
    only(impl, case, RUNS)
    check_blockwise(impl, seg=seg, dtype=dtype, config=CONFIGS.get(impl), **kw)


def check_blockwise(
    impl, *, causal=False, softcap=None, seg=None, dtype=jnp.float32, config=None, interpret=True
):
    """The blocks' backward from the whole row's out/lse (float32 reference on the inputs)
    sums to the whole gradient: float32 inputs with `seg` in two key blocks of 16 (causal: the
    full key length, the other block's keys hidden behind segment id -1, so absolute positions
    stay); bf16 in two key blocks of 80."""
    bf16 = dtype != jnp.float32
    q, k, v, do = _inputs(t=96, s=160, d=32, dtype=dtype) if bf16 else _inputs()
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    kw = dict(causal=causal, segment_ids=seg, softcap=softcap)

    # Under jax.jit: op by op, the reference and the glue around the kernels would dispatch, and
    # compile, one small program per op.  Both key blocks have one shape: one compile for both.
    def reference(q, k, v, do):
        out, lse = attention_reference(q, k, v, return_lse=True, **kw)
        _, vjp = jax.vjp(lambda *a: attention_reference(*a, **kw), q, k, v)
        return out, lse, vjp(do)

    @jax.jit
    def block_backward(k, v, out, lse, kseg):
        return api.attention_backward(
            q,
            k,
            v,
            out,
            lse,
            do,
            causal=causal,
            segment_ids=seg,
            kv_segment_ids=kseg,
            softcap=softcap,
            implementation=impl,
            config=config,
            interpret=interpret,
        )

    with jax.default_matmul_precision("highest"):
        out, lse, (gq, gk, gv) = jax.jit(reference)(up(q), up(k), up(v), up(do))
    block = k.shape[1] // 2
    dq, dks, dvs = 0.0, [], []
    for j in range(2):
        sl = slice(block * j, block * j + block)
        if causal:
            kseg = jnp.asarray(np.where((np.arange(k.shape[1]) // block == j)[None], seg, -1))
            g = block_backward(k, v, out, lse, kseg)
            g = (g[0], g[1][:, sl], g[2][:, sl])
        else:
            g = block_backward(k[:, sl], v[:, sl], out, lse, None if seg is None else seg[:, sl])
        if bf16 and impl != "xla":  # the kernels' gradients are in the inputs' dtype
            assert g[0].dtype == g[1].dtype == jnp.bfloat16
        dq = dq + up(g[0])
        dks.append(up(g[1]))
        dvs.append(up(g[2]))
    tol = 2e-2 if bf16 else 1e-5  # bf16 operands: the conformance tests' bound
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
        lambda *a: cudnn_lse.cudnn_attention_bwd(*a, causal=False), q, k, k, q, lse, q
    )
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
    """Our Hopper backward kernels, each Config variant (GPU interpret mode on CPU, compiled
    on a Hopper GPU), from the whole row's out/lse per key block: bf16, GQA 2."""
    if interpret and backward == "mosaic_gpu":
        pytest.skip("the default variant: in test_attention_backward_conformance")
    check_blockwise(
        "mosaic_gpu",
        dtype=jnp.bfloat16,
        interpret=interpret,
        config=flash_mgpu.Config(backward=backward),
    )


def test_mosaic_gpu_backward_refuses_what_it_lacks():
    q = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
    lse = jnp.zeros((1, 2, 8))
    with pytest.raises(ValueError, match="segment ids"):
        api.attention_backward(
            q,
            q,
            q,
            q,
            lse,
            q,
            segment_ids=jnp.zeros((1, 8), jnp.int32),
            implementation="mosaic_gpu",
        )
    with pytest.raises(ValueError, match="float32"):
        api.attention_backward(
            *(x.astype(jnp.float32) for x in (q, q, q, q)), lse, q, implementation="mosaic_gpu"
        )
