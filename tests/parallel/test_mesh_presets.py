"""Mesh presets: every preset parses, names only jaxturbo axes, and the GPU/CPU TP presets are
what the tensor-parallel code and the Ladder benchmark assume (h100x8 is TP 8)."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig
from jaxturbo.parallel import tensor
from jaxturbo.parallel.mesh import AXES, PRESET_DIR, make_mesh, parse_mesh_spec, preset_names
from jaxturbo.train.sharding import check_training_mesh

CHIPS = {
    "cpu-8": 8,
    "h100x1": 1,
    "h100x2": 2,
    "h100x4": 4,
    "h100x8": 8,
    "tpu-v5p-8": 4,
    "tpu-v5p-64": 32,
    "tpu-v6e-256": 256,
}


@pytest.mark.parametrize("name", sorted(CHIPS))
def test_preset_sizes_match_the_topology(name):
    assert name in preset_names()
    sizes = parse_mesh_spec(name)
    assert set(sizes) == set(AXES)
    assert math.prod(sizes.values()) == CHIPS[name]
    assert json.loads((PRESET_DIR / f"{name}.json").read_text())["platform"] in (
        "cpu",
        "gpu",
        "tpu",
    )


@pytest.mark.parametrize("name, tp", [("cpu-8", 8), ("h100x2", 2), ("h100x4", 4), ("h100x8", 8)])
def test_single_host_presets_are_pure_tensor_parallel(name, tp):
    sizes = parse_mesh_spec(name)
    assert sizes == {"data": 1, "fsdp": 1, "expert": 1, "sequence": 1, "tensor": tp}


def test_cpu8_mesh_puts_tensor_innermost():
    mesh = make_mesh("cpu-8")
    assert mesh.axis_names == AXES and dict(mesh.shape)["tensor"] == 8
    assert [d.id for d in mesh.devices.reshape(-1)] == [d.id for d in jax.devices()]


def test_wrong_device_count_names_the_fix():
    with pytest.raises(UserError, match=r"mesh tensor=4 needs 4 devices but 8 are present"):
        make_mesh("h100x4")


# a model every preset's tensor size (1, 2, 4, 8) splits, for training and for inference
SPLITS = ModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=8,
    head_dim=8,
)


@pytest.mark.parametrize("name", sorted(CHIPS))
def test_every_preset_serves_training_and_inference(name):
    sizes = parse_mesh_spec(name)
    mesh = AbstractMesh(tuple(sizes[a] for a in AXES), AXES)  # the shape is all the checks read
    desc = json.loads((PRESET_DIR / f"{name}.json").read_text())["description"]
    assert "serves" in desc, desc
    check_training_mesh(mesh, "none", SPLITS)  # sft / rl
    rows = sizes["data"] * sizes["fsdp"]
    tensor.check_mesh(SPLITS, mesh, batch=rows)  # generate / ppl: rows over data x fsdp
    if rows > 1:
        with pytest.raises(
            UserError,
            match=rf"batch {rows + 1} is not divisible by .* {rows}; "
            rf"use a batch that is a multiple of {rows}",
        ):
            tensor.check_mesh(SPLITS, mesh, batch=rows + 1)


def test_inference_refuses_a_sequence_axis_naming_the_fix():
    mesh = AbstractMesh(
        tuple({"fsdp": 2, "sequence": 2, "tensor": 2}.get(a, 1) for a in AXES), AXES
    )
    with pytest.raises(
        UserError,
        match=r"mesh axis sequence=2 must be 1 .* put those devices "
        r"on data, e.g. the mesh data=2,fsdp=2,tensor=2",
    ):
        tensor.check_mesh(SPLITS, mesh)


def test_fsdp_tensor_mesh_generates_the_single_device_tokens():
    """tpu-v5p-64's shape (fsdp x tensor) scaled to 8 devices: generate splits the prompts over
    fsdp like data and gives the one-device tokens (greedy)."""
    from jaxturbo.inference.generation import generate
    from jaxturbo.inference.sampling import SamplingParams
    from jaxturbo.models.init import init_params

    params = init_params(SPLITS, jax.random.key(1), std=0.3)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    greedy = SamplingParams(temperature=0.0)
    one = generate(params, SPLITS, prompts, max_new_tokens=4, sampling=greedy)
    mesh = make_mesh("fsdp=2,tensor=4")
    got = generate(
        tensor.shard_params(params, SPLITS, mesh),
        SPLITS,
        prompts,
        max_new_tokens=4,
        sampling=greedy,
        mesh=mesh,
    )
    np.testing.assert_array_equal(got.tokens, one.tokens)
    np.testing.assert_allclose(got.logprobs, one.logprobs, atol=1e-5)
