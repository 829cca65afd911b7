"""Ragged paged attention (`pallas_kernels/ragged_paged_attention`): the reference against a
dense per-sequence computation, the ops' conformance tests (every backend the registry lists
against the reference; kernels in interpret mode on CPU), the page writes, the dispatch, the
Triton lowering for a CUDA target, and the benchmark's CPU preset.

Batches are built from per-sequence "logical" K/V scattered into shuffled pages.  Every slot
no sequence owns holds NaN (the null page 0, page tails past a sequence's length, spare pages,
pages a sliding window released, the other layers of a stacked pool): a read of any of them
that reaches the output poisons it.
"""

from __future__ import annotations

import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import api, registry
from pallas_kernels.flash_attention.reference import attention_reference
from pallas_kernels.ragged_paged_attention import mosaic_tpu as rpa_tpu
from pallas_kernels.ragged_paged_attention import pallas_triton as rpa_triton
from pallas_kernels.ragged_paged_attention.api import RAGGED, RAGGED_MLA
from pallas_kernels.ragged_paged_attention.common import RaggedCall
from pallas_kernels.ragged_paged_attention.reference import (
    ragged_paged_attention_reference,
    ragged_paged_mla_reference,
    write_kv_pages,
    write_mla_pages,
)
from tests.pallas_kernels.conformance import only

