"""Tensor parallelism on 8 fake CPU devices: every residual mode at TP 2 (KV heads split) and at
TP 4 or 8 (KV heads replicated), and the standard model at TP 1 too, equals the single-device
forward of the same mode (for `standard`: the foundation model's logits), for prefill and cached
decode (tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX
starts)."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxturbo.errors import UserError  # noqa: E402
from jaxturbo.inference.generation import generate  # noqa: E402
from jaxturbo.models.config import ModelConfig  # noqa: E402
from jaxturbo.models.transformer import forward, init_cache  # noqa: E402
from jaxturbo.parallel import tensor  # noqa: E402
from jaxturbo.parallel.mesh import make_mesh  # noqa: E402

# 8 query heads, 2 KV heads: TP 2 shards the KV heads, TP 4 and 8 replicate them.
TINY = ModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    ladder_layers=2,
)
MODES = ("standard", "parallel", "ladder", "hybrid")
PROMPT, MAX_LEN, STEPS = 6, 12, 2


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random weights of HF layout (norms away from 1 so they matter)."""
    from jaxturbo.bridge.hf import global_shapes, layer_shapes

    rng = np.random.RandomState(seed)

    def draw(shape, name):
        if "norm" in name:
            return jnp.asarray(1 + 0.2 * rng.randn(*shape), jnp.float32)
        return jnp.asarray(rng.randn(*shape) / np.sqrt(shape[-1]), jnp.float32)

    params = {n: draw(s, n) for n, s in global_shapes(cfg).items()}
    params["layers"] = {
        n: draw((cfg.num_hidden_layers, *s), n) for n, s in layer_shapes(cfg).items()
    }
    return params


def tp_mesh(tp: int):
    return make_mesh({"tensor": tp}, jax.devices()[:tp])


def prefill_decode(fwd, params, cfg, tokens, lengths, steps, kv_heads=None):
    """Prefill right-padded prompts into a cache, then `steps` cached decode steps.
    Returns (prefill logits [B, T, V], decode logits [steps, B, V])."""
    b, t = tokens.shape
    cache = init_cache(cfg, b, MAX_LEN, kv_heads=kv_heads)
    seg = (jnp.arange(t)[None] < lengths[:, None]).astype(jnp.int32)
    logits, cache = fwd(params, cfg, tokens, segment_ids=seg, cache=cache, lengths=lengths)

    def step(cache, tok):  # a scan, so the decode step compiles once
        lg, cache = fwd(params, cfg, tok[:, None], cache=cache)
        return cache, lg[:, 0]

    step_toks = (tokens[:, :steps].T * 7 + 3) % cfg.vocab_size  # fixed, mode-independent inputs
    _, dec = jax.lax.scan(step, cache, step_toks)
    return logits, dec


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.fixture(scope="module")
def setup():
    params = random_params(TINY)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 256, (2, PROMPT)), jnp.int32)
    lengths = jnp.asarray([PROMPT, PROMPT - 2], jnp.int32)
    return params, tokens, lengths


def _reference(params, cfg, tokens, lengths):
    fn = jax.jit(lambda p, t, n: prefill_decode(forward, p, cfg, t, n, STEPS))
    return fn(params, tokens, lengths)


@pytest.fixture(scope="module")
def references(setup):
    """The single-device (prefill, decode) logits of TINY in each residual mode, computed once
    for the module's tests (each is a compile)."""
    params, tokens, lengths = setup
    return {m: _reference(params, TINY.replace(residual_mode=m), tokens, lengths) for m in MODES}


# Each (mode, TP) is a compile of seconds, so the sizes are paired with the modes rather than
# crossed: the mode changes the layer's function and where it sums over the tensor axis, the
# size whether the KV heads are split (TP 2 of 2 KV heads) or replicated first (TP 4 and 8).
# Every mode runs both; TP 1 (a mesh of one device) runs the standard model.
TP_SIZES = {"standard": (1, 2, 8), "parallel": (2, 4), "ladder": (2, 8), "hybrid": (2, 4)}


@pytest.mark.parametrize("mode", MODES)
def test_tp_matches_single_device(setup, references, mode):
    params, tokens, lengths = setup
    cfg = TINY.replace(residual_mode=mode)
    ref_pre, ref_dec = references[mode]
    for tp in TP_SIZES[mode]:
        mesh = tp_mesh(tp)
        sp = tensor.shard_params(params, cfg, mesh)
        fwd = tensor.TensorParallel(mesh)
        heads = tensor.cache_kv_heads(cfg, tp)
        pre, dec = jax.jit(lambda p, t, n: prefill_decode(fwd, p, cfg, t, n, STEPS, heads))(
            sp, tokens, lengths
        )
        valid = np.arange(PROMPT)[None, :] < np.asarray(lengths)[:, None]
        assert _rel(pre[valid], ref_pre[valid]) <= 1e-5, (mode, tp)
        assert _rel(dec, ref_dec) <= 1e-5, (mode, tp)


