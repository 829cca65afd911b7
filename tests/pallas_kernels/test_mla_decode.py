"""MLA latent decode at the widths CARE conversions produce (latent ranks like 160, 187 or 352,
rope keys of 16-64), against the pure-jnp reference: the op's conformance test over every
backend the registry lists (kernels in interpret mode), their GPU / TPU lowerings, "auto" on a
GPU, and the kernel inside a tiny MLA model's decode.

Caches stack three layers with NaN outside the one read, hold S = 45 slots (not a multiple of
the 16-row test blocks) or 48, and rows are ragged: full, one slot, mid-block, a block edge.
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
from pallas_kernels.decode_attention.api import MLA_DECODE
from pallas_kernels.decode_attention.reference import (
    decode_attention_reference,
    mla_decode_reference,
)
from tests.pallas_kernels.conformance import backends, normals, only, variant_name
from tests.pallas_kernels.conformance import rel as _rel

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # bf16: output rounding and bf16 softmax weights
CONFIGS = {
    "pallas_triton": {
        "": decode_triton.Config(block_k=16, num_splits=2),
        "jnp_merge": decode_triton.Config(block_k=16, num_splits=2, merge="xla"),
    },
    "mosaic_tpu": {"": decode_tpu.Config(block_k=16)},
}


def _case(r: int, dr: int, dtype, s: int = 45, h: int = 9, n_layers: int = 3, seed: int = 0):
    """(q_latent, q_rope, stacked latent cache, stacked rope cache, lengths, layer 1's caches)."""
    b = 4
    ql, qr, cache, rope = normals(seed + r + dr, (b, h, r), (b, h, dr), (b, s, r), (b, s, dr))
    c_all = np.full((n_layers, b, s, r), np.nan, np.float32)
    r_all = np.full((n_layers, b, s, dr), np.nan, np.float32)
    c_all[1], r_all[1] = cache, rope
    lengths = jnp.array([s, 1, 17, 32], jnp.int32)
    ql, qr, c_all, r_all, cache, rope = (
        jnp.asarray(x, dtype) for x in (ql, qr, c_all, r_all, cache, rope)
    )
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


# (name, R, Dr, dtype, S, H)
WIDTHS = [
    ("r160_dr32_f32", 160, 32, jnp.float32, 45, 9),
    ("r187_dr16_bf16", 187, 16, jnp.bfloat16, 45, 9),
    ("r187_dr32_f32_s48", 187, 32, jnp.float32, 48, 9),
    ("r192_dr64_bf16", 192, 64, jnp.bfloat16, 45, 9),
    ("r352_dr32_f32", 352, 32, jnp.float32, 45, 9),
    ("r128_dr16_bf16_s48", 128, 16, jnp.bfloat16, 48, 9),
    ("r160_dr32_f32_h40", 160, 32, jnp.float32, 45, 40),  # three head tiles of 16
    ("r187_dr16_f32", 187, 16, jnp.float32, 45, 9),
    ("r187_dr16_bf16_s48", 187, 16, jnp.bfloat16, 48, 9),
    ("r352_dr64_bf16", 352, 64, jnp.bfloat16, 45, 9),
]
# Interpret mode is slow: each backend runs the widths its reading of rows makes distinct
# (Pallas-Triton's column pieces; Mosaic TPU's whole rows), XLA one (its dispatch).
RUNS = {
    "pallas_triton": {w[0] for w in WIDTHS[:7]},
    "pallas_triton-jnp_merge": {"r187_dr16_f32"},
    "mosaic_tpu": {"r160_dr32_f32", "r187_dr16_bf16_s48", "r352_dr64_bf16"},
    "xla": {"r187_dr16_bf16"},
}


@pytest.mark.parametrize("impl,cfg", backends(MLA_DECODE, CONFIGS))
@pytest.mark.parametrize("case", [w[0] for w in WIDTHS])
def test_mla_decode_conformance(impl, cfg, case):
    """Every backend at any width, layer 1 of a stacked cache read in place (layer traced)."""
    _, r, dr, dtype, s, h = next(w for w in WIDTHS if w[0] == case)
    only(variant_name(impl, cfg, CONFIGS), case, RUNS)
    ql, qr, c_all, r_all, lengths, cache, rope = _case(r, dr, dtype, s=s, h=h)
    out = jax.jit(
        lambda lay: api.mla_decode_attention(
            ql,
            qr,
            c_all,
            r_all,
            lengths,
            scale=0.1,
            layer=lay,
            implementation=impl,
            config=cfg,
            interpret=True,
        )
    )(1)
    ref = mla_decode_reference(ql, qr, cache, rope, lengths, scale=0.1)
    assert out.shape == ql.shape and out.dtype == dtype
    assert _rel(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("impl,cfg", backends(MLA_DECODE, CONFIGS))
def test_mla_decode_one_layer_cache(impl, cfg):
    """An unstacked cache [B, S, R] (no layer): full, short and mid-length rows."""
    b, h, s, r, dr = 3, 5, 40, 32, 8
    ql, qr, cache, rope = map(jnp.asarray, normals(7, (b, h, r), (b, h, dr), (b, s, r), (b, s, dr)))
    lengths = jnp.array([40, 3, 21], jnp.int32)
    out = api.mla_decode_attention(
        ql, qr, cache, rope, lengths, scale=0.2, implementation=impl, config=cfg, interpret=True
    )
    ref = mla_decode_reference(ql, qr, cache, rope, lengths, scale=0.2)
    assert _rel(out, ref) <= TOL[jnp.float32]


def test_mla_reference_matches_expanded_attention():
    """The absorbed form equals ordinary attention with per-head keys W_UK c and values W_UV c."""
    b, h, s, r, dn, dr, dv = 2, 3, 11, 16, 8, 4, 8
    q_nope, q_rope, c, k_rope, w_uk, w_uv = normals(
        1, (b, h, dn), (b, h, dr), (b, s, r), (b, s, dr), (h, r, dn), (h, r, dv)
    )
    w_uk, w_uv = w_uk * 0.3, w_uv * 0.3
    lengths = jnp.array([11, 6])
    scale = (dn + dr) ** -0.5

    @jax.jit  # one program: op by op, each of these would be compiled on its own
    def absorbed_and_expanded(q_nope, q_rope, c, k_rope, w_uk, w_uv, lengths):
        out_latent = mla_decode_reference(
            jnp.einsum("bhn,hrn->bhr", q_nope, w_uk), q_rope, c, k_rope, lengths, scale=scale
        )
        out = jnp.einsum("bhr,hrv->bhv", out_latent, w_uv)
        k = jnp.concatenate(
            [
                jnp.einsum("bsr,hrn->bshn", c, w_uk),
                jnp.broadcast_to(k_rope[:, :, None], (b, s, h, dr)),
            ],
            -1,
        )
        v = jnp.einsum("bsr,hrv->bshv", c, w_uv)
        qf = jnp.concatenate([q_nope, q_rope], -1)
        pad = ((0, 0),) * 3 + ((0, dn + dr - dv),)
        ref = decode_attention_reference(
            qf,
            k,
            v[..., : dn + dr] if dv >= dn + dr else jnp.pad(v, pad),
            lengths,
            scale=scale,
        )[..., :dv]
        return out, ref

    out, ref = absorbed_and_expanded(q_nope, q_rope, c, k_rope, w_uk, w_uv, lengths)
    assert _rel(out, ref) <= 1e-5


def test_mla_block_k_keeps_wide_rows_in_shared_memory():
    cfg = decode_triton.Config()
    assert decode_triton.mla_block_k(cfg, 128 + 64, 2) == 128  # the measured pow2 shape
    assert decode_triton.mla_block_k(cfg, 352 + 32, 2) == 64
    assert decode_triton.mla_block_k(decode_triton.Config(block_k=16), 4096, 4) == 16


@pytest.mark.parametrize("r,dr", [(160, 32), (187, 16), (352, 32), (40, 8)])
def test_mla_decode_lowers_for_cuda(monkeypatch, r, dr):
    """The Triton lowering (run on CPU with an H100 description) accepts every width: each
    loaded or stored array is a power of two, which interpret mode does not check."""
    from jax._src.pallas.triton import gpu_info
    from jax._src.pallas.triton import pallas_call_registration as reg

    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info", lambda: h100)
    b, h, s, n_layers = 16, 9, 1000, 2
    S = jax.ShapeDtypeStruct
    f = lambda ql, qr, c, kr, lens, lay: api.mla_decode_attention(  # noqa: E731
        ql, qr, c, kr, lens, scale=0.1, layer=lay, implementation="pallas_triton", interpret=False
    )
    text = (
        jax.jit(f)
        .trace(
            S((b, h, r), jnp.bfloat16),
            S((b, h, dr), jnp.bfloat16),
            S((n_layers, b, s, r), jnp.bfloat16),
            S((n_layers, b, s, dr), jnp.bfloat16),
            S((b,), jnp.int32),
            S((), jnp.int32),
        )
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert text.count("__gpu$xla.gpu.triton") == 2  # the chunks' kernel and their merge


def test_mla_decode_lowers_for_tpu():
    """The Mosaic TPU kernel's blocks span whole rows, so unaligned widths lower (v5e)."""
    device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    b, h, s, r, dr = 16, 9, 1024, 187, 16
    S = jax.ShapeDtypeStruct
    f = lambda ql, qr, c, kr, lens, lay: api.mla_decode_attention(  # noqa: E731
        ql, qr, c, kr, lens, scale=0.1, layer=lay, implementation="mosaic_tpu", interpret=False
    )
    with jax.sharding.use_abstract_mesh(mesh):
        text = (
            jax.jit(f)
            .trace(
                S((b, h, r), jnp.bfloat16),
                S((b, h, dr), jnp.bfloat16),
                S((2, b, s, r), jnp.bfloat16),
                S((2, b, s, dr), jnp.bfloat16),
                S((b,), jnp.int32),
                S((), jnp.int32),
            )
            .lower(lowering_platforms=("tpu",))
            .as_text()
        )
    assert text.count("tpu_custom_call") == 1


# ---- "auto" on a GPU -------------------------------------------------------------------------


def test_auto_on_gpu_runs_the_kernel_for_a_non_power_of_two_latent(monkeypatch, caplog):
    """What used to fall back to XLA on a GPU (R = 160) takes the Pallas-Triton kernel."""
    monkeypatch.setattr(registry, "platform", lambda: "gpu")
    monkeypatch.setattr(registry, "LOGGED", set())
    caplog.set_level(logging.INFO, logger="pallas_kernels")
    ql, qr, c_all, r_all, lengths, cache, rope = _case(160, 32, jnp.float32, h=3)
    out = api.mla_decode_attention(
        ql, qr, c_all, r_all, lengths, scale=0.1, layer=1, interpret=True
    )
    assert "mla_decode_attention: pallas_triton (on gpu)" in [
        r.getMessage() for r in caplog.records
    ]
    assert registry.CHOICES["mla_decode_attention"] == ("pallas_triton", "on gpu")
    ref = mla_decode_reference(ql, qr, cache, rope, lengths, scale=0.1)
    assert _rel(out, ref) <= TOL[jnp.float32]


# ---- inside the model -------------------------------------------------------------------------


def _tiny_mla(r: int = 40, dr: int = 8):
    """A 2-layer MLA model, 3 heads, latent 40 + rope 8, latent norm on; random weights."""
    from jaxturbo.models.config import ModelConfig
    from jaxturbo.models.init import init_params
    from jaxturbo.models.mla import MLAConfig

    base = ModelConfig(
        model_type="llama",
        vocab_size=61,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=3,
        head_dim=16,
        max_position_embeddings=256,
    )
    cfg = MLAConfig(
        base=base,
        kv_lora_rank=r,
        qk_nope_head_dim=16,
        qk_rope_head_dim=dr,
        v_head_dim=16,
        latent_norm=True,
    )
    # (jitted, and the weights below drawn by numpy: eager random draws compile per shape)
    p = jax.jit(init_params, static_argnums=(0, 2))(base, jax.random.PRNGKey(5), jnp.float32)
    layers = {
        k: v
        for k, v in p["layers"].items()
        if not k.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    }
    n, h, d = base.num_hidden_layers, base.num_attention_heads, base.hidden_size
    shapes = {
        "self_attn.q_proj.weight": (n, h * (16 + dr), d),
        "self_attn.kv_a_proj_with_mqa.weight": (n, r + dr, d),
        "self_attn.kv_b_proj.weight": (n, h * 32, r),
    }
    *weights, norm = normals(5, *shapes.values(), (n, r))
    for name, w in zip(shapes, weights):
        layers[name] = jnp.asarray(0.3 * w)
    layers["self_attn.kv_a_layernorm.weight"] = jnp.asarray(1 + 0.2 * norm)
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
    logits, cache = jax.jit(
        lambda p, t, c: mla_forward(p, cfg, t, cache=c, lengths=lengths, attn_impl="xla")
    )(params, tokens, cache)
    first = jnp.argmax(logits[jnp.arange(b), lengths - 1], axis=-1).astype(jnp.int32)

    def run(attn_impl: str, absorb: bool):
        step = jax.jit(
            lambda p, t, c: mla_forward(
                p, cfg, t[:, None], cache=c, attn_impl=attn_impl, absorb=absorb
            )
        )
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