F32_TOL = 1e-5
BF16_TOL = 2e-2  # bf16 operands (the kernels' p @ V in bf16, the reference's in float32)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert not np.isnan(a).any(), "NaN in the output"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_batch(
    seed,
    seqs,
    *,
    pad_seqs=0,
    pad_tokens=0,
    page_size=16,
    h=4,
    kh=2,
    d=16,
    mla=None,
    dtype=jnp.float32,
    n_layers=None,
    layer=1,
    window=None,
):
    """A flat ragged batch over shuffled pages.

    seqs: (q_len, seq_len) per real sequence: its last q_len of seq_len tokens are new.
    mla: (R, Dr) for latent / rope pools instead of K/V.  n_layers: stacked pools with the
    batch's pages in layer `layer`.  window: page-table entries of pages wholly before the
    first new token's window point at the null page (the engine frees them).
    Returns a dict: q (a tuple of query arrays), pools (a tuple), page_tables, seq_lens,
    qsl (query_start_loc), layer, and `logical` per sequence: its [seq_len, ...] arrays."""
    rng = np.random.default_rng(seed)
    widths = [(kh, d), (kh, d)] if mla is None else [(mla[0],), (mla[1],)]
    n_need = [-(-n // page_size) for _, n in seqs]
    max_pages = max(n_need) + 1  # one 0-padded column in every row
    num_pages = 1 + sum(n_need) + 3  # the null page, the pages in use, 3 spare
    order = rng.permutation(np.arange(1, num_pages))  # shuffled: no sequence is contiguous
    s = len(seqs) + pad_seqs
    tables = np.zeros((s, max_pages), np.int32)
    pools = [np.full((num_pages, page_size, *w), np.nan, np.float32) for w in widths]
    logical, qsl, used = [], [0], 0
    for i, (q_len, n) in enumerate(seqs):
        pages = order[used : used + n_need[i]]
        used += n_need[i]
        tables[i, : len(pages)] = pages
        vals = [rng.standard_normal((n, *w)).astype(np.float32) for w in widths]
        for pool, val in zip(pools, vals):
            pool[pages[np.arange(n) // page_size], np.arange(n) % page_size] = val
        if window is not None:
            first = n - q_len
            freed = (np.arange(len(pages)) + 1) * page_size <= first - window + 1
            tables[i, : len(pages)][freed] = 0
        logical.append(vals)
        qsl.append(qsl[-1] + q_len)
    qsl += [qsl[-1]] * pad_seqs
    t = qsl[-1] + pad_tokens
    q_widths = [d] if mla is None else list(mla)
    qs = [rng.standard_normal((t, h, w)).astype(np.float32) for w in q_widths]
    if n_layers is not None:
        stacked = [np.full((n_layers, *p.shape), np.nan, np.float32) for p in pools]
        for st, p in zip(stacked, pools):
            st[layer] = p
        pools = stacked
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return dict(
        q=tuple(map(cast, qs)),
        pools=tuple(map(cast, pools)),
        page_tables=jnp.asarray(tables),
        seq_lens=jnp.asarray([n for _, n in seqs] + [0] * pad_seqs, jnp.int32),
        qsl=jnp.asarray(qsl, jnp.int32),
        seqs=seqs,
        logical=logical,
        layer=layer if n_layers is not None else None,
    )


def _args(b):
    return (*b["q"], *b["pools"], b["page_tables"], b["seq_lens"], b["qsl"])


# A mixed step: a fresh prefill chunk longer than a q tile, a chunk continuing a partly
# computed prompt (its context starts mid-page), decode tokens (one at a page's last slot,
# one a page's first), then padding sequences and padding tokens.
MIXED = [(20, 20), (9, 40), (1, 37), (1, 16), (1, 17), (5, 5)]
# (name, batch kwargs, call kwargs, Pallas-Triton config)
CASES = [
    (
        "mixed_p16_gqa4_f32_layer",
        dict(seqs=MIXED, pad_seqs=2, pad_tokens=3, h=8, kh=2, n_layers=3),
        dict(),
        rpa_triton.Config(block_k=16, num_splits=3),
    ),
    (
        "mixed_p64_gqa1_bf16_window_softcap",
        dict(
            seqs=MIXED,
            pad_seqs=1,
            pad_tokens=5,
            page_size=64,
            h=2,
            kh=2,
            dtype=jnp.bfloat16,
            window=7,
        ),
        dict(sliding_window=7, softcap=2.0, scale=0.3),
        rpa_triton.Config(block_k=32),
    ),
    # a group of 3 query heads: rows not a power of two (5 tokens x 3 heads in 16 rows)
    (
        "decode_b1_long_p128_gqa3",
        dict(seqs=[(1, 700)], page_size=128, h=6, kh=2, n_layers=2, layer=0),
        dict(),
        None,
    ),
]


@functools.cache
def _gqa_case(name):
    """(batch, call kwargs, Pallas-Triton config, dtype, the reference's output as float32),
    built once per case for every test that uses it."""
    _, bkw, ckw, cfg = next(c for c in CASES if c[0] == name)
    b = make_batch(0, **bkw)
    want = jax.jit(lambda *a: ragged_paged_attention_reference(*a, layer=b["layer"], **ckw))(
        *_args(b)
    )
    return b, ckw, cfg, bkw.get("dtype", jnp.float32), np.asarray(want, np.float32)


def _dense_per_sequence(b, **kw) -> list[np.ndarray]:
    """`attention_reference` over each sequence's contiguous K/V ([q_len, H, D] per sequence).

    All sequences run as one batch (one compile): queries and keys are left-padded to the
    longest, which keeps every new token's bottom-right-aligned position, and segment ids
    mask the padding (padded query rows see nothing)."""
    (q,) = b["q"]
    qsl = np.asarray(b["qsl"])
    q_max = max(n for n, _ in b["seqs"])
    kv_max = max(n for _, n in b["seqs"])
    s, (_, h, d), kh = len(b["seqs"]), q.shape, b["logical"][0][0].shape[1]
    qp = np.zeros((s, q_max, h, d), np.float32)
    kp, vp = (np.zeros((s, kv_max, kh, d), np.float32) for _ in "kv")
    q_seg = np.full((s, q_max), 2, np.int32)
    kv_seg = np.zeros((s, kv_max), np.int32)
    for i, ((q_len, n), (k, v)) in enumerate(zip(b["seqs"], b["logical"])):
        qp[i, q_max - q_len :] = np.asarray(q[qsl[i] : qsl[i + 1]], np.float32)
        q_seg[i, q_max - q_len :] = 1
        kp[i, kv_max - n :], vp[i, kv_max - n :], kv_seg[i, kv_max - n :] = k, v, 1
    out = jax.jit(
        lambda q, k, v, qs, ks: attention_reference(
            q, k, v, causal=True, segment_ids=qs, kv_segment_ids=ks, **kw
        )
    )(qp, kp, vp, q_seg, kv_seg)
    return [np.asarray(out[i, q_max - q_len :]) for i, (q_len, _) in enumerate(b["seqs"])]


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_reference_matches_dense_attention(case):
    """The paged reference equals attention over each sequence's contiguous K/V, its new
    tokens bottom-right aligned (`attention_reference`, whose window counts the keys before
    the token: ours minus one); padding tokens give 0."""
    b, ckw, _, _, out = _gqa_case(case)
    window = ckw.get("sliding_window")
    dense = _dense_per_sequence(
        b,
        scale=ckw.get("scale"),
        softcap=ckw.get("softcap"),
        sliding_window=None if window is None else window - 1,
    )
    # bf16: the pages hold rounded K/V, the logical arrays the float32 originals
    tol = F32_TOL if b["q"][0].dtype == jnp.float32 else BF16_TOL
    qsl = np.asarray(b["qsl"])
    for i, want in enumerate(dense):
        assert _rel(out[qsl[i] : qsl[i + 1]], want) <= tol
    np.testing.assert_array_equal(out[qsl[-1] :], 0.0)


# Interpret mode compiles slowly on CPU: "xla" (the reference itself, through the dispatch)
# runs one case; Mosaic TPU, which has no KV split, the two mixed ones; Pallas-Triton all.
RUNS = {"xla": {CASES[2][0]}, "mosaic_tpu": {CASES[0][0], CASES[1][0]}}
MLA_RUNS = {"xla": {"r160_dr32_splits"}, "mosaic_tpu": {"r160_dr32_splits"}}


@pytest.mark.parametrize("impl", RAGGED.names)
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_ragged_paged_attention_conformance(impl, case):
    """Every backend against the reference, padding tokens included (finite)."""
    only(impl, case, RUNS)
    b, ckw, cfg, dtype, want = _gqa_case(case)
    config = cfg if impl == "pallas_triton" else None
    # the layer index traced, as inside the model's layer scan
    got = jax.jit(
        lambda lay: api.ragged_paged_attention(
            *_args(b), layer=lay, implementation=impl, interpret=True, config=config, **ckw
        )
    )(b["layer"])
    assert got.shape == b["q"][0].shape and got.dtype == dtype
    assert _rel(got, want) <= (F32_TOL if dtype == jnp.float32 else BF16_TOL)


MLA_CASES = [
    ("r160_dr32_splits", dict(mla=(160, 32), h=4, n_layers=2), rpa_triton.Config(num_splits=2)),
    # 6 heads in blocks of 4: the second block's last two rows are padding
    (
        "r64_dr16_xla_merge",
        dict(mla=(64, 16), h=6, page_size=64),
        rpa_triton.Config(num_splits=2, merge="xla", block_h=4),
    ),
]
MLA_SEQS = [(20, 20), (9, 40), (1, 37), (1, 16)]


@functools.cache
def _mla_case(name):
    """(batch, Pallas-Triton config, the reference's output), once per case."""
    _, bkw, cfg = next(c for c in MLA_CASES if c[0] == name)
    b = make_batch(1, MLA_SEQS, pad_seqs=1, pad_tokens=2, **bkw)
    want = jax.jit(lambda *a: ragged_paged_mla_reference(*a, scale=0.2, layer=b["layer"]))(
        *_args(b)
    )
    return b, cfg, np.asarray(want)


@pytest.mark.parametrize("case", [c[0] for c in MLA_CASES])
def test_mla_reference_matches_dense(case):
    b, _, out = _mla_case(case)
    ql, qr = b["q"]
    qsl = np.asarray(b["qsl"])
    for s, ((q_len, n), (c, kr)) in enumerate(zip(b["seqs"], b["logical"])):
        sl = slice(qsl[s], qsl[s + 1])
        logits = 0.2 * (np.einsum("thr,jr->thj", ql[sl], c) + np.einsum("thr,jr->thj", qr[sl], kr))
        pos = n - q_len + np.arange(q_len)
        logits = np.where(np.arange(n) <= pos[:, None, None], logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        dense = np.einsum("thj,jr->thr", p / p.sum(-1, keepdims=True), c)
        assert _rel(out[sl], dense) <= F32_TOL
    np.testing.assert_array_equal(np.asarray(out[qsl[-1] :]), 0.0)


@pytest.mark.parametrize("impl", RAGGED_MLA.names)
@pytest.mark.parametrize("case", [c[0] for c in MLA_CASES])
def test_ragged_paged_mla_conformance(impl, case):
    only(impl, case, MLA_RUNS)  # one MLA case in TPU interpret mode (slow) and through XLA
    b, cfg, want = _mla_case(case)
    got = jax.jit(
        lambda *a: api.ragged_paged_mla_attention(
            *a,
            scale=0.2,
            layer=b["layer"],
            implementation=impl,
            interpret=True,
            config=cfg if impl == "pallas_triton" else None,
        )
    )(*_args(b))
    assert got.shape == b["q"][0].shape
    assert _rel(got, want) <= F32_TOL


def test_tpu_work_items_cover_every_q_block_once_in_order():
    """The TPU kernel's work items: q blocks in order, each with its intersecting sequences
    (empty ones skipped), first / last flags on its first / last item, the KV ranges."""
    qsl = jnp.array([0, 20, 20, 23, 40, 40], jnp.int32)  # sequences 1 and 4 have no token
    lens = jnp.array([20, 5, 30, 17, 0], jnp.int32)
    # (under jax.jit: op by op, each of its few dozen ops would be compiled on its own)
    items = jax.jit(rpa_tpu.work_items, static_argnums=(2, 3, 4))(qsl, lens, 3, 16, 4)
    meta = np.asarray(items).reshape(-1, rpa_tpu._FIELDS)
    f = {
        name: meta[:, i]
        for i, name in enumerate(
            ["qb", "seq", "lo", "hi", "pos", "kv_lo", "kv_hi", "first", "last"]
        )
    }
    real = f["hi"] > f["lo"]
    got = [tuple(int(f[k][i]) for k in ("qb", "seq", "lo", "hi")) for i in np.flatnonzero(real)]
    # block 0: seq 0 tokens 0..15; block 1: seq 0 16..19, seq 2 20..22, seq 3 23..31;
    # block 2: seq 3 32..39 (tokens 40..47 are padding)
    assert got == [(0, 0, 0, 16), (1, 0, 16, 20), (1, 2, 20, 23), (1, 3, 23, 32), (2, 3, 32, 40)]
    assert list(f["qb"]) == sorted(f["qb"])  # items of one q block are consecutive
    # block 1's items: seq 0, the empty seq 1 (an item with no token), seq 2, seq 3
    assert list(np.flatnonzero(f["first"])) == [0, 1, 5]
    assert list(np.flatnonzero(f["last"])) == [0, 4, len(real) - 1]  # unused items: block 2
    i = np.flatnonzero(real)[2]  # seq 2: 3 new tokens ending at 30 -> positions 27..29,
    assert (f["pos"][i], f["kv_lo"][i], f["kv_hi"][i]) == (27, 24, 30)  # window 4 from 27


def test_write_kv_pages_writes_only_the_mapped_slots():
    """write_kv_pages puts token t at flat slot slot_mapping[t] of layer `layer` (padding
    tokens into the null page); every other slot and layer keeps its contents (NaN here)."""
    page, n_layers, kh, d = 4, 2, 2, 8
    k = jnp.full((n_layers, 6, page, kh, d), jnp.nan)
    table = np.array([3, 5, 1])  # a 9-token prompt in pages 3, 5, 1
    slots = np.concatenate(
        [table[np.arange(9) // page] * page + np.arange(9) % page, [0, 1]]
    )  # two padding tokens -> the null page
    rng = np.random.default_rng(3)
    k_new, v_new = (rng.standard_normal((11, kh, d)).astype(np.float32) for _ in "kv")
    k2, v2 = jax.jit(write_kv_pages)(k, k, k_new, v_new, jnp.asarray(slots), 1)
    for pages, new in ((k2, k_new), (v2, v_new)):
        flat = np.asarray(pages[1]).reshape(-1, kh, d)
        np.testing.assert_array_equal(flat[slots[:9]], new[:9])
        untouched = np.ones(len(flat), bool)
        untouched[slots] = False
        assert np.isnan(flat[untouched]).all() and np.isnan(np.asarray(pages[0])).all()
    lat, rope = jax.jit(write_mla_pages)(
        jnp.zeros((5, page, 6)),
        jnp.zeros((5, page, 2)),
        jnp.ones((2, 6)),
        2 * jnp.ones((2, 2)),
        jnp.array([5, 18]),
    )
    lat, rope = np.asarray(lat), np.asarray(rope)
    assert lat[1, 1].sum() == 6 and lat[4, 2].sum() == 6 and lat.sum() == 12
    assert rope[1, 1].sum() == 4 and rope.sum() == 8


def test_auto_dispatch_logs_once_per_reason(caplog, monkeypatch):
    monkeypatch.setattr(registry, "LOGGED", set())
    monkeypatch.setattr(registry, "platform", lambda: "cpu")  # (on a GPU host too)
    b, _, _, _, want = _gqa_case("decode_b1_long_p128_gqa3")
    with caplog.at_level(logging.INFO, logger="pallas_kernels"):
        for _ in range(2):  # two traces, one log line
            out = jax.jit(lambda *a: api.ragged_paged_attention(*a, layer=b["layer"]))(*_args(b))
    lines = [r.getMessage() for r in caplog.records if "ragged_paged_attention" in r.getMessage()]
    assert lines == [
        "ragged_paged_attention: xla (on cpu; pallas_triton: not on a GPU; "
        "mosaic_tpu: not on a TPU)"
    ]
    assert _rel(out, want) <= F32_TOL
    with pytest.raises(ValueError, match="unknown; choose one of"):
        api.ragged_paged_attention(*_args(b), layer=b["layer"], implementation="cudnn")


def test_bad_shapes_are_refused():
    b = _gqa_case("decode_b1_long_p128_gqa3")[0]
    q, k, v, tables, lens, qsl = _args(b)
    with pytest.raises(ValueError, match="kv heads 2 must divide query heads 3"):
        api.ragged_paged_attention(
            q[:, :3], k, v, tables, lens, qsl, layer=0, implementation="pallas_triton"
        )
    with pytest.raises(ValueError, match=r"seq_lens must be \[1\] and query_start_loc \[2\]"):
        rpa_tpu.ragged_paged_attention(RaggedCall(q, k, v, tables, lens, qsl[:1], layer=0))
    with pytest.raises(ValueError, match="sliding_window=0 must be >= 1"):
        api.ragged_paged_attention(q, k, v, tables, lens, qsl, layer=0, sliding_window=0)
    with pytest.raises(ValueError, match="block_q=8 must be a power of two >= 16"):
        api.ragged_paged_attention(
            q,
            k,
            v,
            tables,
            lens,
            qsl,
            layer=0,
            implementation="mosaic_tpu",
            config=rpa_tpu.Config(block_q=8),
        )


def test_triton_kernels_lower_for_cuda(monkeypatch):
    """The Pallas -> Triton-IR lowering on CPU for an H100: the GQA kernel (window, softcap,
    bf16, split and unsplit) and the MLA kernel with a non-power-of-two latent; the stacked
    pools reach the kernel whole (no slice or copy of a layer)."""
    from jax._src.pallas.triton import gpu_info
    from jax._src.pallas.triton import pallas_call_registration as reg

    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info", lambda: h100)
    sd, i32, bf = jax.ShapeDtypeStruct, jnp.int32, jnp.bfloat16
    t, s, h, kh, d, page, pool, n_layers, width = 64, 8, 32, 8, 128, 16, 64, 4, 16
    pools = sd((n_layers, pool, page, kh, d), bf)

    def step(q, k, v, tables, lens, qsl, lay, ql, qr, lat, rope):
        kw = dict(layer=lay, implementation="pallas_triton", interpret=False)
        return (
            api.ragged_paged_attention(
                q,
                k,
                v,
                tables,
                lens,
                qsl,
                sliding_window=100,
                softcap=30.0,
                config=rpa_triton.Config(num_splits=1),
                **kw,
            ),
            api.ragged_paged_attention(q[:8], k, v, tables, lens, qsl, **kw),
            api.ragged_paged_mla_attention(ql, qr, lat, rope, tables, lens, qsl, scale=0.1, **kw),
        )

    lowered = (
        jax.jit(step)
        .trace(
            sd((t, h, d), bf),
            pools,
            pools,
            sd((s, width), i32),
            sd((s,), i32),
            sd((s + 1,), i32),
            sd((), i32),
            sd((t, 16, 160), bf),
            sd((t, 16, 32), bf),
            sd((n_layers, pool, page, 160), bf),
            sd((n_layers, pool, page, 32), bf),
        )
        .lower(lowering_platforms=("cuda",))
    )
    # the unsplit call is one kernel; the decode-like and MLA calls split (kernel + merge)
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 5
    ops = [
        op
        for f in lowered.compiler_ir("stablehlo").body.operations
        for region in f.regions
        for block in region.blocks
        for op in block.operations
    ]
    rows = n_layers * pool * page
    whole = {
        f"tensor<{n_layers}x{pool}x{page}x{kh}x{d}xbf16>",
        f"tensor<{rows}x{kh * d}xbf16>",
        f"tensor<{n_layers}x{pool}x{page}x160xbf16>",
        f"tensor<{rows}x160xbf16>",
        f"tensor<{n_layers}x{pool}x{page}x32xbf16>",
        f"tensor<{rows}x32xbf16>",
    }
    readers = {op.operation.name for op in ops if any(str(x.type) in whole for x in op.operands)}
    assert readers == {"stablehlo.reshape", "stablehlo.custom_call"}  # no slice, no copy


@pytest.mark.gpu
@pytest.mark.parametrize("page_size,window", [(16, None), (64, 100), (128, None)])
def test_triton_kernel_native_gpu(page_size, window):
    """The compiled kernels on a GPU at model shapes (bf16, head_dim 128, GQA 32/8; MLA with
    a 160-wide and a 512-wide latent): a mixed step and a batch-1 decode (many KV splits)."""
    seqs = [(200, 200), (77, 1000), (1, 3000), (1, 64), (1, 65), (1, 1)]
    for batch in (
        make_batch(
            2,
            seqs,
            pad_seqs=3,
            pad_tokens=9,
            page_size=page_size,
            h=32,
            kh=8,
            d=128,
            dtype=jnp.bfloat16,
            n_layers=2,
            window=window,
        ),
        make_batch(3, [(1, 5000)], page_size=page_size, h=32, kh=8, d=128, dtype=jnp.bfloat16),
    ):
        want = ragged_paged_attention_reference(
            *_args(batch), layer=batch["layer"], sliding_window=window
        )
        got = jax.jit(
            lambda *a: api.ragged_paged_attention(
                *a, layer=batch["layer"], sliding_window=window, implementation="pallas_triton"
            )
        )(*_args(batch))
        assert _rel(got, want) <= BF16_TOL
    for mla in ((160, 32), (512, 64)):
        batch = make_batch(
            4,
            seqs,
            pad_seqs=1,
            pad_tokens=3,
            page_size=page_size,
            h=16,
            mla=mla,
            dtype=jnp.bfloat16,
        )
        want = ragged_paged_mla_reference(*_args(batch), scale=0.05)
        got = jax.jit(
            lambda *a: api.ragged_paged_mla_attention(
                *a, scale=0.05, implementation="pallas_triton"
            )
        )(*_args(batch))
        assert _rel(got, want) <= BF16_TOL


def test_bench_cpu_preset(tmp_path):
    from experiments.engine import rpa_bench

    assert rpa_bench.main(["--preset", "cpu", "--out", str(tmp_path / "rpa")]) == 0
    text = (tmp_path / "rpa.md").read_text()
    assert "ragged pallas_triton" in text and "contiguous decode pallas_triton" in text
    assert "flash prefill + decode" in text
    rows = json.loads((tmp_path / "rpa.json").read_text())["rows"]
    assert not [r for r in rows if "note" in r]  # every variant ran
    checked = [r["rel_err"] for r in rows if "rel_err" in r]
    assert len(checked) == len(rows) - 2 and max(checked) < 1e-4  # all but the 2 baselines
