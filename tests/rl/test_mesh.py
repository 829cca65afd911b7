"""GRPO on a data/fsdp mesh of 8 fake CPU devices equals the single-device run step by step
(same rollouts, rewards, loss, grad norm, KL); bad meshes are one-line UserErrors."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.init import init_params
from jaxturbo.parallel.mesh import make_mesh
from jaxturbo.rl.envs import TokenSetTask
from jaxturbo.rl.grpo import GRPOConfig, GRPOLearner
from jaxturbo.train.optimizer import OptimizerConfig

CFG = ModelConfig(
    vocab_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
)
TASK = TokenSetTask(32, frozenset(range(8)), prompt_len=3)
BASE = GRPOConfig(prompts_per_step=4, group_size=4, max_new_tokens=4, seq_len=24, kl_coef=0.01)
OPT = OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=100, weight_decay=0.0)
KEYS = ("reward_mean", "kept", "rollout_tokens", "loss", "grad_norm", "kl", "pg_loss")

needs_8 = pytest.mark.skipif(
    len(jax.devices()) < 8,
    reason="needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)",
)


def _run(mesh_spec: str | None, steps: int, cfg: GRPOConfig = BASE):
    mesh = None
    if mesh_spec is not None:
        mesh = make_mesh(mesh_spec, devices=jax.devices()[: _size(mesh_spec)])
    learner = GRPOLearner(
        CFG, init_params(CFG, jax.random.key(0), std=0.2), TASK, cfg, optimizer=OPT, mesh=mesh
    )
    try:
        out = []
        for _ in range(steps):
            out.append(learner.step())
            out[-1]["params"] = jax.device_get(learner.state.params)  # after this step
        return out, learner
    finally:
        learner.close()


def _size(spec: str) -> int:
    return int(np.prod([int(p.split("=")[1]) for p in spec.split(",")]))


@pytest.fixture(scope="module")
def single():
    return _run(None, 3)


def _assert_equal_run(ref, got, spec: str) -> None:
    for step, (r, g) in enumerate(zip(ref, got)):
        assert set(KEYS) <= set(g), sorted(g)
        for k in KEYS:
            np.testing.assert_allclose(
                g[k], r[k], rtol=1e-5, atol=1e-5, err_msg=f"step {step} {k} on {spec}"
            )


def _assert_on_mesh(learner, spec: str) -> None:
    rows = _size(",".join(p for p in spec.split(",") if not p.startswith("tensor")))
    assert learner.num_shards == rows  # batch rows split over data x fsdp, not tensor
    # the train state lives on the mesh, FSDP-split where fsdp > 1
    emb = learner.state.params["model.embed_tokens.weight"]
    assert len(emb.sharding.device_set) == _size(spec)
    if "fsdp" in spec:
        assert emb.sharding.spec != jax.sharding.PartitionSpec()
    assert len(learner.engine.params["model.embed_tokens.weight"].sharding.device_set) == _size(
        spec
    )


def _assert_same_params(ref_params, learner) -> None:
    # the updated weights match too (Adam amplifies float32 reassociation in tiny gradients)
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(learner.state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4)


# Each mesh is a compile of the sampler and the step: the data axis runs in both cases, fsdp and
# tensor (which split the parameters differently) in one each; the data-only mesh, with the
# parameters replicated, is the asynchronous test's below, which checks the same values.
@needs_8
@pytest.mark.parametrize("spec", ["data=2,fsdp=2", "data=2,tensor=2"])
def test_grpo_mesh_equals_single_device(single, spec):
    ref, _ = single
    got, learner = _run(spec, 3)
    _assert_on_mesh(learner, spec)
    _assert_equal_run(ref, got, spec)
    _assert_same_params(ref[-1]["params"], learner)


@needs_8
def test_grpo_mesh_async_zero_staleness(single):
    """Rollouts in the background thread with staleness 0 on a data-only mesh: the synchronous
    one-device run, step for step and in the weights after both steps."""
    ref, _ = single
    spec = "data=2"
    got, learner = _run(spec, 2, dataclasses.replace(BASE, rollout_mode="async", max_staleness=0))
    _assert_on_mesh(learner, spec)
    for r, g in zip(ref, got):
        assert g["reward_mean"] == r["reward_mean"]
        np.testing.assert_allclose(g["loss"], r["loss"], rtol=1e-5, atol=1e-6)
    _assert_equal_run(ref, got, spec)
    _assert_same_params(ref[len(got) - 1]["params"], learner)


@needs_8
@pytest.mark.parametrize("spec, needle", [("data=2,sequence=2", "sequence=2")])
def test_grpo_refuses_sequence_meshes(spec, needle):
    mesh = make_mesh(spec, devices=jax.devices()[: _size(spec)])
    with pytest.raises(UserError) as e:
        GRPOLearner(CFG, init_params(CFG, jax.random.key(0), std=0.2), TASK, BASE, mesh=mesh)
    msg = str(e.value)
    assert needle in msg and "data, fsdp and tensor" in msg and len(msg.splitlines()) == 1


@pytest.mark.parametrize(
    "extra, needle",
    [
        (
            ["--mesh", "data=2,sequence=4"],
            "supports the data, fsdp and tensor axes (got sequence=4)",
        ),
        (
            ["--mesh", "data=2", "--algo", "ppo"],
            "--mesh data=2 is implemented for --algo grpo only",
        ),
    ],
)
def test_rl_cli_refuses_bad_mesh(capsys, tmp_path, extra, needle):
    from jaxturbo.cli import main

    code = main(
        [
            "rl",
            "--model",
            str(tmp_path / "no-such-model"),
            "--steps",
            "1",
            "--out",
            str(tmp_path / "run"),
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err


from tests.rl import test_cli_rl  # noqa: E402

_rl = test_cli_rl._rl
tiny_rl_model = test_cli_rl.tiny_rl_model  # the tiny model fixture, shared


@needs_8
def test_rl_cli_mesh_equals_single_device(tiny_rl_model, tmp_path, capsys):
    import json

    runs = {}
    for name, extra in (("one", ()), ("mesh", ("--mesh", "data=4,fsdp=2"))):
        # seed 1, groups of 8, one new token: step 1 has a mixed group, so it updates;
        # lr 1e-3: Adam turns float32 reassociation in near-zero gradients into lr-sized steps
        assert (
            _rl(
                tiny_rl_model,
                tmp_path / name,
                "--steps",
                "2",
                "--eval-every",
                "1",
                "--seed",
                "1",
                "--group-size",
                "8",
                "--max-new-tokens",
                "1",
                "--lr",
                "1e-3",
                *extra,
            )
            == 0
        )
        runs[name] = [
            json.loads(line)
            for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
    capsys.readouterr()
    assert len(runs["one"]) == len(runs["mesh"]) == 5  # evals at 0, 1, 2 and two train steps
    assert sum("loss" in r for r in runs["one"]) >= 1  # an update is compared
    for a, b in zip(runs["one"], runs["mesh"]):
        assert a["kind"] == b["kind"] and a["step"] == b["step"]
        keys = (
            ("held_out_reward",)
            if a["kind"] == "eval"
            else ("reward_mean", "rollout_tokens", "kept", "loss", "grad_norm", "kl")
        )
        for k in keys:
            if k in a:
                # the gradient norm and KL after an Adam step: Adam divides near-zero gradient entries
                # by their own size, so float32 reassociation (a sum over 8 devices instead of
                # one) moves those entries by up to lr and the next norm by ~1e-4 relative
                after_update = a["step"] > 1 and k in ("grad_norm", "kl")
                rtol, atol = (1e-3, 1e-4) if after_update else (1e-5, 1e-5)
                np.testing.assert_allclose(b[k], a[k], rtol=rtol, atol=atol, err_msg=f"{k} {a}")