def test_skip_allreduce_is_the_desync_bound(setup, references):
    """The benchmarks' desync variant (no all-reduces) equals the model at TP 1 and differs from
    it at TP 2, where each device's partial outputs are then never summed."""
    params, tokens, lengths = setup
    ref_pre, _ = references["standard"]
    valid = np.arange(PROMPT)[None, :] < np.asarray(lengths)[:, None]
    for tp in (1, 2):
        mesh = tp_mesh(tp)
        fwd = tensor.TensorParallel(mesh, skip_allreduce=True)
        heads = tensor.cache_kv_heads(TINY, tp)
        pre, _ = jax.jit(lambda p, t, n: prefill_decode(fwd, p, TINY, t, n, STEPS, heads))(
            tensor.shard_params(params, TINY, mesh), tokens, lengths
        )
        err = _rel(pre[valid], ref_pre[valid])
        assert (err <= 1e-5) if tp == 1 else (err > 1e-2), (tp, err)


def test_modes_differ(setup, references):
    """The equality above would pass vacuously if the modes computed the same function (the
    prefill logits, and the decode logits, of the single-device references differ)."""
    _, _, lengths = setup
    valid = np.arange(PROMPT)[None, :] < np.asarray(lengths)[:, None]
    std_pre, std_dec = references["standard"]
    for m in ("parallel", "ladder", "hybrid"):
        pre, dec = references[m]
        assert _rel(pre[valid], std_pre[valid]) > 1e-3, m
        assert _rel(dec, std_dec) > 1e-3, m


def test_unrolled_tp_and_9_3_heads_at_tp3():
    """SmolLM2-like 9 query / 3 KV heads at TP 3 (one KV head per device), layers unrolled."""
    cfg = ModelConfig(
        vocab_size=96,
        hidden_size=72,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=8,
        max_position_embeddings=64,
        residual_mode="ladder",
    )
    params = random_params(cfg, seed=3)
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 96, (2, PROMPT)), jnp.int32)
    lengths = jnp.asarray([PROMPT, 3], jnp.int32)
    ref_pre, ref_dec = _reference(params, cfg, tokens, lengths)
    mesh = tp_mesh(3)
    sp = tensor.shard_params(params, cfg, mesh)
    assert sp["layers"]["self_attn.k_proj.weight"].sharding.shard_shape((2, 24, 72)) == (2, 8, 72)
    fwd = tensor.TensorParallel(mesh, unroll=True)
    pre, dec = jax.jit(lambda p, t, n: prefill_decode(fwd, p, cfg, t, n, STEPS))(
        sp, tokens, lengths
    )
    valid = np.arange(PROMPT)[None, :] < np.asarray(lengths)[:, None]
    assert _rel(pre[valid], ref_pre[valid]) <= 1e-5
    assert _rel(dec, ref_dec) <= 1e-5


def test_generate_tp8_equals_single_device(setup):
    """Greedy generation through the on-device loop, sharded cache, TP 8 with replicated KV."""
    params, _, _ = setup
    cfg = TINY.replace(residual_mode="ladder")
    prompts = [[5, 9, 11, 3], [7, 1]]
    ref = generate(params, cfg, prompts, max_new_tokens=5, bucket_multiple=8)
    mesh = tp_mesh(8)
    out = generate(
        tensor.shard_params(params, cfg, mesh),
        cfg,
        prompts,
        mesh=mesh,
        max_new_tokens=5,
        bucket_multiple=8,
    )
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, rtol=1e-4, atol=1e-5)


def test_replicated_kv_is_the_same_model(setup):
    params, tokens, _ = setup
    rep = tensor.replicate_kv_heads(params, TINY, 8)
    assert rep["layers"]["self_attn.k_proj.weight"].shape == (3, 8 * 8, 64)
    cfg8 = TINY.replace(num_key_value_heads=8)
    f = jax.jit(forward, static_argnums=1)
    assert _rel(f(rep, cfg8, tokens)[0], f(params, TINY, tokens)[0]) <= 1e-5


@pytest.mark.parametrize(
    "tp, msg",
    [
        (4, "tensor axis 4 does not divide 9 query heads; choose a tensor size from {1, 3}"),
        (2, "tensor axis 2 does not divide 9 query heads; choose a tensor size from {1, 3}"),
    ],
)
def test_error_names_valid_choices(tp, msg):
    smol = ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
    )
    with pytest.raises(UserError) as e:
        tensor.check_tensor_parallel(smol, tp)
    assert str(e.value) == msg


