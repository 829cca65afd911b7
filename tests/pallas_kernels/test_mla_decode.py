"""MLA latent decode at the widths CARE conversions produce (latent ranks like 160, 187 or 352,
rope keys of 16-64), against the pure-jnp reference: the kernels in interpret mode, their GPU /
TPU lowerings, "auto"'s dispatch and its log, and the kernel inside a tiny MLA model's decode.

Caches stack three layers with NaN outside the one read, hold S = 45 slots (not a multiple of
the 16-row test blocks) or 48, and rows are ragged: full, one slot, mid-block, a block edge.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import api
from pallas_kernels.decode_attention import mosaic_tpu as decode_tpu
from pallas_kernels.decode_attention import pallas_triton as decode_triton
from pallas_kernels.decode_attention.reference import mla_decode_reference

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # bf16: output rounding and bf16 softmax weights
IMPLS = {
    "pallas_triton": lambda *a, **kw: decode_triton.mla_decode_attention(
        *a, config=decode_triton.Config(block_k=16, num_splits=2), interpret=True, **kw),
    "pallas_triton_jnp_merge": lambda *a, **kw: decode_triton.mla_decode_attention(
        *a, config=decode_triton.Config(block_k=16, num_splits=2, merge="xla"), interpret=True,
        **kw),
    "mosaic_tpu": lambda *a, **kw: decode_tpu.mla_decode_attention(
        *a, config=decode_tpu.Config(block_k=16), interpret=True, **kw),
}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert not np.isnan(a).any(), "NaN in kernel output"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _case(r: int, dr: int, dtype, s: int = 45, h: int = 9, n_layers: int = 3, seed: int = 0):
    """(q_latent, q_rope, stacked latent cache, stacked rope cache, lengths, layer 1's caches)."""
    b = 4
    ks = jax.random.split(jax.random.PRNGKey(seed + r + dr), 4)
    ql = jax.random.normal(ks[0], (b, h, r)).astype(dtype)
    qr = jax.random.normal(ks[1], (b, h, dr)).astype(dtype)
    cache = jax.random.normal(ks[2], (b, s, r)).astype(dtype)
    rope = jax.random.normal(ks[3], (b, s, dr)).astype(dtype)
    c_all = jnp.full((n_layers, b, s, r), jnp.nan, dtype).at[1].set(cache)
    r_all = jnp.full((n_layers, b, s, dr), jnp.nan, dtype).at[1].set(rope)
    lengths = jnp.array([s, 1, 17, 32], jnp.int32)
    return ql, qr, c_all, r_all, lengths, cache, rope


def test_column_pieces_tile_every_width():
    """Pieces are powers of two (>= 16 when the row is), cover [0, n) and never pass column n;
    a piece's owned columns start where the previous piece ended."""
    for n in range(1, 700):
        pieces = decode_triton._column_pieces(n)
        end = 0
        for start, w, own in pieces:
            assert w & (w - 1) == 0 and (w >= 16 or n < 16), (n, pieces)
            assert 0 <= start and start + w <= n, (n, pieces)
            assert start + own == end, (n, pieces)
            end = start + w
        assert end == n, (n, pieces)
        assert sum(w - own for _, w, own in pieces) == n
    assert decode_triton._column_pieces(160) == ((0, 128, 0), (128, 32, 0))
    assert decode_triton._column_pieces(187) == ((0, 128, 0), (123, 64, 5))


@pytest.mark.parametrize("impl,r,dr,dtype,s,h", [
    ("pallas_triton", 160, 32, jnp.float32, 45, 9),
    ("pallas_triton", 187, 16, jnp.bfloat16, 45, 9),
    ("pallas_triton", 187, 32, jnp.float32, 48, 9),
    ("pallas_triton", 192, 64, jnp.bfloat16, 45, 9),
    ("pallas_triton", 352, 32, jnp.float32, 45, 9),
    ("pallas_triton", 128, 16, jnp.bfloat16, 48, 9),
    ("pallas_triton", 160, 32, jnp.float32, 45, 40),  # three head tiles of 16
    ("pallas_triton_jnp_merge", 187, 16, jnp.float32, 45, 9),
    ("mosaic_tpu", 160, 32, jnp.float32, 45, 9),
    ("mosaic_tpu", 187, 16, jnp.bfloat16, 48, 9),
    ("mosaic_tpu", 352, 64, jnp.bfloat16, 45, 9),
])
def test_mla_decode_any_width_matches_reference(impl, r, dr, dtype, s, h):
    ql, qr, c_all, r_all, lengths, cache, rope = _case(r, dr, dtype, s=s, h=h)
    out = jax.jit(lambda lay: IMPLS[impl](ql, qr, c_all, r_all, lengths, scale=0.1,
                                          layer=lay))(1)
    ref = mla_decode_reference(ql, qr, cache, rope, lengths, scale=0.1)
    assert out.shape == ql.shape and out.dtype == dtype
    assert _rel(out, ref) <= TOL[dtype]


def test_mla_block_k_keeps_wide_rows_in_shared_memory():
    cfg = decode_triton.Config()
    assert decode_triton.mla_block_k(cfg, 128 + 64, 2) == 128  # the measured pow2 shape
    assert decode_triton.mla_block_k(cfg, 352 + 32, 2) == 64
    assert decode_triton.mla_block_k(decode_triton.Config(block_k=16), 4096, 4) == 16


@pytest.mark.parametrize("r,dr", [(160, 32), (187, 16), (352, 32), (40, 8)])
def test_mla_decode_lowers_for_cuda(monkeypatch, r, dr):
    """The Triton lowering (run on CPU with an H100 description) accepts every width: each
    loaded or stored array is a power of two, which interpret mode does not check."""
    from jax._src.pallas.triton import gpu_info, pallas_call_registration as reg
    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info", lambda: h100)
    b, h, s, n_layers = 16, 9, 1000, 2
    S = jax.ShapeDtypeStruct
    f = lambda ql, qr, c, kr, lens, lay: decode_triton.mla_decode_attention(  # noqa: E731
        ql, qr, c, kr, lens, scale=0.1, layer=lay)
    text = jax.jit(f).trace(
        S((b, h, r), jnp.bfloat16), S((b, h, dr), jnp.bfloat16),
        S((n_layers, b, s, r), jnp.bfloat16), S((n_layers, b, s, dr), jnp.bfloat16),
        S((b,), jnp.int32), S((), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2  # the chunks' kernel and their merge


def test_mla_decode_lowers_for_tpu():
    """The Mosaic TPU kernel's blocks span whole rows, so unaligned widths lower (v5e)."""
    device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    b, h, s, r, dr = 16, 9, 1024, 187, 16
    S = jax.ShapeDtypeStruct
    f = lambda ql, qr, c, kr, lens, lay: decode_tpu.mla_decode_attention(  # noqa: E731
        ql, qr, c, kr, lens, scale=0.1, layer=lay)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(f).trace(
            S((b, h, r), jnp.bfloat16), S((b, h, dr), jnp.bfloat16),
            S((2, b, s, r), jnp.bfloat16), S((2, b, s, dr), jnp.bfloat16),
            S((b,), jnp.int32), S((), jnp.int32)).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 1


# ---- dispatch and its log ---------------------------------------------------------------------

@pytest.fixture
def fresh_log(monkeypatch, caplog):
    """An empty once-only registry (other tests may have logged the same choices) and caplog
    listening to the kernels' logger at INFO."""
    monkeypatch.setattr(api, "_LOGGED", set())
    monkeypatch.setattr(api, "CHOICES", {})
    caplog.set_level(logging.INFO, logger="pallas_kernels")
    return caplog


def _messages(caplog, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "pallas_kernels" and r.getMessage() == text]


def _trace(fn, *shapes) -> None:
    """Dispatch fn on float32 arrays of `shapes` under a fresh jit trace (the choice is made,
    and logged, while tracing; nothing runs)."""
    jax.jit(lambda *a: fn(*a)).trace(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes))


def test_auto_logs_each_choice_once(fresh_log):
    b, h, s, r, dr = 2, 3, 40, 160, 32
    for _ in range(2):
        _trace(lambda ql, qr, c, kr: api.mla_decode_attention(ql, qr, c, kr, jnp.array([5, 2]),
                                                              scale=0.1),
               (b, h, r), (b, h, dr), (b, s, r), (b, s, dr))
    assert len(_messages(fresh_log, "mla_decode_attention: xla (no GPU or TPU: cpu)")) == 1
    assert api.CHOICES["mla_decode_attention"] == ("xla", "no GPU or TPU: cpu")
    for _ in range(2):
        _trace(lambda q: api.attention(q, q, q, causal=True), (2, 5, 4, 8))
        _trace(lambda q: api.decode_attention(q[:, 0], q, q, jnp.array([5, 2])), (2, 5, 4, 8))
    assert len(_messages(fresh_log, "attention: xla (no GPU or TPU: cpu)")) == 1
    assert len(_messages(fresh_log, "decode_attention: xla (no GPU or TPU: cpu)")) == 1


def test_auto_on_gpu_runs_the_kernel_for_a_non_power_of_two_latent(fresh_log, monkeypatch):
    """What used to fall back to XLA on a GPU (R = 160) now takes the Pallas-Triton kernel."""
    monkeypatch.setattr(api, "_platform", lambda: "gpu")
    ql, qr, c_all, r_all, lengths, cache, rope = _case(160, 32, jnp.float32, h=3)
    out = api.mla_decode_attention(ql, qr, c_all, r_all, lengths, scale=0.1, layer=1,
                                   interpret=True)
    assert _messages(fresh_log, "mla_decode_attention: pallas_triton (GPU)")
    assert api.CHOICES["mla_decode_attention"] == ("pallas_triton", "GPU")
    ref = mla_decode_reference(ql, qr, cache, rope, lengths, scale=0.1)
    assert _rel(out, ref) <= TOL[jnp.float32]


def test_unfused_append_fallback_warns_once(fresh_log):
    """decode_attention_append with a head_dim the fused kernel lacks says so (a warning)."""
    b, s, h, kh, d = 2, 20, 4, 2, 24
    for _ in range(2):
        _trace(lambda *a: api.decode_attention_append(*a, jnp.array([3, 19]),
                                                       implementation="pallas_triton",
                                                       interpret=True),
               (b, h, d), (b, kh, d), (b, kh, d), (b, s, kh, d), (b, s, kh, d))
    text = ("decode_attention_append: pallas_triton, cache written by XLA "
            "(head_dim 24 is not a power of two)")
    records = _messages(fresh_log, text)
    assert len(records) == 1 and records[0].levelno == logging.WARNING


# ---- inside the model -------------------------------------------------------------------------

def _tiny_mla(r: int = 40, dr: int = 8):
    """A 2-layer MLA model, 3 heads, latent 40 + rope 8, latent norm on; random weights."""
    from jaxturbo.models.config import ModelConfig
    from jaxturbo.models.mla import MLAConfig
    from jaxturbo.models.init import init_params

    base = ModelConfig(model_type="llama", vocab_size=61, hidden_size=48, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3,
                       head_dim=16, max_position_embeddings=256)
    cfg = MLAConfig(base=base, kv_lora_rank=r, qk_nope_head_dim=16, qk_rope_head_dim=dr,
                    v_head_dim=16, latent_norm=True)
    key = jax.random.PRNGKey(5)
    p = init_params(base, key, jnp.float32)
    layers = {k: v for k, v in p["layers"].items()
              if not k.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))}
    n, h, d = base.num_hidden_layers, base.num_attention_heads, base.hidden_size
    shapes = {"self_attn.q_proj.weight": (n, h * (16 + dr), d),
              "self_attn.kv_a_proj_with_mqa.weight": (n, r + dr, d),
              "self_attn.kv_b_proj.weight": (n, h * 32, r)}
    for i, (name, shape) in enumerate(shapes.items()):
        layers[name] = 0.3 * jax.random.normal(jax.random.fold_in(key, i), shape)
    layers["self_attn.kv_a_layernorm.weight"] = 1 + 0.2 * jax.random.normal(
        jax.random.fold_in(key, 9), (n, r))
    return cfg, {**p, "layers": layers}


