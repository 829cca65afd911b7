"""Shared conformance tests: every attention implementation against the pure-jnp references.

On CPU the kernels run in interpret mode (Pallas-Triton with `interpret=True`, Mosaic TPU with
TPU interpret mode); tests marked `gpu` run the Pallas-Triton kernels natively and are skipped
without a GPU.  Outputs, the log-sum-exp and dq/dk/dv are compared (the loss also weights the
lse, so its cotangent path is checked).  Shapes are tiny and lengths are not multiples of the
16-row test blocks, so padding and the masked tail block are exercised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import api
from pallas_kernels.decode_attention import mosaic_tpu as decode_tpu
from pallas_kernels.decode_attention import pallas_triton as decode_triton
from pallas_kernels.decode_attention.reference import (decode_append_reference,
                                                       decode_attention_reference,
                                                       mla_decode_reference)
from pallas_kernels.flash_attention import mosaic_gpu as flash_mgpu
from pallas_kernels.flash_attention import mosaic_tpu as flash_tpu
from pallas_kernels.flash_attention import pallas_triton as flash_triton
from pallas_kernels.flash_attention.reference import attention_reference

F32_TOL = 1e-5
BF16_TOL = 2e-2  # bf16 operands: METHOD.md's 1e-3..1e-2 band, with room for bf16 gradients

IMPLS = {
    "pallas_triton": lambda **kw: flash_triton.flash_attention(
        config=flash_triton.Config(16, 16, 16, 16), **kw),
    "mosaic_tpu": lambda **kw: flash_tpu.flash_attention(
        config=flash_tpu.Config(16, 16, 16, 16), **kw),
}


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert not np.isnan(a).any(), "NaN in kernel output"
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _inputs(seed, b, t, s, h, kh, d, dtype):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, kh, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, kh, d), jnp.float32).astype(dtype)
    return q, k, v


def _loss(fn, q, k, v, kw):
    out, lse = fn(q, k, v, return_lse=True, **kw)
    w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    lse_term = jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * 0.5)
    return jnp.sum(out.astype(jnp.float32) * w) + lse_term, (out, lse)


def check_flash(impl_fn, *, b=2, t=37, s=37, h=4, kh=2, d=16, dtype=jnp.float32, seed=0, **kw):
    q, k, v = _inputs(seed, b, t, s, h, kh, d, dtype)
    grad = lambda fn: jax.value_and_grad(lambda *a: _loss(fn, *a, kw), argnums=(0, 1, 2),
                                         has_aux=True)(q, k, v)
    (_, (out, lse)), grads = grad(impl_fn)
    # Reference in float32 on upcast inputs.
    up = lambda x: x.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):  # on GPU the default would be tf32
        (_, (ref_out, ref_lse)), ref_grads = jax.value_and_grad(
            lambda *a: _loss(attention_reference, *a, kw), argnums=(0, 1, 2), has_aux=True)(
                up(q), up(k), up(v))
    tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
    assert out.shape == ref_out.shape and out.dtype == dtype
    assert _rel(out, ref_out) <= tol
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)  # empty rows: -inf
    assert _rel(np.where(finite, lse, 0), np.where(finite, ref_lse, 0)) <= tol
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert _rel(g, rg) <= tol, f"d{name} rel err {_rel(g, rg):.2e} > {tol}"


def _segments(b, t):
    """Packed documents of different lengths per batch row (0 0 0 1 1 ... 2 2)."""
    rows = [np.repeat(np.arange(3), [t // 3, t // 3, t - 2 * (t // 3)]),
            np.repeat(np.arange(2), [t // 4, t - t // 4])]
    return jnp.asarray(np.stack(rows[:b]), jnp.int32)


# (name, kwargs): GQA ratios 1/4/8, odd lengths, every mask kind.
FLASH_CASES = [
    ("full_gqa1", dict(b=1, h=2, kh=2)),
    ("causal_cross_gqa4", dict(b=1, t=20, s=37, h=4, kh=1, causal=True)),
    ("window_softcap_gqa8", dict(b=1, t=33, s=33, h=8, kh=1, causal=True, sliding_window=7,
                                 softcap=2.0, scale=0.3)),
    ("segments_causal_gqa4", dict(t=37, s=37, h=4, kh=1, causal=True,
                                  segment_ids=_segments(2, 37))),
    ("empty_rows", dict(b=1, t=24, s=24, h=2, kh=1, segment_ids=_segments(1, 24),
                        kv_segment_ids=_segments(1, 24) + 1)),
    ("bf16_causal", dict(b=1, h=4, kh=2, causal=True, dtype=jnp.bfloat16)),
    ("all_masks_gqa8", dict(b=1, t=33, s=33, h=8, kh=1, causal=True, sliding_window=9,
                            softcap=2.0, segment_ids=_segments(1, 33))),
]
# TPU interpret mode is slower: one case that combines every mask kind with GQA 8; the
# Pallas-Triton run covers the rest (the two share the mask code in `common`).
TPU_CASES = {"all_masks_gqa8"}
TRITON_CASES = {c[0] for c in FLASH_CASES} - TPU_CASES


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", [c[0] for c in FLASH_CASES])
def test_flash_attention_interpret(impl, case):
    if case not in (TPU_CASES if impl == "mosaic_tpu" else TRITON_CASES):
        pytest.skip("covered by the other implementation's run (interpret mode is slow)")
    kw = dict(dict(FLASH_CASES)[case])
    check_flash(lambda *a, **k: IMPLS[impl](q=a[0], k=a[1], v=a[2], interpret=True, **k), **kw)


# The Mosaic GPU (Hopper) forward, in GPU interpret mode: bf16/fp16 only, and no segment ids,
# window or soft-cap in its first version; its backward is the Pallas-Triton one.
# (name, kwargs, warpgroups per program)
MGPU_CASES = [  # (name, shapes, Config overrides)
    ("full_gqa1_odd", dict(b=1, t=37, s=37, h=2, kh=2), {}),
    ("causal_gqa4_two_q_blocks", dict(b=2, t=200, s=200, h=4, kh=1, d=32, causal=True), {}),
    ("causal_cross_gqa8_scale", dict(b=1, t=20, s=90, h=8, kh=1, causal=True, scale=0.3),
     dict(block_k=64)),
    ("fp16_cross_three_k_blocks", dict(b=1, t=64, s=330, h=2, kh=1, d=64, dtype=jnp.float16),
     dict(slots=3)),
    ("causal_bk64", dict(b=1, t=200, s=200, h=4, kh=1, d=32, causal=True), dict(block_k=64)),
    ("causal_serial_pingpong", dict(b=1, t=200, s=330, h=4, kh=2, d=32, causal=True),
     dict(block_k=64, overlap=False, pingpong=True)),
    ("full_serial", dict(b=2, t=70, s=200, h=2, kh=1, d=16), dict(overlap=False)),
    # our Mosaic GPU backward (dK/dV and dQ kernels) instead of the Pallas-Triton one
    ("bwd_causal_gqa4", dict(b=2, t=130, s=130, h=4, kh=1, d=32, causal=True),
     dict(backward="mosaic_gpu")),
    ("bwd_cross_fp16", dict(b=1, t=64, s=150, h=2, kh=2, d=16, dtype=jnp.float16),
     dict(backward="mosaic_gpu")),
    ("bwd_causal_q_longer_than_kv", dict(b=1, t=150, s=70, h=2, kh=1, d=16, causal=True),
     dict(backward="mosaic_gpu")),
    ("causal_q_longer_than_kv", dict(b=1, t=150, s=70, h=2, kh=2, d=16, causal=True), {}),
    # the fused backward: dQ reduce-added from the dK/dV kernel (interpret mode: per-key-tile
    # slices summed, since it has no reduce stores)
    ("fused_bwd_causal_gqa4", dict(b=2, t=130, s=130, h=4, kh=1, d=32, causal=True),
     dict(backward="mosaic_gpu_fused")),
    ("fused_bwd_cross_fp16_padded_keys", dict(b=1, t=64, s=150, h=2, kh=2, d=32,
                                              dtype=jnp.float16),
     dict(backward="mosaic_gpu_fused")),
    ("fused_bwd_causal_q_longer_than_kv", dict(b=1, t=150, s=70, h=2, kh=1, d=32, causal=True),
     dict(backward="mosaic_gpu_fused")),
]


def _mgpu(interpret=True, **overrides):
    cfg = flash_mgpu.Config(bwd=flash_triton.Config(16, 16, 16, 16), **overrides)
    return lambda *a, **k: flash_mgpu.flash_attention(*a, config=cfg, interpret=interpret, **k)


@pytest.mark.parametrize("case", [c[0] for c in MGPU_CASES])
def test_flash_mosaic_gpu_interpret(case):
    _, kw, overrides = next(c for c in MGPU_CASES if c[0] == case)
    kw = dict(kw)
    kw.setdefault("dtype", jnp.bfloat16)
    check_flash(_mgpu(**overrides), **kw)


@pytest.mark.parametrize("pingpong,overlap", [(False, True), (True, False)])
def test_flash_mosaic_gpu_has_no_races(pingpong, overlap):
    """The interpreter's happens-before race detector over the TMA ring and the barriers (it
    also raises on unbalanced barrier phases: a missing wait before reusing a slot fails)."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    import jax.experimental.pallas.mosaic_gpu as plgpu
    q, k, v = _inputs(5, 1, 150, 300, 2, 1, 16, jnp.bfloat16)
    out = _mgpu(plgpu.InterpretGPUParams(detect_races=True), block_k=64,
                pingpong=pingpong, overlap=overlap)(q, k, v, causal=True)
    assert not interpret_pallas_call.get_races().races_found
    assert _rel(out, attention_reference(q, k, v, causal=True)) <= BF16_TOL


