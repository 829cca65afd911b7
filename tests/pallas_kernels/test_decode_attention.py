"""The decode ops' shared conformance tests: every backend the registry lists for
`decode_attention` and `decode_attention_append` against the pure-jnp references (kernels in
interpret mode on CPU), stacked caches read in place, then what is particular to the
Pallas-Triton kernels: the one-kernel decode step, the chunks' merge, their CUDA lowering.

Caches stack three layers with NaN outside the one attended (a read or write elsewhere shows),
and rows are ragged: full, one slot, mid-block, a block edge (16-row test blocks).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import api, registry
from pallas_kernels.decode_attention import mosaic_tpu as decode_tpu
from pallas_kernels.decode_attention import pallas_triton as decode_triton
from pallas_kernels.decode_attention.api import DECODE, DECODE_APPEND
from pallas_kernels.decode_attention.reference import (
    decode_append_reference,
    decode_attention_reference,
)
from tests.pallas_kernels.conformance import backends, normals, only, rel

F32_TOL = 1e-5
BF16_TOL = 2e-2  # bf16 operands (a bf16 cache: the kernel's p @ V in bf16)

CONFIGS = {
    "pallas_triton": {
        "": decode_triton.Config(block_k=16, num_splits=3),
        "jnp_merge": decode_triton.Config(block_k=16, num_splits=3, merge="xla"),
    },
    "mosaic_tpu": {"": decode_tpu.Config(block_k=16)},
}
# merge="xla" changes only how the chunks are merged (`merge_chunks`, the same for decode and
# append, stacked cache or not): the decode conformance test runs it, the others each
# backend's default variant.
DEFAULT_CONFIGS = {impl: {"": variants[""]} for impl, variants in CONFIGS.items()}


def _decode(impl, cfg):
    return lambda *a, **kw: api.decode_attention(
        *a, implementation=impl, config=cfg, interpret=True, **kw
    )


@pytest.mark.parametrize("impl,cfg", backends(DECODE, CONFIGS))
@pytest.mark.parametrize(
    "h,kh,extra", [(4, 4, {}), (8, 2, dict(softcap=3.0)), (8, 1, dict(sliding_window=9))]
)
def test_decode_attention_conformance(impl, cfg, h, kh, extra):
    only(impl, f"gqa{h // kh}", {"mosaic_tpu": {"gqa4", "gqa8"}})
    b, s, d = 4, 45, 16
    q, kc, vc = map(jnp.asarray, normals(h + kh, (b, h, d), (b, s, kh, d), (b, s, kh, d)))
    lengths = jnp.array([45, 1, 17, 32], jnp.int32)  # full, one slot, mid-block, block edge
    out = _decode(impl, cfg)(q, kc, vc, lengths, **extra)
    ref = decode_attention_reference(q, kc, vc, lengths, **extra)
    assert out.shape == (b, h, d)
    assert rel(out, ref) <= F32_TOL


@pytest.mark.parametrize("impl,cfg", backends(DECODE, DEFAULT_CONFIGS))
@pytest.mark.parametrize("s", [45, 48])  # a last block that overhangs the cache, and none
def test_decode_attention_reads_one_layer_of_a_stacked_cache(impl, cfg, s):
    """layer=: layer 1 of an [L, B, S, K, D] cache is read in place.  The other layers are
    NaN, so a read outside layer 1 (a wrong index, an unmasked overhanging block of the last
    sequence) poisons the output; the layer index is traced, as inside the model's scan."""
    b, h, kh, d, n_layers = 3, 8, 2, 16, 3
    q, kc, vc = normals(s, (b, h, d), (b, s, kh, d), (b, s, kh, d))
    k_all, v_all = (np.full((n_layers, b, s, kh, d), np.nan, np.float32) for _ in "kv")
    k_all[1], v_all[1] = kc, vc
    q, kc, vc, k_all, v_all = map(jnp.asarray, (q, kc, vc, k_all, v_all))
    lengths = jnp.array([1, 17, s], jnp.int32)  # the last sequence's overhang is layer 2's
    out = jax.jit(lambda lay: _decode(impl, cfg)(q, k_all, v_all, lengths, layer=lay))(1)
    ref = decode_attention_reference(q, kc, vc, lengths)
    assert rel(out, ref) <= F32_TOL


