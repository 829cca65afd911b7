"""The attention op's shared conformance test: every backend the registry lists for
`attention` against the pure-jnp reference (outputs, the log-sum-exp and dq/dk/dv; the loss also
weights the lse, so its cotangent path is checked), skipped only where the registry says the
backend cannot take the case.  Then what is particular to the Mosaic GPU kernel (its schedules,
its race detector, its CUDA lowering, what it refuses) and the Pallas-Triton lowering.

On CPU the kernels run in interpret mode (Pallas-Triton with `interpret=True`, Mosaic TPU in
TPU interpret mode, Mosaic GPU in GPU interpret mode); tests marked `gpu` run them natively and
are skipped without a GPU.  Shapes are tiny and lengths are not multiples of the 16-row test
blocks, so padding and the masked tail block are exercised.
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
from pallas_kernels.flash_attention.api import ATTENTION
from pallas_kernels.flash_attention.common import AttentionCall
from pallas_kernels.flash_attention.reference import attention_reference
from tests.pallas_kernels.conformance import normals, only, rel, require

F32_TOL = 1e-5
BF16_TOL = 2e-2  # bf16 operands: a 1e-3..1e-2 relative error, with room for bf16 gradients

# small tiles, so that the tiny cases still span several blocks
CONFIGS = {
    "pallas_triton": flash_triton.Config(16, 16, 16, 16),
    "mosaic_tpu": flash_tpu.Config(16, 16, 16, 16),
    "mosaic_gpu": flash_mgpu.Config(bwd=flash_triton.Config(16, 16, 16, 16)),
}


def _inputs(seed, b, t, s, h, kh, d, dtype):
    q, k, v = normals(seed, (b, t, h, d), (b, s, kh, d), (b, s, kh, d))
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def _case(b=2, t=37, s=37, h=4, kh=2, d=16, dtype=jnp.float32, seed=0, **options):
    """A case's (q, k, v) and its attention options."""
    return _inputs(seed, b, t, s, h, kh, d, dtype), options


def _loss(fn, q, k, v, kw):
    out, lse = fn(q, k, v, return_lse=True, **kw)
    w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    lse_term = jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * 0.5)
    return jnp.sum(out.astype(jnp.float32) * w) + lse_term, (out, lse)


def check_flash(impl_fn, grads: bool = True, **case):
    """impl_fn's output, log-sum-exp and (with grads) dq/dk/dv against the reference.  Both
    run under `jax.jit`: op by op, the reference's forward and backward (and the glue around
    the kernels) would dispatch, and compile, one small program per op."""
    (q, k, v), kw = _case(**case)

    def run(fn, q, k, v):
        if not grads:
            return (*fn(q, k, v, return_lse=True, **kw), None)
        (_, (out, lse)), g = jax.value_and_grad(
            lambda *a: _loss(fn, *a, kw), argnums=(0, 1, 2), has_aux=True
        )(q, k, v)
        return out, lse, g

    out, lse, got_grads = jax.jit(lambda *a: run(impl_fn, *a))(q, k, v)
    # Reference in float32 on upcast inputs.
    up = lambda x: x.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):  # on GPU the default would be tf32
        ref_out, ref_lse, ref_grads = jax.jit(lambda *a: run(attention_reference, *a))(
            up(q), up(k), up(v)
        )
    tol = F32_TOL if q.dtype == jnp.float32 else BF16_TOL
    assert out.shape == ref_out.shape and out.dtype == q.dtype
    assert rel(out, ref_out) <= tol
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)  # empty rows: -inf
    assert rel(np.where(finite, lse, 0), np.where(finite, ref_lse, 0)) <= tol
    if grads:
        for name, g, rg in zip("qkv", got_grads, ref_grads):
            assert rel(g, rg) <= tol, f"d{name} rel err {rel(g, rg):.2e} > {tol}"