@pytest.mark.parametrize("d,causal,block_k,overlap", [(128, True, 128, True), (64, False, 64, True),
                                                      (128, True, 64, False)])
def test_flash_mosaic_gpu_lowers_for_cuda(d, causal, block_k, overlap):
    """Pallas -> Mosaic GPU lowering (down to the NVVM-level module inside the custom call) runs
    on CPU for a CUDA target: catches ops and layouts the real GPU path has no rule for, which
    interpret mode would not notice."""
    q = jax.ShapeDtypeStruct((2, 200, 8, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 200, 2, d), jnp.bfloat16)
    cfg = flash_mgpu.Config(block_k=block_k, overlap=overlap)
    f = lambda q, k, v: flash_mgpu.flash_attention(q, k, v, causal=causal, return_lse=True,
                                                   config=cfg)
    text = jax.jit(f).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1
    assert "wgmma" in text and "nvvm.mbarrier" in text


@pytest.mark.parametrize("causal,d", [(True, 128), (False, 128), (True, 64), (False, 32)])
@pytest.mark.parametrize("backward,kernels", [("mosaic_gpu", 3), ("mosaic_gpu_fused", 2)])
def test_flash_mosaic_gpu_backward_lowers_for_cuda(causal, d, backward, kernels):
    """The backward kernels through the Mosaic GPU lowering for a CUDA target: forward + dK/dV
    + dQ, or forward + the fused kernel (with its TMA reduce-add, which interpret mode lacks).
    head_dim 64 (SmolLM2's) and 32: the fused kernel slices K's columns in half, which must
    fall on whole shared-memory tiles (a native run at 32 found that; interpret mode did not)."""
    q = jax.ShapeDtypeStruct((2, 200, 8, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 200, 2, d), jnp.bfloat16)
    cfg = flash_mgpu.Config(backward=backward)
    f = lambda q, k, v: jax.grad(lambda q, k, v: flash_mgpu.flash_attention(
        q, k, v, causal=causal, config=cfg).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)
    text = jax.jit(f).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == kernels


