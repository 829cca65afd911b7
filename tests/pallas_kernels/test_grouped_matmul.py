"""Grouped matmuls (`pallas_kernels/grouped_matmul`): the references against a per-group loop,
every kernel backend the registry lists for gmm / gmv in interpret mode against
`jax.lax.ragged_dot` (forward and gradients), dispatch, the Pallas -> Triton lowering, and the
benchmark's CPU preset.

Rows past sum(group_sizes) and the weights of experts with no rows are NaN in the kernel
cases: reading either where it must not (a wrong mask, an expert tile that should not exist)
poisons the result."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import registry
from pallas_kernels.grouped_matmul import (
    gmm,
    gmm_reference,
    gmv,
    gmv_reference,
    tgmm_reference,
)
from pallas_kernels.grouped_matmul import mosaic_tpu as gmm_tpu
from pallas_kernels.grouped_matmul import pallas_triton as gmm_triton
from pallas_kernels.grouped_matmul.api import GMM, GMV, GroupedCall
from tests.pallas_kernels.conformance import normals

# small tiles so that tiny shapes still have several row / column / contraction tiles
CONFIGS = {
    "pallas_triton": gmm_triton.Config(16, 16, 16, 4, 2),
    "mosaic_tpu": gmm_tpu.Config(16, 128, 128),
}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def _loop_gmm(lhs, rhs, sizes):
    """The definition, one group at a time in numpy float64."""
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out, off = np.zeros((lhs.shape[0], rhs.shape[2])), 0
    for g, s in enumerate(sizes):
        out[off : off + s] = lhs[off : off + s] @ rhs[g]
        off += s
    return out


def _loop_tgmm(lhs, grad, sizes):
    lhs, grad = np.asarray(lhs, np.float64), np.asarray(grad, np.float64)
    out, off = np.zeros((len(sizes), lhs.shape[1], grad.shape[1])), 0
    for g, s in enumerate(sizes):
        out[g] = lhs[off : off + s].T @ grad[off : off + s]
        off += s
    return out


def test_references_match_a_per_group_loop():
    m, k, n = 23, 8, 6
    sizes = [5, 0, 9, 3]  # an empty group, and 6 rows past the sum
    lhs, rhs, grad = map(jnp.asarray, normals(0, (m, k), (4, k, n), (m, n)))
    gs = jnp.array(sizes, jnp.int32)
    with jax.default_matmul_precision("highest"):
        out = gmm_reference(lhs, rhs, gs)
        out_t = gmm_reference(lhs, jnp.swapaxes(rhs, 1, 2), gs, transpose_rhs=True)
        dw = tgmm_reference(lhs, grad, gs)
    want = _loop_gmm(lhs, rhs, sizes)
    assert _rel(out, want) < 1e-6 and _rel(out_t, want) < 1e-6
    assert np.all(np.asarray(out[17:]) == 0.0)
    assert _rel(dw, _loop_tgmm(lhs, grad, sizes)) < 1e-6
    assert np.all(np.asarray(dw[1]) == 0.0)
    assert (
        gmm_reference(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), gs).dtype == jnp.bfloat16
    )


def _case(sizes, m, k, n, dtype, transpose_rhs, seed=0):
    """Inputs with NaN in rows past the sum (lhs) and in the empty experts' weights, plus
    their finite versions for the reference."""
    g = len(sizes)
    lhs, w, ct = normals(seed, (m, k), (g, k, n), (m, n))
    w *= k**-0.5
    total = sum(sizes)
    empty = np.array([s == 0 for s in sizes])[:, None, None]
    lhs_nan = lhs.copy()
    lhs_nan[total:] = np.nan
    w_nan = np.where(empty, np.float32(np.nan), w)
    if transpose_rhs:
        w, w_nan = np.swapaxes(w, 1, 2), np.swapaxes(w_nan, 1, 2)
    cast = lambda x: jnp.asarray(x, dtype)  # (numpy casts: nothing compiles per shape)
    return (cast(lhs), cast(lhs_nan), cast(w), cast(w_nan), cast(ct), jnp.array(sizes, jnp.int32))


KERNEL_CASES = {
    # float32; empty groups (first, middle, last) and rows past the sum; M, K and N not
    # multiples of the tiles
    "f32_empty_groups_tail": dict(
        sizes=[0, 9, 0, 20, 1, 0], m=37, k=40, n=24, dtype=jnp.float32, transpose_rhs=False
    ),
    # bf16 in, float32 out; one group holds every row; weights stored [G, N, K]
    "bf16_one_group_all_rows_transposed": dict(
        sizes=[0, 45, 0],
        m=45,
        k=32,
        n=48,
        dtype=jnp.bfloat16,
        transpose_rhs=True,
        out_dtype=jnp.float32,
    ),
}


@pytest.mark.parametrize("impl", GMM.names)
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_gmm_forward_and_gradients_match_ragged_dot(impl, case):
    if impl == "xla":
        pytest.skip("xla is jax.lax.ragged_dot, this test's reference")
    kw = KERNEL_CASES[case]
    tr, dtype = kw["transpose_rhs"], kw["dtype"]
    lhs, lhs_nan, w, w_nan, ct, gs = _case(kw["sizes"], kw["m"], kw["k"], kw["n"], dtype, tr)
    cfg = CONFIGS[impl]
    out_dtype = kw.get("out_dtype")

    def ours(a, b):
        return gmm(
            a,
            b,
            gs,
            implementation=impl,
            transpose_rhs=tr,
            config=cfg,
            tgmm_config=cfg,
            preferred_element_type=out_dtype,
        )

    def ragged(a, b):  # jax.lax.ragged_dot itself, on [G, K, N] weights
        return jax.lax.ragged_dot(a, jnp.swapaxes(b, 1, 2) if tr else b, gs)

    def fwd_bwd(f, a, b):
        out, vjp = jax.vjp(f, a, b)
        return (out, *vjp(ct.astype(out.dtype)))

    got = jax.jit(lambda a, b: fwd_bwd(ours, a, b))(lhs_nan, w_nan)
    with jax.default_matmul_precision("highest"):
        up = lambda x: x.astype(jnp.float32)
        want = fwd_bwd(ragged, up(lhs), up(w))
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for name, g, r, dt in zip(
        ("out", "d_lhs", "d_rhs"), got, want, (out_dtype or dtype, dtype, dtype)
    ):
        assert g.dtype == dt, name
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        assert _rel(g, r) <= tol, (name, _rel(g, r))
    total = sum(kw["sizes"])
    assert np.all(np.asarray(got[0][total:]) == 0.0) and np.all(np.asarray(got[1][total:]) == 0)
    for g_, s in enumerate(kw["sizes"]):
        if s == 0:  # an empty expert's weight gradient is exactly zero
            assert np.all(np.asarray(got[2][g_]) == 0.0)


@pytest.mark.parametrize("impl", GMV.names)
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gmv_reads_only_routed_experts(impl, transpose_rhs):
    """Per-token expert ids (unsorted, repeated, -1 and G meaning "no expert here"); the
    weights of experts no token is routed to are NaN."""
    g, k, n = 6, 48, 40
    ids = jnp.array([3, 0, 3, -1, 5, 6, 0], jnp.int32)
    x, w = normals(2, (ids.shape[0], k), (g, k, n))
    routed = np.isin(np.arange(g), np.asarray(ids))[:, None, None]
    w_nan = np.where(routed, w, np.float32(np.nan))
    if transpose_rhs:
        w, w_nan = np.swapaxes(w, 1, 2), np.swapaxes(w_nan, 1, 2)
    x, w, w_nan = jnp.asarray(x), jnp.asarray(w), jnp.asarray(w_nan)
    want = np.zeros((ids.shape[0], n))
    wk = np.asarray(w, np.float64)
    wk = wk.swapaxes(1, 2) if transpose_rhs else wk
    for i, e in enumerate(np.asarray(ids)):
        if 0 <= e < g:
            want[i] = np.asarray(x, np.float64)[i] @ wk[e]
    if impl == "xla":  # the reference (a gather), on finite weights
        with jax.default_matmul_precision("highest"):
            ref = gmv_reference(x, w, ids, transpose_rhs=transpose_rhs)
        assert _rel(ref, want) < 1e-6
        return
    if impl == "mosaic_tpu" and transpose_rhs:
        pytest.skip(
            "the TPU path (sorted into the grouped GEMM) runs [G, K, N] once "
            "(interpret mode is slow; gmm's tests cover [G, N, K])"
        )
    # K and N not multiples of the tile; transposed: the default tile, block_k 256 > K
    cfg = {
        "pallas_triton": None if transpose_rhs else gmm_triton.GmvConfig(block_n=16, block_k=32),
        "mosaic_tpu": CONFIGS["mosaic_tpu"],
    }[impl]
    got = gmv(x, w_nan, ids, implementation=impl, transpose_rhs=transpose_rhs, config=cfg)
    assert _rel(got, want) <= 1e-5
    assert np.all(np.asarray(got)[[3, 5]] == 0.0)


def test_auto_is_xla_on_cpu_and_logs_once(caplog, monkeypatch):
    monkeypatch.setattr(registry, "LOGGED", set())
    monkeypatch.setattr(registry, "platform", lambda: "cpu")  # (on a GPU host too)
    lhs, _, w, _, _, gs = _case([3, 0, 4], 9, 8, 8, jnp.float32, False)
    with caplog.at_level(logging.INFO, logger="pallas_kernels"):
        out = gmm(lhs, w, gs)
        gmm(lhs, w, gs)
    call = GroupedCall(jnp.dtype(jnp.float32))
    assert GMM.choose(call, "auto").name == "xla"
    assert GMM.choose(call, "pallas").name == "pallas_triton"  # interpret mode off a GPU
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gmm:")]
    assert msgs == ["gmm: xla (on cpu; pallas_triton: not on a GPU; mosaic_tpu: not on a TPU)"]
    assert _rel(out, gmm_reference(lhs, w, gs)) == 0.0


def test_bad_inputs_name_the_problem():
    lhs, w, gs = jnp.ones((8, 4)), jnp.ones((3, 4, 5)), jnp.array([2, 2, 2], jnp.int32)
    with pytest.raises(ValueError, match="unknown"):
        gmm(lhs, w, gs, implementation="cublas")
    with pytest.raises(ValueError, match="K=4"):
        gmm(lhs, w, gs, transpose_rhs=True)
    with pytest.raises(ValueError, match="group_sizes"):
        gmm(lhs, w, gs[:2])
    with pytest.raises(ValueError, match="group_sizes"):
        gmm(lhs, w, gs.astype(jnp.float32))
    with pytest.raises(ValueError, match="expert_ids"):
        gmv(lhs, w, gs)
    with pytest.raises(ValueError, match="powers of two"):
        gmm_triton.gmm(lhs, w, gs, config=gmm_triton.Config(block_m=24), interpret=True)


def test_tile_schedule_covers_every_row_once():
    """The Triton schedule: each row in exactly one tile of its own group (the pseudo-group G
    for rows past the sum), spare programs idle, within the static bound."""
    sizes, m, bm = [0, 17, 16, 0, 1, 5], 50, 16
    group, start, end = (
        np.asarray(a) for a in gmm_triton.tile_schedule(jnp.array(sizes, jnp.int32), m, bm)
    )
    assert group.shape == (gmm_triton.num_tiles(m, len(sizes), bm),)
    owner = np.full(m, -1)
    for g_, s, e in zip(group, start, end):
        if g_ <= len(sizes):
            rows = np.arange(s, min(s + bm, e))
            assert np.all(owner[rows] == -1)
            owner[rows] = g_
    assert owner.tolist() == np.repeat(np.arange(7), sizes + [m - sum(sizes)]).tolist()


def test_default_tiles_of_wide_outputs_match_the_loops():
    """The Triton kernels' default tiles for wide outputs (256 columns when groups fill 128-row
    tiles and N >= WIDE_N), in interpret mode: gmm and tgmm equal the per-group loops."""
    sizes, k, n = [128, 0, 160], 16, gmm_triton.WIDE_N
    m = sum(sizes)
    assert gmm_triton.default_config(m, len(sizes), n).block_n == 256
    assert gmm_triton.default_tgmm_config(n).block_n == 256
    assert gmm_triton.default_config(8, len(sizes), n).block_n == 128  # decode-sized rows
    lhs, rhs, grad = (jnp.asarray(x) for x in normals(0, (m, k), (len(sizes), k, n), (m, n)))
    gs = jnp.array(sizes, jnp.int32)
    got = gmm_triton.gmm(lhs, rhs, gs, interpret=True)
    assert _rel(got, _loop_gmm(lhs, rhs, sizes)) <= 1e-5
    got_t = gmm_triton.tgmm(lhs, grad, gs, interpret=True)
    assert _rel(got_t, _loop_tgmm(lhs, grad, sizes)) <= 1e-5


def test_triton_kernels_lower_for_cuda(monkeypatch):
    """The Pallas -> Triton-IR lowering on CPU given an H100 description (catches what only
    interpret mode accepts): gmm forward and backward, tgmm, gmv, at the default tiles."""
    from jax._src.pallas.triton import gpu_info
    from jax._src.pallas.triton import pallas_call_registration as reg

    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info", lambda: h100)
    S = jax.ShapeDtypeStruct
    m, k, n, g = 1000, 256, 384, 8

    def step(lhs, w, gs, ids):
        loss = lambda a, b: (
            gmm(a, b, gs, implementation="pallas_triton", interpret=False).astype(jnp.float32).sum()
        )
        grads = jax.value_and_grad(loss, argnums=(0, 1))(lhs, w)  # value: keep the forward
        dec = gmv(lhs[:8], w, ids, implementation="pallas_triton", interpret=False)
        dec_t = gmv(
            jnp.ones((8, n), lhs.dtype),
            w,
            ids,
            implementation="pallas_triton",
            transpose_rhs=True,
            interpret=False,
        )  # w read as [G, N=256, K=384]
        return grads, dec, dec_t

    text = (
        jax.jit(step)
        .trace(
            S((m, k), jnp.bfloat16),
            S((g, k, n), jnp.bfloat16),
            S((g,), jnp.int32),
            S((8,), jnp.int32),
        )
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert text.count("__gpu$xla.gpu.triton") == 5  # gmm, d lhs gmm, tgmm, two gmv


def test_gmm_bench_cpu_preset(tmp_path):
    from experiments.moe import gmm_bench

    assert (
        gmm_bench.main(
            [
                "--preset",
                "cpu",
                "--gemms",
                "down",
                "--reps",
                "1",
                "--inner",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    text = (tmp_path / "gmm_bench.md").read_text()
    for impl in ("ours (pallas_triton)", "dense matmul", "ragged_dot", "gmv (pallas_triton)"):
        assert f"| {impl} |" in text, impl
    assert text.count("| fwd+bwd |") == 3


# ---- native GPU (skipped on CPU) -------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("transpose_rhs", [False, True])
@pytest.mark.parametrize(
    "sizes",
    [[300, 0, 1, 1200, 0, 77, 500, 0, 129, 600], [0, 0, 0, 2900, 0, 0, 0, 0, 0, 0]],
    ids=["routed", "one_group"],
)
def test_gmm_native_gpu(sizes, transpose_rhs):
    """The Pallas-Triton kernels compiled for the GPU at their default tiles (bf16, K and N
    multiples of the tiles as in the MoE shapes; NaN rows past the sum, NaN empty experts)."""
    lhs, lhs_nan, w, w_nan, ct, gs = _case(sizes, 3000, 256, 384, jnp.bfloat16, transpose_rhs)

    def fwd_bwd(f, a, b):
        out, vjp = jax.vjp(f, a, b)
        return (out, *vjp(ct.astype(out.dtype)))

    got = jax.jit(
        lambda a, b: fwd_bwd(
            lambda x, y: gmm(x, y, gs, implementation="pallas_triton", transpose_rhs=transpose_rhs),
            a,
            b,
        )
    )(lhs_nan, w_nan)
    up = lambda x: x.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
        want = fwd_bwd(
            lambda x, y: gmm_reference(x, y, gs, transpose_rhs=transpose_rhs), up(lhs), up(w)
        )
    for name, g, r in zip(("out", "d_lhs", "d_rhs"), got, want):
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        assert _rel(g, r) <= 2e-2, (name, _rel(g, r))


@pytest.mark.gpu
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gmv_native_gpu(transpose_rhs):
    g, k, n = 16, 512, 768
    ids = jnp.array([3, 0, 3, -1, 15, 9, 0, 7] * 4, jnp.int32)
    ks = jax.random.split(jax.random.PRNGKey(5), 2)
    x = jax.random.normal(ks[0], (ids.shape[0], k), jnp.bfloat16)
    w = (jax.random.normal(ks[1], (g, k, n)) * k**-0.5).astype(jnp.bfloat16)
    if transpose_rhs:
        w = jnp.swapaxes(w, 1, 2)
    got = jax.jit(
        lambda a, b: gmv(a, b, ids, implementation="pallas_triton", transpose_rhs=transpose_rhs)
    )(x, w)
    with jax.default_matmul_precision("highest"):
        want = gmv_reference(
            x.astype(jnp.float32), w.astype(jnp.float32), ids, transpose_rhs=transpose_rhs
        )
    assert _rel(got, want) <= 2e-2