def test_error_kv_heads_and_vocab():
    cfg = ModelConfig(
        vocab_size=250,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=12,
        num_key_value_heads=3,
        head_dim=8,
    )
    with pytest.raises(UserError, match=r"tensor axis 2 does not divide 3 KV heads"):
        tensor.check_tensor_parallel(cfg, 2)
    with pytest.raises(UserError, match=r"does not divide the vocabulary of 250; .*\{1\}"):
        tensor.check_tensor_parallel(cfg, 3)
    with pytest.raises(UserError, match=r"mesh axis sequence=2 must be 1"):
        tensor.check_mesh(cfg, make_mesh({"tensor": 4, "sequence": 2}))
    with pytest.raises(UserError, match=r"batch 3 is not divisible by the data axis 2"):
        tensor.check_mesh(TINY, make_mesh({"tensor": 4, "data": 2}), batch=3)


def _same_logits_in_layout(one, params, cfg, tokens, lengths, shard):
    """`one` (params in another layout, on one device) and `params` placed by shard(p, cfg, mesh) at
    TP 2 and 4 give the logits of `params`: prefill, and decode by XLA and by the Pallas
    kernels (interpret mode).  Returns the TP-sharded params by tensor size."""
    ref_pre, ref_dec = _reference(params, cfg, tokens, lengths)
    valid = np.arange(PROMPT)[None, :] < np.asarray(lengths)[:, None]
    pre, dec = _reference(one, cfg, tokens, lengths)
    assert _rel(pre[valid], ref_pre[valid]) <= 1e-5 and _rel(dec, ref_dec) <= 1e-5
    pallas = lambda *a, **kw: forward(*a, attn_impl="pallas", **kw)  # noqa: E731
    _, dec = jax.jit(lambda p, t, n: prefill_decode(pallas, p, cfg, t, n, STEPS))(
        one, tokens, lengths
    )
    assert _rel(dec, ref_dec) <= 1e-5
    sharded = {}
    for tp in (2, 4):
        mesh = tp_mesh(tp)
        sharded[tp] = sp = shard(params, cfg, mesh)
        fwd = tensor.TensorParallel(mesh)
        heads = tensor.cache_kv_heads(cfg, tp)
        pre, dec = jax.jit(lambda p, t, n: prefill_decode(fwd, p, cfg, t, n, STEPS, heads))(
            sp, tokens, lengths
        )
        assert _rel(pre[valid], ref_pre[valid]) <= 1e-5, tp
        assert _rel(dec, ref_dec) <= 1e-5, tp
    return sharded


@pytest.mark.parametrize("mode", ["standard", "ladder"])
def test_fused_projections_give_the_same_logits(setup, mode):
    """q/k/v and gate/up stored fused (inference/fused.py), laid out shard by shard: the same
    logits as the separate weights on one device and at TP 2 (KV heads split) and TP 4 (KV
    heads replicated first), prefill and decode (the decode kernel reads k and v inside the
    fused projection's output at their head offsets); and the layout undoes exactly."""
    from jaxturbo.bridge.hf import layer_shapes
    from jaxturbo.inference import fused

    _, tokens, lengths = setup
    # ladder with Qwen2's q/k/v biases (fused like the weights)
    cfg = TINY.replace(residual_mode=mode, attention_bias=mode == "ladder")
    params = random_params(cfg, seed=5)
    one = fused.fuse_projections(params, cfg)
    assert (fused.QKV_B in one["layers"]) == cfg.attention_bias
    want = fused.fused_layer_shapes(layer_shapes(cfg), cfg.num_key_value_heads, cfg.head_dim)
    assert {n: w.shape[1:] for n, w in one["layers"].items()} == want
    assert "self_attn.q_proj.weight" not in one["layers"]
    sharded = _same_logits_in_layout(one, params, cfg, tokens, lengths, fused.shard_fused)
    for tp, sp in sharded.items():
        # shard 0's rows: its 8/tp query heads then its KV heads' k and v rows (hd = 8)
        kv_local = tensor.cache_kv_heads(cfg, tp) // tp
        assert (
            sp["layers"][fused.QKV_W].sharding.shard_shape(sp["layers"][fused.QKV_W].shape)[1]
            == (8 // tp + 2 * kv_local) * 8
        )
        rep = tensor.replicate_kv_heads(params, cfg, tp)
        back = fused.unfuse_projections(fused.fuse_projections(rep, cfg, tp), cfg, tp)
        for n, w in rep["layers"].items():
            np.testing.assert_array_equal(np.asarray(back["layers"][n]), np.asarray(w))


def test_fused_projections_refuse_what_they_cannot_lay_out(setup):
    from jaxturbo.inference import fused

    params, _, _ = setup
    with pytest.raises(ValueError, match="replicate them first"):
        fused.fuse_projections(params, TINY, 4)  # 2 KV heads, 4 shards, not replicated
    once = fused.fuse_projections(params, TINY)
    with pytest.raises(ValueError, match="already fused"):
        fused.fuse_projections(once, TINY)
    no_q = {
        **params,
        "layers": {n: w for n, w in params["layers"].items() if n != "self_attn.q_proj.weight"},
    }
    with pytest.raises(ValueError, match="missing"):
        fused.fuse_projections(no_q, TINY)