@pytest.mark.parametrize("backward", ["mosaic_gpu", "mosaic_gpu_fused"])
def test_flash_mosaic_gpu_backward_has_no_races(backward):
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    import jax.experimental.pallas.mosaic_gpu as plgpu
    q, k, v = _inputs(6, 1, 130, 130, 2, 1, 32, jnp.bfloat16)
    fn = _mgpu(plgpu.InterpretGPUParams(detect_races=True), backward=backward)
    loss = lambda fn: lambda *a: fn(*a, causal=True).astype(jnp.float32).sum()
    got = jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
    assert not interpret_pallas_call.get_races().races_found
    want = jax.grad(loss(attention_reference), argnums=(0, 1, 2))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    for g, w in zip(got, want):
        assert _rel(g, w) <= BF16_TOL


def test_flash_mosaic_gpu_refuses_what_it_lacks():
    q, k, v = _inputs(0, 1, 8, 8, 2, 1, 16, jnp.bfloat16)
    with pytest.raises(ValueError, match="segment ids, sliding window or softcap"):
        flash_mgpu.flash_attention(q, k, v, sliding_window=4, interpret=True)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        flash_mgpu.flash_attention(*(x.astype(jnp.float32) for x in (q, k, v)), interpret=True)
    with pytest.raises(ValueError, match="backward='fast'"):
        flash_mgpu.flash_attention(q, k, v, config=flash_mgpu.Config(backward="fast"))
    with pytest.raises(ValueError, match="head_dim in .* got 48"):
        flash_mgpu.flash_attention(*(jnp.zeros((1, 8, 2, 48), jnp.bfloat16),) * 3,
                                   config=flash_mgpu.Config(backward="mosaic_gpu_fused"))
    with pytest.raises(ValueError, match="pingpong only without overlap"):
        flash_mgpu.flash_attention(q, k, v, config=flash_mgpu.Config(pingpong=True))
    with pytest.raises(ValueError, match="shared memory"):
        flash_mgpu.flash_attention(*(jnp.zeros((1, 8, 2, 256), jnp.bfloat16),) * 3)


def test_pallas_and_auto_pick_mosaic_gpu_on_hopper(monkeypatch):
    """Dispatch only (the kernels themselves are checked above): on a Hopper GPU "auto" and
    "pallas" take the Mosaic GPU kernel where it covers the call, else what covers it."""
    from pallas_kernels import api
    q, k, _ = _inputs(0, 1, 8, 8, 2, 1, 64, jnp.bfloat16)
    seg = jnp.zeros((1, 8), jnp.int32)
    monkeypatch.setattr(api, "_platform", lambda: "gpu")
    for hopper, plain, packed, fp32 in [(True, "mosaic_gpu", "pallas_triton", "pallas_triton"),
                                        (False, "cudnn", "pallas_triton", "pallas_triton")]:
        monkeypatch.setattr(api, "_is_hopper", lambda: hopper)
        pick = lambda q, k, **kw: api._auto_attention(
            q, segment_ids=kw.get("segment_ids"), softcap=None, return_lse=False,
            mosaic_gpu_ok=api.mosaic_gpu_covers(q, k, **kw))
        assert pick(q, k) == plain
        assert pick(q, k, segment_ids=seg) == packed
        assert pick(q.astype(jnp.float32), k.astype(jnp.float32)) == fp32
        assert api._resolve_pallas("pallas", api.mosaic_gpu_covers(q, k)) == (
            "mosaic_gpu" if hopper else "pallas_triton")
    big = jnp.zeros((1, 8, 2, 256), jnp.bfloat16)  # head_dim 256 does not fit shared memory
    assert not api.mosaic_gpu_covers(big, big)


def test_api_dispatch_matches_reference():
    q, k, v = _inputs(3, 1, 19, 19, 2, 1, 8, jnp.float32)
    ref = attention_reference(q, k, v, causal=True)
    for impl in ("xla", "auto", "pallas"):
        out = api.attention(q, k, v, causal=True, implementation=impl)
        assert _rel(out, ref) <= F32_TOL, impl
    with pytest.raises(ValueError, match="unknown"):
        api.attention(q, k, v, implementation="nope")


