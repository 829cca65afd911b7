"""Mesh presets: every preset parses, names only jaxturbo axes, and the GPU/CPU TP presets are
what the tensor-parallel code and the Ladder benchmark assume (issue 9: h100x8 is TP 8)."""

from __future__ import annotations

import json
import math

import jax
import pytest

from jaxturbo.errors import UserError
from jaxturbo.parallel.mesh import AXES, PRESET_DIR, make_mesh, parse_mesh_spec, preset_names

CHIPS = {"cpu-8": 8, "h100x1": 1, "h100x2": 2, "h100x4": 4, "h100x8": 8, "tpu-v5p-8": 4,
         "tpu-v5p-64": 32, "tpu-v6e-256": 256}


@pytest.mark.parametrize("name", sorted(CHIPS))
def test_preset_sizes_match_the_topology(name):
    assert name in preset_names()
    sizes = parse_mesh_spec(name)
    assert set(sizes) == set(AXES)
    assert math.prod(sizes.values()) == CHIPS[name]
    assert json.loads((PRESET_DIR / f"{name}.json").read_text())["platform"] in ("cpu", "gpu", "tpu")


@pytest.mark.parametrize("name, tp", [("cpu-8", 8), ("h100x2", 2), ("h100x4", 4), ("h100x8", 8)])
def test_single_host_presets_are_pure_tensor_parallel(name, tp):
    sizes = parse_mesh_spec(name)
    assert sizes == {"data": 1, "fsdp": 1, "sequence": 1, "tensor": tp}


def test_cpu8_mesh_puts_tensor_innermost():
    mesh = make_mesh("cpu-8")
    assert mesh.axis_names == AXES and dict(mesh.shape)["tensor"] == 8
    assert [d.id for d in mesh.devices.reshape(-1)] == [d.id for d in jax.devices()]


def test_wrong_device_count_names_the_fix():
    with pytest.raises(UserError, match=r"mesh tensor=4 needs 4 devices but 8 are present"):
        make_mesh("h100x4")