def _append_inputs(seed, b, h, kh, s, d, n_layers, dtype=jnp.float32):
    q, k_new, v_new, k, v = normals(seed, (b, h, d), (b, kh, d), (b, kh, d), *[(b, s, kh, d)] * 2)
    # NaN in the other layers: a read or write outside the attended layer shows
    k_all, v_all = (np.full((n_layers, b, s, kh, d), np.nan, np.float32) for _ in "kv")
    k_all[1], v_all[1] = k, v
    ang = np.tile(np.random.default_rng(seed).uniform(0.0, 6.0, (b, d // 2)), (1, 2))
    rope = (jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32))
    caches = (jnp.asarray(k_all, dtype), jnp.asarray(v_all, dtype))
    return (*map(jnp.asarray, (q, k_new, v_new)), *caches, rope)


@pytest.mark.parametrize("impl,cfg", backends(DECODE_APPEND, DEFAULT_CONFIGS))
@pytest.mark.parametrize("d", [16, 24])  # Pallas-Triton: the fused kernel, and XLA's write
def test_decode_append_conformance(impl, cfg, d):
    """A decode step (write, then attend) for every backend, stacked and unstacked caches:
    the output and the written caches equal the reference's.  Pallas-Triton writes in its
    kernel at head_dim 16 and lets XLA write at 24 (not a power of two)."""
    only(impl, f"d{d}", {"mosaic_tpu": {"d16"}})
    b, h, kh, s = 2, 4, 2, 40
    q, k_new, v_new, k_all, v_all, rope = _append_inputs(2, b, h, kh, s, d, 3)
    lengths = jnp.array([7, 39], jnp.int32)
    ref = decode_append_reference(q, k_new, v_new, k_all[1], v_all[1], lengths, rope=rope)
    kw = dict(rope=rope, implementation=impl, config=cfg, interpret=True)
    got = api.decode_attention_append(q, k_new, v_new, k_all, v_all, lengths, layer=1, **kw)
    assert rel(got[0], ref[0]) <= F32_TOL
    assert rel(got[1][1], ref[1]) <= F32_TOL and rel(got[2][1], ref[2]) <= F32_TOL
    assert np.isnan(np.asarray(got[1][::2])).all()  # the other layers untouched
    flat = api.decode_attention_append(q, k_new, v_new, k_all[1], v_all[1], lengths, **kw)
    assert flat[1].shape == (b, s, kh, d) and rel(flat[0], ref[0]) <= F32_TOL
    with pytest.raises(ValueError, match="unknown"):
        api.decode_attention_append(
            q, k_new, v_new, k_all, v_all, lengths, layer=1, implementation="cudnn"
        )


# each option once, the soft-cap and window at float32's tolerance (each case is a kernel to
# compile; the options and the cache's dtype are apart in the kernel)
@pytest.mark.parametrize(
    "cache_dtype,extra",
    [
        (jnp.float32, dict(softcap=3.0)),
        (jnp.float32, dict(sliding_window=9)),
        (jnp.bfloat16, {}),
    ],
    ids=["float32-softcap", "float32-window", "bfloat16"],
)
def test_decode_append_fused_kernel(cache_dtype, extra):
    """Pallas-Triton's one-kernel decode step (key rotated, key and value written in place,
    the new token attended from registers) equals writing with XLA and then attending: the
    output, the written slot, and every other slot and layer untouched.  Slots: the last of the
    cache, an empty cache, a chunk's first slot, a block's last slot (chunks of 16 here)."""
    b, h, kh, s, d = 4, 8, 2, 45, 16
    q, k_new, v_new, k_all, v_all, rope = _append_inputs(1, b, h, kh, s, d, 3, cache_dtype)
    lengths = jnp.array([44, 0, 16, 31], jnp.int32)
    cfg = decode_triton.Config(block_k=16, num_splits=3)
    out, kc, vc = jax.jit(
        lambda lay: api.decode_attention_append(
            q,
            k_new,
            v_new,
            k_all,
            v_all,
            lengths,
            layer=lay,
            rope=rope,
            config=cfg,
            implementation="pallas_triton",
            interpret=True,
            **extra,
        )
    )(1)
    ref, rk, rv = decode_append_reference(
        q, k_new, v_new, k_all[1], v_all[1], lengths, rope=rope, **extra
    )
    # (a bf16 cache: the kernel's p @ V runs in bf16, the reference's in float32)
    assert rel(out, ref) <= (F32_TOL if cache_dtype == jnp.float32 else BF16_TOL)
    written = np.zeros((b, s), bool)
    written[np.arange(b), np.asarray(lengths)] = True
    # the rotation rounds like XLA's up to one unit in the last place (operation order)
    ulp = 2.0**-7 if cache_dtype == jnp.bfloat16 else 1e-6
    for got, want, old in ((kc, rk, k_all), (vc, rv, v_all)):
        got, want, old = (np.asarray(x, np.float32) for x in (got[1], want, old[1]))
        np.testing.assert_allclose(got[written], want[written], rtol=ulp, atol=ulp)
        np.testing.assert_array_equal(got[~written], old[~written])  # nothing else written
    assert np.isnan(np.asarray(kc[::2], np.float32)).all()
    assert np.isnan(np.asarray(vc[::2], np.float32)).all()


@pytest.mark.parametrize("impl", ["xla", "pallas_triton"])
def test_decode_append_reads_k_and_v_at_head_offsets(impl):
    """k and v given as one fused projection's output [B, Hq + 2K, D] with head offsets (the
    kernel reads them in place) equal k and v given apart; a window off the array is refused."""
    b, h, kh, s, d = 2, 4, 2, 40, 16
    q, k_new, v_new, k_all, v_all, rope = _append_inputs(6, b, h, kh, s, d, 3)
    lengths = jnp.array([3, 20], jnp.int32)
    packed = jnp.asarray(np.concatenate([np.full((b, 3, d), np.nan, np.float32), k_new, v_new], 1))
    kw = dict(layer=1, rope=rope, implementation=impl, interpret=True)
    want = api.decode_attention_append(q, k_new, v_new, k_all, v_all, lengths, **kw)
    got = api.decode_attention_append(
        q, packed, packed, k_all, v_all, lengths, k_head_offset=3, v_head_offset=3 + kh, **kw
    )
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    with pytest.raises(ValueError, match="no 2 heads at offset 6"):
        api.decode_attention_append(
            q, packed, packed, k_all, v_all, lengths, k_head_offset=6, v_head_offset=5, **kw
        )
    with pytest.raises(ValueError, match="7 heads but the cache 2"):
        api.decode_attention_append(q, packed, v_new, k_all, v_all, lengths, **kw)


def test_unfused_append_fallback_warns_once(monkeypatch, caplog):
    """decode_attention_append with a head_dim the fused kernel lacks says so (a warning)."""
    monkeypatch.setattr(registry, "LOGGED", set())
    caplog.set_level(logging.INFO, logger="pallas_kernels")
    b, s, h, kh, d = 2, 20, 4, 2, 24
    sd = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    for _ in range(2):  # the choice is made, and logged, while tracing
        jax.jit(
            lambda *a: api.decode_attention_append(
                *a, jnp.array([3, 19]), implementation="pallas_triton", interpret=True
            )
        ).trace(sd(b, h, d), sd(b, kh, d), sd(b, kh, d), sd(b, s, kh, d), sd(b, s, kh, d))
    text = (
        "decode_attention_append: pallas_triton, cache written by XLA "
        "(head_dim 24 is not a power of two)"
    )
    records = [r for r in caplog.records if r.getMessage() == text]
    assert len(records) == 1 and records[0].levelno == logging.WARNING


def test_decode_merge_kernel_ignores_padding_chunks():
    """The merge kernel reads a power-of-two chunk axis whose padding the chunks' kernel never
    writes: NaN there must not reach the output; empty chunks (lse -inf) weigh nothing."""
    b, kh, splits, gp, d = 2, 3, 5, 16, 64
    o, lse = normals(4, (b, kh, 8, gp, d), (b, kh, 8, gp))
    lse[:, :, 1] = -np.inf
    o[:, :, splits:], lse[:, :, splits:] = np.nan, np.nan
    o, lse = jnp.asarray(o), jnp.asarray(lse)
    got = decode_triton.merge_chunks(
        o, lse, splits, jnp.float32, decode_triton.Config(), interpret=True
    )
    want = decode_triton.merge_partials(o[:, :, :splits], lse[:, :, :splits], axis=2)
    assert rel(got, want) <= F32_TOL


def _stablehlo_ops(lowered):
    return [
        op
        for f in lowered.compiler_ir("stablehlo").body.operations
        for region in f.regions
        for block in region.blocks
        for op in block.operations
    ]


def test_decode_attention_stacked_cache_is_not_copied(monkeypatch):
    """Compiled for a GPU (the Pallas-Triton kernel), the stacked cache reaches the kernel
    as it is: no slice of it, and no copy, in the lowered module."""
    from jax._src.pallas.triton import gpu_info
    from jax._src.pallas.triton import pallas_call_registration as reg

    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info", lambda: h100)
    q = jax.ShapeDtypeStruct((2, 8, 64), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((4, 2, 256, 2, 64), jnp.bfloat16)
    lens = jax.ShapeDtypeStruct((2,), jnp.int32)
    step = lambda q, k, v, n, lay: api.decode_attention(  # noqa: E731
        q, k, v, n, layer=lay, implementation="pallas_triton", interpret=False
    )
    ops = _stablehlo_ops(
        jax.jit(step)
        .trace(q, cache, cache, lens, jax.ShapeDtypeStruct((), jnp.int32))
        .lower(lowering_platforms=("cuda",))
    )
    whole = "tensor<4x2x256x2x64xbf16>"
    calls = [
        op
        for op in ops
        if op.operation.name == "stablehlo.custom_call"
        and "xla.gpu.triton" in str(op.attributes["call_target_name"])
    ]
    assert len(calls) == 2  # the chunks' kernel and their merge
    assert [str(x.type) for x in calls[0].operands].count(whole) == 2  # k and v, whole
    # nothing reads the cache but the kernel (no slice, no copy)
    assert all(op is calls[0] for op in ops for x in op.operands if str(x.type) == whole)


def test_decode_append_lowers_in_place_for_cuda(monkeypatch):
    """Lowered for a GPU, the fused step is one Triton call whose cache outputs alias its cache
    inputs (the update is in place) and nothing else touches the cache."""
    from jax._src.pallas.triton import gpu_info
    from jax._src.pallas.triton import pallas_call_registration as reg

    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info", lambda: h100)
    S = jax.ShapeDtypeStruct
    cache = S((4, 2, 256, 2, 128), jnp.bfloat16)
    row = S((2, 2, 128), jnp.bfloat16)
    rope = S((2, 128), jnp.float32)
    step = lambda q, kn, vn, kc, vc, n, c, sn, lay: api.decode_attention_append(  # noqa: E731
        q,
        kn,
        vn,
        kc,
        vc,
        n,
        layer=lay,
        rope=(c, sn),
        implementation="pallas_triton",
        interpret=False,
    )
    ops = _stablehlo_ops(
        jax.jit(step)
        .trace(
            S((2, 8, 128), jnp.bfloat16),
            row,
            row,
            cache,
            cache,
            S((2,), jnp.int32),
            rope,
            rope,
            S((), jnp.int32),
        )
        .lower(lowering_platforms=("cuda",))
    )
    calls = [op for op in ops if op.operation.name == "stablehlo.custom_call"]
    assert len(calls) == 2  # the step and the chunks' merge
    assert all("xla.gpu.triton" in str(c.attributes["call_target_name"]) for c in calls)
    aliases = str(calls[0].attributes["output_operand_aliases"])
    assert aliases.count("output_operand_alias") == 2
    whole = "tensor<4x2x256x2x128xbf16>"
    users = {op.operation.name for op in ops for x in op.operands if str(x.type) == whole}
    assert users == {"stablehlo.custom_call", "func.return"}  # no slice, scatter or copy


# ---- native GPU (skipped on CPU) -------------------------------------------------------------


@pytest.mark.gpu
def test_decode_native_gpu():
    b, h, kh, s, d = 4, 8, 2, 300, 64
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (b, h, d), jnp.bfloat16)
    kc = jax.random.normal(ks[1], (b, s, kh, d), jnp.bfloat16)
    vc = jax.random.normal(ks[2], (b, s, kh, d), jnp.bfloat16)
    lengths = jnp.array([300, 1, 77, 128], jnp.int32)
    out = api.decode_attention(q, kc, vc, lengths, implementation="pallas_triton")
    ref = decode_attention_reference(
        q.astype(jnp.float32), kc.astype(jnp.float32), vc.astype(jnp.float32), lengths
    )
    assert rel(out, ref) <= BF16_TOL


@pytest.mark.gpu
def test_decode_append_native_gpu():
    """The one-kernel decode step compiled for the GPU (bf16 cache, head_dim 128, a stacked
    cache, GQA 4) against the XLA write-then-attend reference."""
    b, h, kh, s, d = 3, 16, 4, 1280, 128
    q, k_new, v_new, k_all, v_all, rope = _append_inputs(3, b, h, kh, s, d, 3, jnp.bfloat16)
    k_all, v_all = (jnp.nan_to_num(x, nan=0.0) for x in (k_all, v_all))
    lengths = jnp.array([0, 700, 1279], jnp.int32)
    q, k_new, v_new = (x.astype(jnp.bfloat16) for x in (q, k_new, v_new))
    out, kc, vc = jax.jit(
        lambda *a: api.decode_attention_append(
            *a, layer=1, rope=rope, implementation="pallas_triton"
        )
    )(q, k_new, v_new, k_all, v_all, lengths)
    ref, rk, rv = decode_append_reference(q, k_new, v_new, k_all[1], v_all[1], lengths, rope=rope)
    assert rel(out, ref) <= BF16_TOL
    assert rel(kc[1], rk) <= 1e-3 and rel(vc[1], rv) == 0.0
    assert rel(kc[0], k_all[0]) == 0.0