def test_flash_triton_lowers_for_cuda(monkeypatch):
    """The Pallas -> Triton-IR lowering runs on CPU given a GPU description; this catches
    kernels that only work in interpret mode (unsupported ops, bad block shapes)."""
    from jax._src.pallas.triton import gpu_info, pallas_call_registration as reg
    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info", lambda: h100)
    b, t, h, kh, d = 2, 200, 8, 2, 64
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, kh, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def step(q, k, v, seg):
        loss = lambda q, k, v: flash_triton.flash_attention(
            q, k, v, causal=True, segment_ids=seg, softcap=20.0, sliding_window=64).sum()
        dec = decode_triton.decode_attention(q[:, 0], k, v, seg[:, 0])
        mla = decode_triton.mla_decode_attention(q[:, 0, :, :32], q[:, 0, :, 32:], k[:, :, 0, :32],
                                                 k[:, :, 0, 32:], seg[:, 0], scale=0.1)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v), dec, mla

    text = jax.jit(step).trace(q, kv, kv, seg).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 7  # fwd, dq, dkv, decode, mla + their merges


# ---- decode -----------------------------------------------------------------------------------

DECODE_IMPLS = {
    "pallas_triton": lambda *a, **kw: decode_triton.decode_attention(
        *a, config=decode_triton.Config(block_k=16, num_splits=3), interpret=True, **kw),
    "pallas_triton_jnp_merge": lambda *a, **kw: decode_triton.decode_attention(
        *a, config=decode_triton.Config(block_k=16, num_splits=3, merge="xla"), interpret=True,
        **kw),
    "mosaic_tpu": lambda *a, **kw: decode_tpu.decode_attention(
        *a, config=decode_tpu.Config(block_k=16), interpret=True, **kw),
}
MLA_IMPLS = {
    "pallas_triton": lambda *a, **kw: decode_triton.mla_decode_attention(
        *a, config=decode_triton.Config(block_k=16, num_splits=3), interpret=True, **kw),
    "mosaic_tpu": lambda *a, **kw: decode_tpu.mla_decode_attention(
        *a, config=decode_tpu.Config(block_k=16), interpret=True, **kw),
}


@pytest.mark.parametrize("impl", list(DECODE_IMPLS))
@pytest.mark.parametrize("h,kh,extra", [(4, 4, {}), (8, 2, dict(softcap=3.0)),
                                        (8, 1, dict(sliding_window=9))])
def test_decode_attention_interpret(impl, h, kh, extra):
    if impl == "mosaic_tpu" and h == 4:
        pytest.skip("GQA 1 is covered by the Pallas-Triton run")
    b, s, d = 4, 45, 16
    ks = jax.random.split(jax.random.PRNGKey(h + kh), 3)
    q = jax.random.normal(ks[0], (b, h, d))
    kc = jax.random.normal(ks[1], (b, s, kh, d))
    vc = jax.random.normal(ks[2], (b, s, kh, d))
    lengths = jnp.array([45, 1, 17, 32], jnp.int32)  # full, one slot, mid-block, block edge
    out = DECODE_IMPLS[impl](q, kc, vc, lengths, **extra)
    ref = decode_attention_reference(q, kc, vc, lengths, **extra)
    assert out.shape == (b, h, d)
    assert _rel(out, ref) <= F32_TOL


@pytest.mark.parametrize("impl", list(DECODE_IMPLS))
@pytest.mark.parametrize("s", [45, 48])  # a last block that overhangs the cache, and none
def test_decode_attention_reads_one_layer_of_a_stacked_cache(impl, s):
    """layer=: the kernel reads layer 1 of an [L, B, S, K, D] cache in place.  The other layers
    are NaN, so a read outside layer 1 (a wrong index, an unmasked overhanging block of the last
    sequence) poisons the output; the layer index is traced, as inside the model's scan."""
    b, h, kh, d, n_layers = 3, 8, 2, 16, 3
    ks = jax.random.split(jax.random.PRNGKey(s), 3)
    q = jax.random.normal(ks[0], (b, h, d))
    kc = jax.random.normal(ks[1], (b, s, kh, d))
    vc = jax.random.normal(ks[2], (b, s, kh, d))
    nan = jnp.full((n_layers, b, s, kh, d), jnp.nan)
    k_all, v_all = nan.at[1].set(kc), nan.at[1].set(vc)
    lengths = jnp.array([1, 17, s], jnp.int32)  # the last sequence's overhang is layer 2's
    out = jax.jit(lambda lay: DECODE_IMPLS[impl](q, k_all, v_all, lengths, layer=lay))(1)
    ref = decode_attention_reference(q, kc, vc, lengths)
    assert _rel(out, ref) <= F32_TOL


def test_decode_attention_stacked_cache_is_not_copied():
    """Compiled for a GPU (the Pallas-Triton kernel), the stacked cache reaches the kernel
    as it is: no slice of it, and no copy, in the lowered module."""
    from jax._src.pallas.triton import gpu_info, pallas_call_registration as reg
    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reg.gpu_info_lib, "get_gpu_info", lambda: h100)
        q = jax.ShapeDtypeStruct((2, 8, 64), jnp.bfloat16)
        cache = jax.ShapeDtypeStruct((4, 2, 256, 2, 64), jnp.bfloat16)
        lens = jax.ShapeDtypeStruct((2,), jnp.int32)
        step = lambda q, k, v, n, lay: decode_triton.decode_attention(q, k, v, n, layer=lay)  # noqa: E731
        lowered = jax.jit(step).trace(q, cache, cache, lens, jax.ShapeDtypeStruct((), jnp.int32)
                                      ).lower(lowering_platforms=("cuda",))
    ops = [op for f in lowered.compiler_ir("stablehlo").body.operations
           for region in f.regions for block in region.blocks for op in block.operations]
    whole = "tensor<4x2x256x2x64xbf16>"
    calls = [op for op in ops if op.operation.name == "stablehlo.custom_call"
             and "xla.gpu.triton" in str(op.attributes["call_target_name"])]
    assert len(calls) == 2  # the chunks' kernel and their merge
    assert [str(x.type) for x in calls[0].operands].count(whole) == 2  # k and v, whole
    # nothing reads the cache but the kernel (no slice, no copy)
    assert all(op is calls[0] for op in ops for x in op.operands if str(x.type) == whole)


