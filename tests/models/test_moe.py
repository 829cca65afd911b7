"""Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE) against transformers on tiny random
checkpoints: logits, router losses, greedy generation, perplexity, HF round trip; the grouped-GEMM
kernels against the ragged_dot reference in interpret mode."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxturbo.bridge.hf import hf_from_params, load_hf, read_hf_tensors, save_hf
from jaxturbo.errors import UserError
from jaxturbo.inference import generate, perplexity
from jaxturbo.models.config import ModelConfig, MoEConfig
from jaxturbo.models.init import init_params
from jaxturbo.models.moe import (
    ExpertWeights,
    combine,
    gather_pairs,
    gmv_dispatch,
    inverse_permutation,
    moe_mlp,
    route,
    sort_pairs,
    sorted_dispatch,
)
from jaxturbo.models.shapes import shape
from jaxturbo.models.transformer import forward, init_cache
from tests.helpers.hf_tiny import random_tokens, tiny_hf_model

FAMILIES = ["qwen3_moe", "qwen2_moe"]


@functools.cache
def _tiny(family: str):
    return tiny_hf_model(family)


@functools.cache
def _fwd(cfg: ModelConfig, **kw):
    return jax.jit(lambda p, t, m=None: forward(p, cfg, t, return_aux=True, router_mask=m, **kw))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_router_losses_match_transformers(family):
    model, cfg, params = _tiny(family)
    toks = random_tokens((2, 37))
    with torch.no_grad():
        ref = model(torch.tensor(toks, dtype=torch.long), output_router_logits=True)
    out, _, aux = _fwd(cfg)(params, jnp.asarray(toks))
    logits = ref.logits.numpy()
    assert np.abs(logits).max() > 1e-2
    np.testing.assert_allclose(np.asarray(out), logits, atol=1e-4, rtol=0)
    assert (np.asarray(out).argmax(-1) == logits.argmax(-1)).all()
    # transformers' load_balancing_loss_func over all layers' router logits
    np.testing.assert_allclose(float(aux["router_aux_loss"]), float(ref.aux_loss), rtol=1e-5)
    # ST-MoE z-loss: mean over tokens (and layers) of logsumexp(router logits)^2
    lse = torch.logsumexp(torch.stack(ref.router_logits).float(), dim=-1)
    np.testing.assert_allclose(float(aux["router_z_loss"]), float((lse**2).mean()), rtol=1e-5)
    assert float(aux["router_z_loss"]) > 0
    np.testing.assert_allclose(
        float(aux["router_loss"]), cfg.moe.router_aux_loss_coef * float(ref.aux_loss), rtol=1e-5
    )
    np.testing.assert_allclose(
        float(aux["tokens_per_expert"].sum()), cfg.moe.num_experts_per_tok, rtol=1e-6
    )


def test_masked_router_loss_matches_transformers_attention_mask():
    model, cfg, params = _tiny("qwen3_moe")
    toks = random_tokens((2, 37), seed=4)
    mask = np.ones((2, 37), np.int64)
    mask[1, 13:] = 0  # right padding
    with torch.no_grad():
        ref = model(
            torch.tensor(toks, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            output_router_logits=True,
        )
    _, _, aux = _fwd(cfg)(params, jnp.asarray(toks), jnp.asarray(mask))
    _, _, unmasked = _fwd(cfg)(params, jnp.asarray(toks))
    np.testing.assert_allclose(float(aux["router_aux_loss"]), float(ref.aux_loss), rtol=1e-5)
    assert abs(float(unmasked["router_aux_loss"]) - float(ref.aux_loss)) > 1e-4


def test_router_loss_gradient_and_coefficients_from_config():
    _, cfg, params = _tiny("qwen2_moe")
    hf = cfg.to_hf_dict()
    hf.update(router_z_loss_coef=0.01, router_aux_loss_coef=0.02)
    cfg2 = ModelConfig.from_hf_dict(hf)
    assert (cfg2.moe.router_z_loss_coef, cfg2.moe.router_aux_loss_coef) == (0.01, 0.02)
    assert ModelConfig.from_hf_dict(cfg2.to_hf_dict()) == cfg2
    toks = jnp.asarray(random_tokens((1, 9)))

    def loss(p):
        aux = forward(p, cfg2, toks, return_aux=True)[2]
        return aux["router_loss"], aux

    g, aux = jax.jit(jax.grad(loss, has_aux=True))(params)
    np.testing.assert_allclose(
        float(aux["router_loss"]),
        0.02 * float(aux["router_aux_loss"]) + 0.01 * float(aux["router_z_loss"]),
        rtol=1e-6,
    )
    assert np.abs(np.asarray(g["layers"]["mlp.gate.weight"])).max() > 0  # the router learns
    # a dense model reports zero router losses
    dense = shape("tiny", num_hidden_layers=1, hidden_size=64, intermediate_size=64, vocab_size=256)
    _, _, daux = forward(init_params(dense, jax.random.PRNGKey(0)), dense, toks, return_aux=True)
    assert float(daux["router_loss"]) == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_round_trip_is_bitwise_and_reloads_in_transformers(tmp_path, family):
    model, cfg, params = _tiny(family)
    model.save_pretrained(tmp_path / "hf")
    saved = read_hf_tensors(tmp_path / "hf")
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in saved  # per-expert checkpoint
    cfg2, loaded, _ = load_hf(tmp_path / "hf")
    assert cfg2 == cfg
    # the per-expert checkpoint and transformers' fused state dict give the same params
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    save_hf(loaded, cfg2, tmp_path / "out")
    again = read_hf_tensors(tmp_path / "out")
    assert sorted(again) == sorted(saved)
    for name, a in saved.items():
        assert a.dtype == again[name].dtype and a.tobytes() == again[name].tobytes(), name
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    toks = torch.tensor(random_tokens((1, 11)), dtype=torch.long)
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(toks).logits.numpy(), model(toks).logits.numpy())


def test_export_rejects_wrong_expert_count():
    _, cfg, params = _tiny("qwen3_moe")
    bad = cfg.replace(moe=dataclasses.replace(cfg.moe, num_experts=4))
    with pytest.raises(UserError, match="mlp.gate.weight"):
        hf_from_params(params, bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_transformers(family):
    model, cfg, params = _tiny(family)
    prompts = [list(random_tokens((9,), seed=7)), list(random_tokens((4,), seed=8))]
    res = generate(params, cfg, prompts, max_new_tokens=8, bucket_multiple=8)
    for p, got in zip(prompts, res.sequences()):
        with torch.no_grad():
            want = model.generate(
                torch.tensor([p]),
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )[0, len(p) :].tolist()
        assert got == want


def test_perplexity_matches_transformers():
    model, cfg, params = _tiny("qwen3_moe")
    ids = random_tokens((40,), seed=9)
    res = perplexity(params, cfg, ids, window=16, batch_size=2)
    nll, n = 0.0, 0
    for b in range(0, 40, 16):  # disjoint windows, each scoring all but its first token
        w = torch.tensor(ids[None, b : b + 16], dtype=torch.long)
        with torch.no_grad():
            logp = torch.log_softmax(model(w).logits[0, :-1].double(), -1)
        nll -= logp.gather(1, w[0, 1:, None]).sum().item()
        n += w.shape[1] - 1
    assert res.tokens_scored == n
    np.testing.assert_allclose(res.perplexity, math.exp(nll / n), rtol=1e-4)


def test_cached_decode_equals_full_forward():
    """Prefill right-padded rows, then decode (the GEMV dispatch: few tokens) step by step."""
    _, cfg, params = _tiny("qwen2_moe")
    full = random_tokens((2, 37), seed=3)
    lens = np.array([8, 5], np.int32)
    prompt = np.where(np.arange(9)[None] < lens[:, None], full[:, :9], 0).astype(np.int32)
    seg = (np.arange(9)[None] < lens[:, None]).astype(np.int32)
    cache = init_cache(cfg, 2, 12)
    _, cache = jax.jit(lambda p, t, s, c, n: forward(p, cfg, t, segment_ids=s, cache=c, lengths=n))(
        params, jnp.asarray(prompt), jnp.asarray(seg), cache, jnp.asarray(lens)
    )
    step = jax.jit(lambda p, t, c: forward(p, cfg, t, cache=c))
    ref = np.asarray(_fwd(cfg)(params, jnp.asarray(full))[0])  # causal: any prefix's logits
    # decode takes the GEMV dispatch (no grouped GEMM: ragged_dot is the "xla" grouped GEMM)
    tok = jnp.zeros((2, 1), jnp.int32)
    assert "ragged_dot" not in str(jax.make_jaxpr(step)(params, tok, cache))
    assert "ragged_dot" in str(jax.make_jaxpr(lambda p, t: forward(p, cfg, t))(params, tok))
    for s in range(2):
        nxt = np.array([full[i, lens[i] + s] for i in range(2)], np.int32)
        logits, cache = step(params, jnp.asarray(nxt[:, None]), cache)
        for i in range(2):
            np.testing.assert_allclose(np.asarray(logits[i, 0]), ref[i, lens[i] + s], atol=1e-5)


@functools.cache
def _layer():
    """A tiny sparse layer (6 experts of width 32, top-2) and 40 tokens of input."""
    cfg = shape(
        "tiny-moe",
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=1,
        vocab_size=64,
        moe=MoEConfig(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32),
    )
    lp = jax.tree.map(lambda a: a[0], init_params(cfg, jax.random.PRNGKey(1), std=0.2)["layers"])
    h = jax.random.normal(jax.random.PRNGKey(2), (2, 20, 64), jnp.float32)
    return cfg, lp, h


def _dense_reference(lp, moe, x):
    """Every expert on every token, weighted by the router (a one-hot sum; no sorting)."""
    _, weights, experts, _ = route(
        x, lp["mlp.gate.weight"], moe.num_experts_per_tok, moe.norm_topk_prob
    )
    g = jnp.einsum("nd,efd->nef", x, lp["mlp.experts.gate_proj.weight"])
    u = jnp.einsum("nd,efd->nef", x, lp["mlp.experts.up_proj.weight"])
    y = jnp.einsum("nef,edf->ned", jax.nn.silu(g) * u, lp["mlp.experts.down_proj.weight"])
    coef = jnp.sum(jax.nn.one_hot(experts, moe.num_experts) * weights[..., None], axis=1)
    return jnp.einsum("ned,ne->nd", y, coef)


def test_dispatches_equal_dense_reference():
    cfg, lp, h = _layer()
    x = h.reshape(-1, 64)
    ref = _dense_reference(lp, cfg.moe, x)
    _, weights, experts, _ = route(x, lp["mlp.gate.weight"], 2, False)
    counts = np.bincount(np.asarray(experts).ravel(), minlength=6)
    assert counts.min() >= 1 and counts.max() >= 2  # several rows share an expert, none is empty
    w = ExpertWeights(
        lp["mlp.experts.gate_proj.weight"],
        lp["mlp.experts.up_proj.weight"],
        lp["mlp.experts.down_proj.weight"],
    )
    for dispatch in (sorted_dispatch, gmv_dispatch):
        out = jax.jit(dispatch, static_argnums=4)(x, weights, experts, w, "xla")
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)

    # gradients through the sort, the grouped GEMMs and the unsort (router included)
    def loss(p, fn):
        return jnp.sum(jnp.sin(fn(p)))

    sparse = jax.jit(jax.grad(loss, argnums=0), static_argnums=1)(
        lp,
        lambda p: moe_mlp(p, cfg.moe, h, implementation="xla", dispatch=sorted_dispatch)[0].reshape(
            -1, 64
        ),
    )
    dense = jax.jit(jax.grad(loss, argnums=0), static_argnums=1)(
        lp, lambda p: _dense_reference(p, cfg.moe, x)
    )
    for name in ("mlp.gate.weight", "mlp.experts.up_proj.weight", "mlp.experts.down_proj.weight"):
        assert np.abs(np.asarray(dense[name])).max() > 1e-3
        np.testing.assert_allclose(
            np.asarray(sparse[name]), np.asarray(dense[name]), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("capacity", [None, 3])
def test_pair_gathers_have_the_gradients_of_plain_indexing(capacity):
    """gather_pairs / combine (their gradients are gathers by the inverse permutation) against
    plain indexing, whose gradients autodiff makes scatter-adds; with a capacity the dropped
    pairs sit at the end of the order."""
    n, k, e, d = 13, 3, 5, 4
    kx, ke, kw = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (n, d))
    experts = jax.random.randint(ke, (n, k), 0, e)
    weights = jax.random.uniform(kw, (n, k))
    order, _ = sort_pairs(experts, e, capacity)
    scale = jnp.arange(1.0, n * k + 1)[:, None]

    def ours(x, w):
        inv = inverse_permutation(order)
        return combine(jnp.tanh(gather_pairs(x, order, inv, k)) * scale, order, w, x.dtype, inv)

    def plain(x, w):
        ys = jnp.tanh(x[order // k]) * scale * w.reshape(-1)[order][:, None]
        inv = jnp.argsort(order)
        return ys[inv].reshape(n, k, d).sum(axis=1)

    np.testing.assert_allclose(ours(x, weights), plain(x, weights), rtol=1e-6, atol=1e-6)
    loss = lambda fn: jax.grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w))), argnums=(0, 1))
    for a, b in zip(loss(ours)(x, weights), loss(plain)(x, weights)):
        assert np.abs(np.asarray(b)).max() > 1e-2
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dispatch", [sorted_dispatch, gmv_dispatch])
def test_pallas_kernels_equal_xla_in_interpret_mode(dispatch):
    cfg, lp, h = _layer()
    h = h[:, :6]  # 12 tokens, 24 (token, expert) rows

    @functools.partial(jax.jit, static_argnums=1)
    def run(p, impl):
        return moe_mlp(p, cfg.moe, h, implementation=impl, dispatch=dispatch)[0]

    ref = run(lp, "xla")
    assert np.abs(np.asarray(ref)).max() > 1e-2
    np.testing.assert_allclose(np.asarray(run(lp, "pallas_triton")), np.asarray(ref), atol=1e-5)


def test_expert_lora_through_the_kernels_equals_xla_in_interpret_mode():
    """Adapters on every expert's down projection (rank 4: grouped GEMMs with N = 4 for A and
    K = 4 for B, under the kernels' tiles), forward and their gradient through the Pallas-Triton
    kernels, against ragged_dot; the frozen expert stacks get no gradient."""
    from jaxturbo.models.lora import LoRAConfig, attach, init_adapters

    cfg, lp, h = _layer()
    h = h[:, :6]
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("experts.down_proj",))
    stacked = {"layers": jax.tree.map(lambda a: a[None], lp)}
    ad = init_adapters(stacked, lora, jax.random.PRNGKey(3))["layers"]
    ad = {
        n: a[0] if "lora_A" in n else 0.3 * jax.random.normal(jax.random.PRNGKey(i), a.shape[1:])
        for i, (n, a) in enumerate(ad.items())
    }
    assert sorted(ad) == [
        "mlp.experts.down_proj.lora_A.weight",
        "mlp.experts.down_proj.lora_B.weight",
    ]

    @functools.partial(jax.jit, static_argnums=2)
    def run(p, a, impl):
        def f(a):
            return moe_mlp(
                attach({"layers": p}, {"layers": a}, lora)["layers"],
                cfg.moe,
                h,
                implementation=impl,
            )[0]

        y, vjp = jax.vjp(f, a)
        return y, vjp(jnp.cos(y))[0]

    y_ref, g_ref = run(lp, ad, "xla")
    y, g = run(lp, ad, "pallas_triton")
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5)
    for n in ad:
        assert np.abs(np.asarray(g_ref[n])).max() > 1e-3, n
        np.testing.assert_allclose(
            np.asarray(g[n]), np.asarray(g_ref[n]), atol=1e-4, rtol=1e-4, err_msg=n
        )


def test_config_validation_names_bad_values():
    base = shape("tiny-moe")
    with pytest.raises(UserError, match="decoder_sparse_step=2"):
        base.replace(moe=MoEConfig(decoder_sparse_step=2))
    with pytest.raises(UserError, match=r"mlp_only_layers=\[1\]"):
        base.replace(moe=MoEConfig(mlp_only_layers=(1,)))
    with pytest.raises(UserError, match="num_experts_per_tok=9 must be at most num_experts=8"):
        base.replace(moe=MoEConfig(num_experts=8, num_experts_per_tok=9))
    with pytest.raises(UserError, match="shared_expert_intermediate_size=0"):
        base.replace(model_type="qwen2_moe")
    with pytest.raises(UserError, match="needs its mixture-of-experts fields"):
        base.replace(moe=None)
    hf = base.to_hf_dict()
    del hf["moe_intermediate_size"]
    with pytest.raises(UserError, match="moe_intermediate_size"):
        ModelConfig.from_hf_dict(hf)
    # transformers' Qwen3MoeConfig.to_dict names the expert count num_local_experts
    hf = base.to_hf_dict()
    hf["num_local_experts"] = hf.pop("num_experts")
    assert ModelConfig.from_hf_dict(hf) == base


def test_shapes():
    big = shape("qwen3-30b-a3b")
    assert big.moe.num_experts == 128 and big.moe.num_experts_per_tok == 8
    assert 30.4e9 < big.num_params() < 30.6e9  # "30B"
    cfg = shape("tiny-moe")
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    assert params["layers"]["mlp.experts.down_proj.weight"].shape == (4, 8, 256, 128)
    logits, _, aux = jax.eval_shape(
        lambda p, t: forward(p, cfg, t, return_aux=True),
        params,
        jax.ShapeDtypeStruct((1, 8), jnp.int32),
    )
    assert logits.shape == (1, 8, 4096) and aux["tokens_per_expert"].shape == (8,)