def test_mla_model_decode_with_the_kernel_matches_xla_and_naive():
    """Greedy decode steps of a tiny MLA model (latent 40, rope 8: no power of two) with the
    Pallas-Triton kernel (interpret mode) give the tokens and logits of the XLA absorbed path
    and of the expanded (naive) path."""
    from jaxturbo.models.mla import init_mla_cache, mla_forward

    cfg, params = _tiny_mla()
    b, prompt, steps, slots = 3, 7, 3, 150  # 150 slots: two 128-blocks, the last overhanging
    tokens = jax.random.randint(jax.random.PRNGKey(1), (b, prompt), 0, cfg.base.vocab_size)
    lengths = jnp.array([7, 4, 6], jnp.int32)
    cache = init_mla_cache(cfg, b, slots, jnp.float32)
    logits, cache = jax.jit(lambda p, t, c: mla_forward(p, cfg, t, cache=c, lengths=lengths,
                                                        attn_impl="xla"))(params, tokens, cache)
    first = jnp.argmax(logits[jnp.arange(b), lengths - 1], axis=-1).astype(jnp.int32)

    def run(attn_impl: str, absorb: bool):
        step = jax.jit(lambda p, t, c: mla_forward(p, cfg, t[:, None], cache=c,
                                                   attn_impl=attn_impl, absorb=absorb))
        tok, c, toks, outs = first, cache, [], []
        for _ in range(steps):
            lg, c = step(params, tok, c)
            tok = jnp.argmax(lg[:, 0], axis=-1).astype(jnp.int32)
            toks.append(np.asarray(tok))
            outs.append(np.asarray(lg[:, 0]))
        return np.stack(toks), np.stack(outs)

    kernel_toks, kernel_logits = run("pallas_triton", True)
    for attn_impl, absorb in (("xla", True), ("xla", False)):
        toks, lg = run(attn_impl, absorb)
        np.testing.assert_array_equal(kernel_toks, toks)
        np.testing.assert_allclose(kernel_logits, lg, atol=2e-4, rtol=0)