def test_decode_merge_kernel_ignores_padding_chunks():
    """The merge kernel reads a power-of-two chunk axis whose padding the chunks' kernel never
    writes: NaN there must not reach the output; empty chunks (lse -inf) weigh nothing."""
    b, kh, splits, gp, d = 2, 3, 5, 16, 64
    ks = jax.random.split(jax.random.PRNGKey(4), 2)
    o = jax.random.normal(ks[0], (b, kh, 8, gp, d))
    lse = jax.random.normal(ks[1], (b, kh, 8, gp)).at[:, :, 1].set(-jnp.inf)
    o, lse = o.at[:, :, splits:].set(jnp.nan), lse.at[:, :, splits:].set(jnp.nan)
    got = decode_triton._merge_chunks(o, lse, splits, jnp.float32, decode_triton.Config(),
                                      interpret=True)
    want = decode_triton._merge(o[:, :, :splits], lse[:, :, :splits], axis=2)
    assert _rel(got, want) <= F32_TOL


def _append_inputs(seed, b, h, kh, s, d, n_layers, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (b, h, d))
    k_new, v_new = (jax.random.normal(k, (b, kh, d)) for k in ks[1:3])
    # NaN in the other layers: a read or write outside the attended layer shows
    nan = jnp.full((n_layers, b, s, kh, d), jnp.nan, dtype)
    k_all = nan.at[1].set(jax.random.normal(ks[3], (b, s, kh, d)).astype(dtype))
    v_all = nan.at[1].set(jax.random.normal(ks[4], (b, s, kh, d)).astype(dtype))
    ang = jnp.tile(jax.random.uniform(ks[5], (b, d // 2), maxval=6.0), (1, 2))
    return q, k_new, v_new, k_all, v_all, (jnp.cos(ang), jnp.sin(ang))


# an RMSNorm factor for the 4 rows of test_decode_append_fused_kernel: (sum of squares, n, eps)
_RMS = ((3.0, 50.0, 0.25, 8.0), 16, 1e-5)


@pytest.mark.parametrize("extra", [{}, dict(softcap=3.0), dict(sliding_window=9),
                                   dict(rms=_RMS)])
@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16])
def test_decode_append_fused_kernel(extra, cache_dtype):
    """Pallas-Triton's one-kernel decode step (key rotated, key and value written in place,
    the new token attended from registers) equals writing with XLA and then attending: the
    output, the written slot, and every other slot and layer untouched.  Slots: the last of the
    cache, an empty cache, a chunk's first slot, a block's last slot (chunks of 16 here)."""
    b, h, kh, s, d = 4, 8, 2, 45, 16
    q, k_new, v_new, k_all, v_all, rope = _append_inputs(1, b, h, kh, s, d, 3, cache_dtype)
    lengths = jnp.array([44, 0, 16, 31], jnp.int32)
    if "rms" in extra:
        extra = dict(rms=(jnp.array(_RMS[0], jnp.float32), *_RMS[1:]))
    cfg = decode_triton.Config(block_k=16, num_splits=3)
    out, kc, vc = jax.jit(lambda lay: decode_triton.decode_attention_append(
        q, k_new, v_new, k_all, v_all, lengths, layer=lay, rope=rope, config=cfg,
        interpret=True, **extra))(1)
    ref, rk, rv = decode_append_reference(q, k_new, v_new, k_all[1], v_all[1], lengths,
                                          rope=rope, **extra)
    # (a bf16 cache: the kernel's p @ V runs in bf16, the reference's in float32)
    assert _rel(out, ref) <= (F32_TOL if cache_dtype == jnp.float32 else BF16_TOL)
    written = np.zeros((b, s), bool)
    written[np.arange(b), np.asarray(lengths)] = True
    # the rotation rounds like XLA's up to one unit in the last place (operation order)
    ulp = 2.0 ** -7 if cache_dtype == jnp.bfloat16 else 1e-6
    for got, want, old in ((kc, rk, k_all), (vc, rv, v_all)):
        got, want, old = (np.asarray(x, np.float32) for x in (got[1], want, old[1]))
        np.testing.assert_allclose(got[written], want[written], rtol=ulp, atol=ulp)
        np.testing.assert_array_equal(got[~written], old[~written])  # nothing else written
    assert np.isnan(np.asarray(kc[::2], np.float32)).all()
    assert np.isnan(np.asarray(vc[::2], np.float32)).all()


@pytest.mark.parametrize("impl", ["xla", "pallas_triton", "mosaic_tpu"])
def test_decode_append_api(impl, monkeypatch):
    """`api.decode_attention_append` for every backend (Mosaic TPU and XLA: the cache written
    by XLA, then attended), an unstacked cache, and Pallas-Triton with the fused kernel off."""
    b, h, kh, s, d = 2, 4, 2, 40, 16
    q, k_new, v_new, k_all, v_all, rope = _append_inputs(2, b, h, kh, s, d, 3)
    lengths = jnp.array([7, 39], jnp.int32)
    ref = decode_append_reference(q, k_new, v_new, k_all[1], v_all[1], lengths, rope=rope)
    fused = [True, False] if impl == "pallas_triton" else [True]
    for on in fused:
        monkeypatch.setattr(api, "FUSED_APPEND", on)
        got = api.decode_attention_append(q, k_new, v_new, k_all, v_all, lengths, layer=1,
                                          rope=rope, implementation=impl, interpret=True)
        assert _rel(got[0], ref[0]) <= F32_TOL, (impl, on)
        assert _rel(got[1][1], ref[1]) <= F32_TOL and _rel(got[2][1], ref[2]) <= F32_TOL
    flat = api.decode_attention_append(q, k_new, v_new, k_all[1], v_all[1], lengths, rope=rope,
                                       implementation=impl, interpret=True)
    assert flat[1].shape == (b, s, kh, d) and _rel(flat[0], ref[0]) <= F32_TOL
    with pytest.raises(ValueError, match="unknown"):
        api.decode_attention_append(q, k_new, v_new, k_all, v_all, lengths, layer=1,
                                    implementation="cudnn")


@pytest.mark.parametrize("impl", ["xla", "pallas_triton"])
def test_decode_append_reads_k_and_v_at_head_offsets(impl):
    """k and v given as one fused projection's output [B, Hq + 2K, D] with head offsets (the
    kernel reads them in place) equal k and v given apart; a window off the array is refused."""
    b, h, kh, s, d = 2, 4, 2, 40, 16
    q, k_new, v_new, k_all, v_all, rope = _append_inputs(6, b, h, kh, s, d, 3)
    lengths = jnp.array([3, 20], jnp.int32)
    packed = jnp.concatenate([jnp.full((b, 3, d), jnp.nan), k_new, v_new], axis=1)
    kw = dict(layer=1, rope=rope, implementation=impl, interpret=True)
    want = api.decode_attention_append(q, k_new, v_new, k_all, v_all, lengths, **kw)
    got = api.decode_attention_append(q, packed, packed, k_all, v_all, lengths,
                                      k_head_offset=3, v_head_offset=3 + kh, **kw)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    with pytest.raises(ValueError, match="no 2 heads at offset 6"):
        api.decode_attention_append(q, packed, packed, k_all, v_all, lengths,
                                    k_head_offset=6, v_head_offset=5, **kw)
    with pytest.raises(ValueError, match="7 heads but the cache 2"):
        api.decode_attention_append(q, packed, v_new, k_all, v_all, lengths, **kw)


@pytest.mark.parametrize("impl", ["xla", "pallas_triton"])
def test_decode_append_scales_by_the_rms_factor(impl):
    """rms = (sum of squares, n, eps): k and v read from a fused projection's output at head
    offsets and scaled by rsqrt(ss / n + eps) equal the pre-scaled k and v given apart."""
    b, h, kh, s, d = 2, 4, 2, 40, 16
    q, k_new, v_new, k_all, v_all, rope = _append_inputs(8, b, h, kh, s, d, 3)
    lengths = jnp.array([5, 33], jnp.int32)
    ss = jnp.array([40.0, 2.0])
    f = jax.lax.rsqrt(ss / 64 + 1e-6)[:, None, None]
    packed = jnp.concatenate([jnp.full((b, 3, d), jnp.nan), k_new, v_new], axis=1)
    kw = dict(layer=1, rope=rope, implementation=impl, interpret=True)
    want = api.decode_attention_append(q, k_new * f, v_new * f, k_all, v_all, lengths, **kw)
    got = api.decode_attention_append(q, packed, packed, k_all, v_all, lengths, k_head_offset=3,
                                      v_head_offset=3 + kh, rms=(ss, 64, 1e-6), **kw)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "pallas_triton"])
