"""LoRA on attention and on every expert (8 fake CPU devices): the adapters' forward against
merged weights, the LoRA step under Ulysses x expert parallelism against the one-device step,
frozen base weights, and the exports (merged HF directory read by transformers, PEFT-named
adapter files read back)."""

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from jaxturbo.bridge.lora import export_merged_hf, load_adapters, save_adapters  # noqa: E402
from jaxturbo.bridge.safetensors_io import read_safetensors  # noqa: E402
from jaxturbo.errors import UserError  # noqa: E402
from jaxturbo.models.init import init_params  # noqa: E402
from jaxturbo.models.lora import LoRAConfig, attach, init_adapters, merge  # noqa: E402
from jaxturbo.models.transformer import forward  # noqa: E402
from jaxturbo.parallel.mesh import make_mesh  # noqa: E402
from jaxturbo.parallel.sequence import model_layout  # noqa: E402
from jaxturbo.train import sharding as shd  # noqa: E402
from jaxturbo.train.step import (  # noqa: E402
    TrainConfig,
    init_state,
    make_train_step,
    model_params,
    state_shardings,
)
from tests.parallel.test_expert import CFG, B, T, make_batch  # noqa: E402

LORA = TrainConfig(compute_dtype="float32", lora_rank=4, lora_alpha=8.0)
SGD = optax.sgd(1.0)


def _adapters(params, lora: LoRAConfig, seed: int = 1):
    """Adapters with B drawn too (fresh ones have B = 0, which hides A's gradient)."""
    ad = init_adapters(params, lora, jax.random.key(seed))["layers"]
    return {
        "layers": {
            n: (a if "lora_A" in n else 0.3 * jax.random.normal(jax.random.key(seed + i), a.shape))
            for i, (n, a) in enumerate(ad.items())
        }
    }


def _state(mesh, train=LORA):
    params = init_params(CFG, jax.random.key(0), std=0.3)
    state = init_state(params, SGD, mesh=mesh, lora=train.lora)
    state = state._replace(
        params={"base": state.params["base"], "lora": _adapters(params, train.lora)}
    )
    if mesh is not None:
        state = jax.device_put(state, state_shardings(state.params, SGD, mesh))
    return state


def _lora_step(mesh=None, mode="none"):
    state = _state(mesh)
    step = make_train_step(
        CFG, LORA, SGD, mesh=mesh, params=state.params, sequence_parallel=mode, donate=False
    )
    ring = None if mode == "none" else model_layout(mode, CFG, mesh, batch=B, seq_len=T)[2]
    new, m = step(state, shd.put_batch(make_batch(), mesh, sequence_ring=ring))
    return jax.device_get(state.params), jax.device_get(new.params), jax.device_get(m)


def test_adapters_in_the_forward_equal_merged_weights():
    params = init_params(CFG, jax.random.key(0), std=0.3)
    lora = LoRAConfig(rank=4, alpha=8.0)
    ad = _adapters(params, lora)
    names = set(ad["layers"])
    assert (
        "mlp.experts.gate_proj.lora_A.weight" in names
        and "self_attn.o_proj.lora_B.weight" in names
        and len(names) == 14
    )  # 4 attn + 3 experts
    assert ad["layers"]["mlp.experts.down_proj.lora_A.weight"].shape == (2, 8, 4, 16)
    tokens = jnp.asarray(make_batch()["tokens"])
    logits = jax.jit(lambda p: forward(p, CFG, tokens)[0])
    base = logits(params)
    # grouped GEMMs of the sorted rows with A then B, and attention's x A^T B^T ...
    got = logits(attach(params, ad, lora))
    # ... against W + (alpha / r) B A, formed by einsum
    want = logits(merge(params, ad, lora))
    assert np.abs(np.asarray(want - base)).max() > 1e-2
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def one_device():
    return _lora_step()


def test_lora_step_with_ulysses_and_expert_parallelism_equals_one_device(one_device):
    p0, p1, m = one_device
    q0, q1, n = _lora_step(make_mesh("cpu-8-moe"), "ulysses")  # expert 4 x sequence 2
    for k in ("loss", "router_loss", "grad_norm"):
        np.testing.assert_allclose(n[k], m[k], rtol=2e-5, err_msg=k)
    for name, a0 in p0["lora"]["layers"].items():
        g = a0 - p1["lora"]["layers"][name]  # SGD(1): the adapter gradient
        assert np.abs(g).max() > 1e-5, name
        np.testing.assert_allclose(
            q0["lora"]["layers"][name] - q1["lora"]["layers"][name],
            g,
            atol=3e-6,
            rtol=2e-4,
            err_msg=name,
        )
    # the frozen weights come back untouched
    for got in (p1, q1):
        jax.tree.map(np.testing.assert_array_equal, got["base"], p0["base"])