def _segments(b, t):
    """Packed documents of different lengths per batch row (0 0 0 1 1 ... 2 2)."""
    rows = [
        np.repeat(np.arange(3), [t // 3, t // 3, t - 2 * (t // 3)]),
        np.repeat(np.arange(2), [t // 4, t - t // 4]),
    ]
    return jnp.asarray(np.stack(rows[:b]), jnp.int32)


# (name, kwargs): GQA ratios 1/4/8, odd lengths, every mask kind.
FLASH_CASES = [
    ("full_gqa1", dict(b=1, h=2, kh=2)),
    ("causal_cross_gqa4", dict(b=1, t=20, s=37, h=4, kh=1, causal=True)),
    (
        "window_softcap_gqa8",
        dict(b=1, t=33, s=33, h=8, kh=1, causal=True, sliding_window=7, softcap=2.0, scale=0.3),
    ),
    (
        "segments_causal_gqa4",
        dict(t=37, s=37, h=4, kh=1, causal=True, segment_ids=_segments(2, 37)),
    ),
    (
        "empty_rows",
        dict(
            b=1,
            t=24,
            s=24,
            h=2,
            kh=1,
            segment_ids=_segments(1, 24),
            kv_segment_ids=_segments(1, 24) + 1,
        ),
    ),
    ("bf16_causal", dict(b=1, h=4, kh=2, causal=True, dtype=jnp.bfloat16)),
    (
        "all_masks_gqa4",
        dict(
            b=1,
            t=33,
            s=33,
            h=4,
            kh=1,
            causal=True,
            sliding_window=9,
            softcap=2.0,
            segment_ids=_segments(1, 33),
        ),
    ),
]
# TPU interpret mode is slower (its time grows with the grid: 4 heads, not 8): one case that
# combines every mask kind with GQA; the Pallas-Triton run covers the rest (the two share the
# mask code in `common`).  XLA is the reference itself: one case checks its dispatch.
RUNS = {
    "mosaic_tpu": {"all_masks_gqa4"},
    "pallas_triton": {c[0] for c in FLASH_CASES} - {"all_masks_gqa4"},
    "xla": {"all_masks_gqa4"},
}


@pytest.mark.parametrize("impl", ATTENTION.names)
@pytest.mark.parametrize("case", [c[0] for c in FLASH_CASES])
def test_attention_conformance(impl, case):
    kw = dict(FLASH_CASES)[case]
    (q, k, v), options = _case(**kw)
    require(ATTENTION, impl, AttentionCall(q, k, v, return_lse=True, **options))
    if impl == "cudnn":  # (on a GPU) this loss differentiates through the lse
        pytest.skip("cuDNN's lse carries no gradient; test_cudnn_lse.py checks cuDNN")
    only(impl, case, RUNS)
    check_flash(
        lambda *a, **k: api.attention(
            *a, implementation=impl, interpret=True, config=CONFIGS.get(impl), **k
        ),
        **kw,
    )


def test_api_dispatch_matches_reference():
    q, k, v = _inputs(3, 1, 19, 19, 2, 1, 8, jnp.float32)
    ref = attention_reference(q, k, v, causal=True)
    for impl in ("xla", "auto", "pallas"):
        out = api.attention(q, k, v, causal=True, implementation=impl)
        assert rel(out, ref) <= F32_TOL, impl
    with pytest.raises(ValueError, match="unknown"):
        api.attention(q, k, v, implementation="nope")


# ---- Mosaic GPU (Hopper) ----------------------------------------------------------------------

# Its schedules, in GPU interpret mode (bf16/fp16; no segment ids, window or soft-cap); its
# backward is the Pallas-Triton one unless a Config asks for ours.  Every case runs the
# interpreter's race detector (see test_flash_mosaic_gpu_interpret).  The interpreter's time
# goes into running each program's steps (host callbacks), so the cases keep few programs:
# one head where the case is not about heads.  Head and batch indexing: GQA 8 and 4 below,
# several KV heads with GQA 2 in causal_serial_pingpong, batch 2 in full_serial (forward) and
# in test_attention_backward (both of our backward kernels, GQA 2 over 2 KV heads).
MGPU_CASES = [  # (name, shapes, Config overrides)
    ("full_gqa1_odd", dict(b=1, t=37, s=37, h=2, kh=2), {}),
    (
        "causal_cross_gqa8_scale",
        dict(b=1, t=20, s=90, h=8, kh=1, causal=True, scale=0.3),
        dict(block_k=64),
    ),
    (
        "fp16_cross_three_k_blocks",
        dict(b=1, t=64, s=330, h=1, kh=1, d=64, dtype=jnp.float16),
        dict(slots=3),
    ),
    # the causal schedule over two 128-row query tiles: the second starts with unmasked blocks,
    # then the diagonal's two 64-key blocks, the last one padded; the ring refilled
    ("causal_bk64", dict(b=1, t=200, s=200, h=2, kh=1, d=32, causal=True), dict(block_k=64)),
    # one query tile 130 positions into the keys: two unmasked blocks, then two masked ones
    # (the last padded), the ring refilled
    (
        "causal_serial_pingpong",
        dict(b=1, t=100, s=230, h=4, kh=2, d=32, causal=True),
        dict(block_k=64, overlap=False, pingpong=True),
    ),
    ("full_serial", dict(b=2, t=70, s=200, h=2, kh=1, d=16), dict(overlap=False)),
    # our Mosaic GPU backward (dK/dV and dQ kernels) instead of the Pallas-Triton one; only
    # these cases (and the fused ones) give the backward an lse cotangent.  bwd_causal_gqa4's
    # forward is also the causal schedule over two query tiles with the default 128-key blocks;
    # bwd_causal_q_longer_than_kv's has rows that see no key (out 0, lse -inf)
    (
        "bwd_causal_gqa4",
        dict(b=1, t=130, s=130, h=4, kh=1, d=32, causal=True),
        dict(backward="mosaic_gpu"),
    ),
    (
        "bwd_cross_fp16",
        dict(b=1, t=64, s=150, h=1, kh=1, d=16, dtype=jnp.float16),
        dict(backward="mosaic_gpu"),
    ),
    (
        "bwd_causal_q_longer_than_kv",
        dict(b=1, t=150, s=70, h=1, kh=1, d=16, causal=True),
        dict(backward="mosaic_gpu"),
    ),
    # the fused backward: dQ reduce-added from the dK/dV kernel (interpret mode: per-key-tile
    # slices summed, since it has no reduce stores)
    (
        "fused_bwd_causal_gqa4",
        dict(b=1, t=130, s=130, h=4, kh=1, d=32, causal=True),
        dict(backward="mosaic_gpu_fused"),
    ),
    (
        "fused_bwd_cross_fp16_padded_keys",
        dict(b=1, t=64, s=150, h=1, kh=1, d=32, dtype=jnp.float16),
        dict(backward="mosaic_gpu_fused"),
    ),
    (
        "fused_bwd_causal_q_longer_than_kv",
        dict(b=1, t=150, s=70, h=1, kh=1, d=32, causal=True),
        dict(backward="mosaic_gpu_fused"),
    ),
]


def _mgpu(interpret=True, **overrides):
    cfg = flash_mgpu.Config(bwd=flash_triton.Config(16, 16, 16, 16), **overrides)
    return lambda *a, **k: api.attention(
        *a, implementation="mosaic_gpu", config=cfg, interpret=interpret, **k
    )


# Cases about the forward's schedule whose backward is the Pallas-Triton one: that backward is
# checked by test_attention_backward (Pallas-Triton column) from the forward's output and
# log-sum-exp, both checked here, so these cases skip the gradients (the interpreted Triton
# backward would be most of their time).  Its wiring behind this forward is checked with
# gradients by test_attention_conformance[bf16_causal-mosaic_gpu].
MGPU_FORWARD_ONLY = {
    "full_gqa1_odd",
    "causal_cross_gqa8_scale",
    "fp16_cross_three_k_blocks",
    "causal_bk64",
    "causal_serial_pingpong",
    "full_serial",
}
# Mosaic GPU kernels one case runs: the forward, and our backward's dK/dV + dQ or fused kernel
# (the Pallas-Triton backward is not a Mosaic GPU kernel)
MGPU_KERNELS = {"mosaic_gpu": 3, "mosaic_gpu_fused": 2}


@pytest.fixture
def race_states(monkeypatch):
    """The race detector's state of every Mosaic GPU kernel interpreted during the test, in
    order.  The interpreter makes a fresh state per kernel and keeps only the latest, so
    `get_races()` after a forward and backward would show the last kernel's alone."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    states = []
    make = gpu_callbacks.GPURaceDetectionState

    def record(*args, **kwargs):
        states.append(make(*args, **kwargs))
        return states[-1]

    monkeypatch.setattr(gpu_callbacks, "GPURaceDetectionState", record)
    return states


@pytest.mark.parametrize("case", [c[0] for c in MGPU_CASES])
def test_flash_mosaic_gpu_interpret(case, race_states):
    """Outputs, lse and (but for MGPU_FORWARD_ONLY) gradients against the reference, with the
    interpreter's happens-before race detector over the TMA ring and the barriers on every
    kernel (it also raises on unbalanced barrier phases: a missing wait before reusing a slot
    fails)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    _, kw, overrides = next(c for c in MGPU_CASES if c[0] == case)
    kw = dict(kw)
    kw.setdefault("dtype", jnp.bfloat16)
    grads = case not in MGPU_FORWARD_ONLY
    check_flash(_mgpu(plgpu.InterpretGPUParams(detect_races=True), **overrides), grads, **kw)
    kernels = MGPU_KERNELS.get(overrides.get("backward"), 1) if grads else 1
    assert len(race_states) == kernels
    assert not any(st.races_found for st in race_states)


@pytest.mark.parametrize(
    "d,causal,block_k,overlap",
    [(128, True, 128, True), (64, False, 64, True), (128, True, 64, False), (32, False, 128, True)],
)
def test_flash_mosaic_gpu_lowers_for_cuda(d, causal, block_k, overlap):
    """Pallas -> Mosaic GPU lowering (down to the NVVM-level module inside the custom call) runs
    on CPU for a CUDA target: catches ops and layouts the real GPU path has no rule for, which
    interpret mode would not notice.  head_dim 32: rows of 64 bytes, a smaller shared-memory
    swizzle than 64 and 128 have."""
    q = jax.ShapeDtypeStruct((2, 200, 8, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 200, 2, d), jnp.bfloat16)
    f = lambda q, k, v: _mgpu(False, block_k=block_k, overlap=overlap)(
        q, k, v, causal=causal, return_lse=True
    )
    text = jax.jit(f).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1
    assert "wgmma" in text and "nvvm.mbarrier" in text


@pytest.mark.parametrize("causal,d", [(True, 128), (False, 128), (True, 64), (False, 32)])
@pytest.mark.parametrize("backward,kernels", [("mosaic_gpu", 2), ("mosaic_gpu_fused", 1)])
def test_flash_mosaic_gpu_backward_lowers_for_cuda(causal, d, backward, kernels):
    """The backward kernels through the Mosaic GPU lowering for a CUDA target: dK/dV + dQ, or
    the fused kernel (with its TMA reduce-add, which interpret mode lacks), from a saved output
    and lse (the forward's lowering is test_flash_mosaic_gpu_lowers_for_cuda's; `jax.grad`
    reaches these kernels through the same function, test_flash_mosaic_gpu_interpret).
    head_dim 64 (SmolLM2's) and 32: the fused kernel slices K's columns in half, which must
    fall on whole shared-memory tiles (a native run at 32 found that; interpret mode did not)."""
    q = jax.ShapeDtypeStruct((2, 200, 8, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 200, 2, d), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((2, 8, 200), jnp.float32)
    cfg = flash_mgpu.Config(backward=backward)
    f = lambda q, k, v, out, lse, do: api.attention_backward(
        q,
        k,
        v,
        out,
        lse,
        do,
        causal=causal,
        implementation="mosaic_gpu",
        config=cfg,
        interpret=False,
    )
    text = jax.jit(f).trace(q, kv, kv, q, lse, q).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == kernels


def test_flash_mosaic_gpu_refuses_what_it_lacks():
    """The registry's reasons (what the kernel lacks) and the kernel's Config checks."""
    q, k, v = _inputs(0, 1, 8, 8, 2, 1, 16, jnp.bfloat16)
    mgpu = lambda *a, **kw: api.attention(*a, implementation="mosaic_gpu", **kw)  # noqa: E731
    with pytest.raises(ValueError, match="segment ids, sliding window or softcap"):
        mgpu(q, k, v, sliding_window=4)
    with pytest.raises(
        ValueError, match="bfloat16 or float16.*can: pallas_triton, mosaic_tpu, xla"
    ):
        mgpu(*(x.astype(jnp.float32) for x in (q, k, v)))
    with pytest.raises(ValueError, match="backward='fast'"):
        mgpu(q, k, v, config=flash_mgpu.Config(backward="fast"))
    with pytest.raises(ValueError, match="head_dim in .* got 48"):
        mgpu(
            *(jnp.zeros((1, 8, 2, 48), jnp.bfloat16),) * 3,
            config=flash_mgpu.Config(backward="mosaic_gpu_fused"),
        )
    with pytest.raises(ValueError, match="pingpong only without overlap"):
        mgpu(q, k, v, config=flash_mgpu.Config(pingpong=True))
    with pytest.raises(ValueError, match="shared memory"):
        mgpu(*(jnp.zeros((1, 8, 2, 256), jnp.bfloat16),) * 3)


def test_flash_triton_lowers_for_cuda(monkeypatch):
    """The Pallas -> Triton-IR lowering runs on CPU given a GPU description; this catches
    kernels that only work in interpret mode (unsupported ops, bad block shapes)."""
    from jax._src.pallas.triton import gpu_info
    from jax._src.pallas.triton import pallas_call_registration as reg

    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info", lambda: h100)
    b, t, h, kh, d = 2, 200, 8, 2, 64
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, kh, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
    triton = dict(implementation="pallas_triton", interpret=False)

    def step(q, k, v, seg):
        loss = lambda q, k, v: api.attention(
            q, k, v, causal=True, segment_ids=seg, softcap=20.0, sliding_window=64, **triton
        ).sum()
        dec = api.decode_attention(q[:, 0], k, v, seg[:, 0], **triton)
        mla = api.mla_decode_attention(
            q[:, 0, :, :32],
            q[:, 0, :, 32:],
            k[:, :, 0, :32],
            k[:, :, 0, 32:],
            seg[:, 0],
            scale=0.1,
            **triton,
        )
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v), dec, mla

    text = jax.jit(step).trace(q, kv, kv, seg).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 7  # fwd, dq, dkv, decode, mla + their merges


# ---- native GPU (skipped on CPU) -------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c[0] for c in FLASH_CASES])
def test_flash_attention_native_gpu(case):
    kw = dict(dict(FLASH_CASES)[case])
    kw["d"] = 32
    if kw.get("dtype") != jnp.bfloat16:
        kw["dtype"] = jnp.float32
    check_flash(
        lambda *a, **k: api.attention(
            *a, implementation="pallas_triton", config=flash_triton.Config(32, 32, 32, 32), **k
        ),
        **kw,
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "causal,overrides",
    [
        (True, {}),
        (False, {}),
        (True, dict(block_k=64)),
        (False, dict(block_k=64, slots=4)),
        (True, dict(overlap=False, pingpong=True)),
    ],
)
def test_flash_mosaic_gpu_native(causal, overrides):
    """The Mosaic GPU kernel compiled for the GPU (forward and, through Triton, backward)."""
    check_flash(
        _mgpu(interpret=False, **overrides),
        b=2,
        t=300,
        s=300,
        h=4,
        kh=1,
        d=128,
        dtype=jnp.bfloat16,
        causal=causal,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backward", ["mosaic_gpu", "mosaic_gpu_fused"])
def test_flash_mosaic_gpu_native_mosaic_backward(causal, backward):
    """Our Mosaic GPU backward kernels compiled for the GPU (outputs, lse and gradients)."""
    check_flash(
        _mgpu(interpret=False, backward=backward),
        b=2,
        t=300,
        s=300,
        h=4,
        kh=1,
        d=128,
        dtype=jnp.bfloat16,
        causal=causal,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_flash_mosaic_gpu_native_cudnn_backward(causal):
    """Gradients without the lse: the backward goes through cuDNN (out/lse of our forward)."""
    q, k, v = _inputs(2, 2, 256, 256, 4, 1, 128, jnp.bfloat16)
    w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)
    loss = lambda fn: lambda *a: jnp.sum(fn(*a, causal=causal).astype(jnp.float32) * w)
    got = jax.grad(loss(_mgpu(interpret=False)), argnums=(0, 1, 2))(q, k, v)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    with jax.default_matmul_precision("highest"):
        want = jax.grad(loss(attention_reference), argnums=(0, 1, 2))(*up)
    for name, g, rg in zip("qkv", got, want):
        assert rel(g, rg) <= BF16_TOL, name