@pytest.mark.parametrize("in_kernel", [False, True])
def test_decode_append_takes_a_raw_query(impl, in_kernel, monkeypatch):
    """q_heads: q, k and v all read from one fused projection's raw output [B, Hq + 2K, D]; the
    queries scaled (rms) and rotated by the step (in the Pallas-Triton kernel when
    ROTATE_Q_IN_KERNEL, else by XLA) equal queries prepared beforehand; bad counts refused."""
    monkeypatch.setattr(api, "ROTATE_Q_IN_KERNEL", in_kernel)
    b, h, kh, s, d = 3, 6, 2, 40, 16
    q, k_new, v_new, k_all, v_all, rope = _append_inputs(9, b, h, kh, s, d, 3)
    lengths = jnp.array([0, 17, 39], jnp.int32)
    rms = (jnp.array([40.0, 2.0, 11.0]), 64, 1e-6)
    packed = jnp.concatenate([q, k_new, v_new], axis=1)
    kw = dict(layer=1, rope=rope, implementation=impl, interpret=True)
    want = api.decode_attention_append(api._prepare_query(q, h, rope, rms), k_new, v_new,
                                       k_all, v_all, lengths, rms=rms, **kw)
    got = api.decode_attention_append(packed, packed, packed, k_all, v_all, lengths, q_heads=h,
                                      k_head_offset=h, v_head_offset=h + kh, rms=rms, **kw)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    ref = decode_append_reference(api._prepare_query(q, h, rope, None), k_new, v_new,
                                  k_all[1], v_all[1], lengths, rope=rope)
    got = api.decode_attention_append(packed, packed, packed, k_all, v_all, lengths, q_heads=h,
                                      k_head_offset=h, v_head_offset=h + kh, **kw)
    assert _rel(got[0], ref[0]) <= F32_TOL
    with pytest.raises(ValueError, match="q_heads=11: q has 10 heads"):
        api.decode_attention_append(packed, packed, packed, k_all, v_all, lengths, q_heads=11,
                                    k_head_offset=h, v_head_offset=h + kh, **kw)