def test_lora_trains_only_the_adapters_and_lowers_the_loss():
    params = init_params(CFG, jax.random.key(0), std=0.3)
    opt = optax.adam(3e-2)
    state = init_state(params, opt, lora=LORA.lora)
    # Adam's moments exist for the adapters only (mu and nu, one leaf each per adapter)
    n_adapters = len(jax.tree.leaves(state.params["lora"]))
    assert n_adapters == 14
    assert len([x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]) == 2 * n_adapters
    step = make_train_step(CFG, LORA, opt, donate=False)
    batch = shd.put_batch(make_batch(), None)
    losses = []
    for _ in range(4):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    jax.tree.map(np.testing.assert_array_equal, state.params["base"], params)
    # the merged model reproduces the trained loss's logits
    logits = jax.jit(lambda p: forward(p, CFG, batch["tokens"])[0])
    np.testing.assert_allclose(
        np.asarray(logits(model_params(state.params, LORA.lora))),
        np.asarray(logits(attach(params, state.params["lora"], LORA.lora))),
        atol=2e-5,
    )


def test_exports_merged_hf_for_transformers_and_peft_named_adapters(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tests.helpers.hf_tiny import random_tokens, tiny_hf_model

    _, cfg, params = tiny_hf_model("qwen3_moe")
    lora = LoRAConfig(rank=4, alpha=8.0)
    ad = _adapters(params, lora)
    toks = random_tokens((2, 19))
    logits = jax.jit(lambda p: forward(p, cfg, jnp.asarray(toks))[0])
    want = np.asarray(logits(attach(params, ad, lora)))
    export_merged_hf(params, ad, lora, cfg, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        got = model(torch.tensor(toks, dtype=torch.long)).logits.numpy()
    assert np.abs(want - np.asarray(logits(params))).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    out = save_adapters(ad, params, lora, tmp_path / "adapter", base_model="tiny")
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8.0
    assert conf["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    tensors = read_safetensors(out / "adapter_model.safetensors")
    name = "base_model.model.model.layers.2.mlp.experts.7.up_proj.lora_B.weight"
    np.testing.assert_array_equal(
        tensors[name], np.asarray(ad["layers"]["mlp.experts.up_proj.lora_B.weight"][2, 7])
    )
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (
        4,
        cfg.hidden_size,
    )
    lora2, ad2 = load_adapters(out, params)
    assert lora2.scale == lora.scale
    jax.tree.map(np.testing.assert_array_equal, ad2, jax.device_get(ad))


def test_targets_and_refusals_name_the_valid_choices():
    def shapes(cfg):  # what the targets and refusals read: names and shapes
        return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))

    params = shapes(CFG)
    only_q = jax.eval_shape(
        lambda: init_adapters(
            params, LoRAConfig(rank=2, targets=("q_proj", "experts.down_proj")), jax.random.key(0)
        )
    )
    assert sorted(only_q["layers"]) == [
        "mlp.experts.down_proj.lora_A.weight",
        "mlp.experts.down_proj.lora_B.weight",
        "self_attn.q_proj.lora_A.weight",
        "self_attn.q_proj.lora_B.weight",
    ]
    with pytest.raises(
        UserError,
        match=r"LoRA target 'mlp' is not a projection LoRA adapts; "
        r"choose from attn, experts, down_proj, gate_proj, k_proj, "
        r"o_proj, q_proj, up_proj, v_proj$",
    ):
        init_adapters(params, LoRAConfig(rank=2, targets=("mlp",)), jax.random.key(0))
    dense = CFG.replace(model_type="qwen3", moe=None)
    dense_params = shapes(dense)
    with pytest.raises(
        UserError,
        match=r"LoRA target 'gate_proj' matches no projection of this "
        r"model; choose from attn, k_proj, o_proj, q_proj, v_proj "
        r"\(a dense model: its MLP takes no adapters\)",
    ):
        init_adapters(
            dense_params, LoRAConfig(rank=2, targets=("attn", "gate_proj")), jax.random.key(0)
        )
    with pytest.raises(UserError, match="LoRA dropout 0.1 is not implemented"):
        TrainConfig(lora_rank=2, lora_dropout=0.1).validate()
    with pytest.raises(UserError, match="lora_rank=-1 must be >= 0"):
        TrainConfig(lora_rank=-1).validate()
    with pytest.raises(UserError, match=r"LoRA training with tensor=2 is not implemented"):
        make_train_step(
            dense,
            LORA,
            SGD,
            mesh=make_mesh("tensor=2,data=4"),
            params={"base": dense_params, "lora": {"layers": {}}},
        )