@pytest.mark.parametrize("raw", [False, True])
def test_decode_append_lowers_in_place_for_cuda(raw):
    """Lowered for a GPU, the fused step is one Triton call whose cache outputs alias its cache
    inputs (the update is in place) and nothing else touches the cache; also with an RMS factor
    and a raw q (scaled and rotated in the kernel)."""
    from jax._src.pallas.triton import gpu_info, pallas_call_registration as reg
    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    S = jax.ShapeDtypeStruct
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reg.gpu_info_lib, "get_gpu_info", lambda: h100)
        cache = S((4, 2, 256, 2, 128), jnp.bfloat16)
        row = S((2, 2, 128), jnp.bfloat16)
        rope = S((2, 128), jnp.float32)
        step = lambda q, kn, vn, kc, vc, n, c, sn, lay, ss: decode_triton.decode_attention_append(  # noqa: E731
            q, kn, vn, kc, vc, n, layer=lay, rope=(c, sn),
            rms=(ss, 4096, 1e-5) if raw else None, q_heads=8 if raw else None)
        lowered = jax.jit(step).trace(S((2, 8, 128), jnp.bfloat16), row, row, cache, cache,
                                      S((2,), jnp.int32), rope, rope, S((), jnp.int32),
                                      S((2,), jnp.float32)).lower(lowering_platforms=("cuda",))
    ops = [op for f in lowered.compiler_ir("stablehlo").body.operations
           for region in f.regions for block in region.blocks for op in block.operations]
    calls = [op for op in ops if op.operation.name == "stablehlo.custom_call"]
    assert len(calls) == 2  # the step and the chunks' merge
    assert all("xla.gpu.triton" in str(c.attributes["call_target_name"]) for c in calls)
    aliases = str(calls[0].attributes["output_operand_aliases"])
    assert aliases.count("output_operand_alias") == 2
    whole = "tensor<4x2x256x2x128xbf16>"
    users = {op.operation.name for op in ops for x in op.operands if str(x.type) == whole}
    assert users == {"stablehlo.custom_call", "func.return"}  # no slice, scatter or copy


@pytest.mark.parametrize("impl", list(MLA_IMPLS))
def test_mla_decode_interpret(impl):
    b, h, s, r, dr = 3, 5, 40, 32, 8
    ks = jax.random.split(jax.random.PRNGKey(7), 4)
    ql = jax.random.normal(ks[0], (b, h, r))
    qr = jax.random.normal(ks[1], (b, h, dr))
    cache = jax.random.normal(ks[2], (b, s, r))
    rope = jax.random.normal(ks[3], (b, s, dr))
    lengths = jnp.array([40, 3, 21], jnp.int32)
    out = MLA_IMPLS[impl](ql, qr, cache, rope, lengths, scale=0.2)
    ref = mla_decode_reference(ql, qr, cache, rope, lengths, scale=0.2)
    assert _rel(out, ref) <= F32_TOL


@pytest.mark.parametrize("impl", list(MLA_IMPLS))
@pytest.mark.parametrize("s", [40, 48])
def test_mla_decode_reads_one_layer_of_a_stacked_cache(impl, s):
    """As for decode attention: layer 1 of NaN-surrounded [L, B, S, R] / [L, B, S, Dr] caches."""
    b, h, r, dr, n_layers = 3, 5, 32, 8, 3
    ks = jax.random.split(jax.random.PRNGKey(s), 4)
    ql = jax.random.normal(ks[0], (b, h, r))
    qr = jax.random.normal(ks[1], (b, h, dr))
    cache = jax.random.normal(ks[2], (b, s, r))
    rope = jax.random.normal(ks[3], (b, s, dr))
    c_all = jnp.full((n_layers, b, s, r), jnp.nan).at[1].set(cache)
    r_all = jnp.full((n_layers, b, s, dr), jnp.nan).at[1].set(rope)
    lengths = jnp.array([3, 21, s], jnp.int32)
    out = jax.jit(lambda lay: MLA_IMPLS[impl](ql, qr, c_all, r_all, lengths, scale=0.2,
                                              layer=lay))(1)
    ref = mla_decode_reference(ql, qr, cache, rope, lengths, scale=0.2)
    assert _rel(out, ref) <= F32_TOL


def test_mla_reference_matches_expanded_attention():
    """The absorbed form equals ordinary attention with per-head keys W_UK c and values W_UV c."""
    b, h, s, r, dn, dr, dv = 2, 3, 11, 16, 8, 4, 8
    ks = jax.random.split(jax.random.PRNGKey(1), 6)
    q_nope = jax.random.normal(ks[0], (b, h, dn))
    q_rope = jax.random.normal(ks[1], (b, h, dr))
    c = jax.random.normal(ks[2], (b, s, r))
    k_rope = jax.random.normal(ks[3], (b, s, dr))
    w_uk = jax.random.normal(ks[4], (h, r, dn)) * 0.3
    w_uv = jax.random.normal(ks[5], (h, r, dv)) * 0.3
    lengths = jnp.array([11, 6])
    scale = (dn + dr) ** -0.5
    out_latent = mla_decode_reference(jnp.einsum("bhn,hrn->bhr", q_nope, w_uk), q_rope, c,
                                      k_rope, lengths, scale=scale)
    out = jnp.einsum("bhr,hrv->bhv", out_latent, w_uv)
    k = jnp.concatenate([jnp.einsum("bsr,hrn->bshn", c, w_uk),
                         jnp.broadcast_to(k_rope[:, :, None], (b, s, h, dr))], -1)
    v = jnp.einsum("bsr,hrv->bshv", c, w_uv)
    qf = jnp.concatenate([q_nope, q_rope], -1)
    ref = decode_attention_reference(qf, k, v[..., :dn + dr] if dv >= dn + dr else
                                     jnp.pad(v, ((0, 0),) * 3 + ((0, dn + dr - dv),)),
                                     lengths, scale=scale)[..., :dv]
    assert _rel(out, ref) <= 1e-5


# ---- native GPU (skipped on CPU) -------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("case", [c[0] for c in FLASH_CASES])
def test_flash_attention_native_gpu(case):
    kw = dict(dict(FLASH_CASES)[case])
    kw["d"] = 32
    if kw.get("dtype") != jnp.bfloat16:
        kw["dtype"] = jnp.float32
    check_flash(lambda *a, **k: flash_triton.flash_attention(
        *a, config=flash_triton.Config(32, 32, 32, 32), **k), **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("causal,overrides", [(True, {}), (False, {}),
                                              (True, dict(block_k=64)),
                                              (False, dict(block_k=64, slots=4)),
                                              (True, dict(overlap=False, pingpong=True))])
def test_flash_mosaic_gpu_native(causal, overrides):
    """The Mosaic GPU kernel compiled for the GPU (forward and, through Triton, backward)."""
    check_flash(_mgpu(interpret=False, **overrides), b=2, t=300, s=300, h=4, kh=1,
                d=128, dtype=jnp.bfloat16, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backward", ["mosaic_gpu", "mosaic_gpu_fused"])
def test_flash_mosaic_gpu_native_mosaic_backward(causal, backward):
    """Our Mosaic GPU backward kernels compiled for the GPU (outputs, lse and gradients)."""
    check_flash(_mgpu(interpret=False, backward=backward), b=2, t=300, s=300, h=4, kh=1,
                d=128, dtype=jnp.bfloat16, causal=causal)


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
        assert _rel(g, rg) <= BF16_TOL, name


@pytest.mark.gpu
def test_decode_native_gpu():
    b, h, kh, s, d = 4, 8, 2, 300, 64
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (b, h, d), jnp.bfloat16)
    kc = jax.random.normal(ks[1], (b, s, kh, d), jnp.bfloat16)
    vc = jax.random.normal(ks[2], (b, s, kh, d), jnp.bfloat16)
    lengths = jnp.array([300, 1, 77, 128], jnp.int32)
    out = decode_triton.decode_attention(q, kc, vc, lengths)
    ref = decode_attention_reference(q.astype(jnp.float32), kc.astype(jnp.float32),
                                     vc.astype(jnp.float32), lengths)
    assert _rel(out, ref) <= BF16_TOL


@pytest.mark.gpu
def test_decode_append_native_gpu():
    """The one-kernel decode step compiled for the GPU (bf16 cache, head_dim 128, a stacked
    cache, GQA 4) against the XLA write-then-attend reference."""
    b, h, kh, s, d = 3, 16, 4, 1280, 128
    q, k_new, v_new, k_all, v_all, rope = _append_inputs(3, b, h, kh, s, d, 3, jnp.bfloat16)
    k_all, v_all = (jnp.nan_to_num(x, nan=0.0) for x in (k_all, v_all))
    lengths = jnp.array([0, 700, 1279], jnp.int32)
    q, k_new, v_new = (x.astype(jnp.bfloat16) for x in (q, k_new, v_new))
    out, kc, vc = jax.jit(lambda *a: decode_triton.decode_attention_append(
        *a, layer=1, rope=rope))(q, k_new, v_new, k_all, v_all, lengths)
    ref, rk, rv = decode_append_reference(q, k_new, v_new, k_all[1], v_all[1], lengths,
                                          rope=rope)
    assert _rel(out, ref) <= BF16_TOL
    assert _rel(kc[1], rk) <= 1e-3 and _rel(vc[1], rv) == 0.0
    assert _rel(kc[0], k_all[0]) == 0.0
    # with an RMSNorm factor (models.fused.fold_norms), as the model's folded decode step
    factor = (jnp.array([4096.0, 100.0, 9000.0]), 4096, 1e-5)
    out, kc, vc = jax.jit(lambda *a: decode_triton.decode_attention_append(
        *a, layer=1, rope=rope, rms=factor))(q, k_new, v_new, k_all, v_all, lengths)
    ref, rk, rv = decode_append_reference(q, k_new, v_new, k_all[1], v_all[1], lengths,
                                          rope=rope, rms=factor)
    assert _rel(out, ref) <= BF16_TOL
    assert _rel(kc[1], rk) <= 1e-3 and _rel(vc[1], rv) <= 1e-3
    # and a raw q read from the fused projection's output, scaled and rotated in the kernel
    packed = jnp.concatenate([q, k_new, v_new], axis=1)
    out, kc, vc = jax.jit(lambda *a: decode_triton.decode_attention_append(
        *a, layer=1, rope=rope, rms=factor, q_heads=h, k_head_offset=h, v_head_offset=h + kh))(
        packed, packed, packed, k_all, v_all, lengths)
    ref, rk, _ = decode_append_reference(api._prepare_query(q, h, rope, factor), k_new, v_new,
                                         k_all[1], v_all[1], lengths, rope=rope, rms=factor)
    assert _rel(out, ref) <= BF16_TOL and _rel(kc[1], rk) <= 1e-3
