"""Meshes: presets from `meshes/*.json` or `axis=size,...` strings, made one way for every mode.

The presets' source is the repository's top-level `meshes/`; `jaxturbo/parallel/meshes` is a
symlink to it, so a clone, an editable install and a wheel (which stores the files themselves as
package data) all read them with importlib.resources.

Decision: jaxturbo's meshes use `AxisType.Auto` axes.  Every parallel mode is written
as explicit per-device code inside `jax.shard_map`, where the collectives are visible; outside
it, jit propagates shardings, so glue code needs no `out_sharding` annotations.
Axis order is fixed: (data, fsdp, expert, sequence, tensor) (`jaxturbo.parallel.axes.AXES`) —
tensor innermost so that TP groups are neighbouring devices (NVLink peers on a GPU host).
"""

from __future__ import annotations

import json
import math
from importlib.resources import files

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxturbo.errors import UserError
from jaxturbo.parallel.axes import AXES

PRESET_DIR = files(__package__) / "meshes"


def preset_names() -> list[str]:
    """Names of the shipped presets (`cpu-8`, `h100x4`, ...): the `meshes/*.json` file stems."""
    return sorted(
        p.name.removesuffix(".json") for p in PRESET_DIR.iterdir() if p.name.endswith(".json")
    )


def parse_mesh_spec(spec: str | dict[str, int] | None) -> dict[str, int]:
    """`"h100x4"` (a preset), `"tensor=4,data=2"` or a dict -> {axis: size} over all the axes."""
    sizes = {a: 1 for a in AXES}
    if spec is None or spec == "":
        return sizes
    if isinstance(spec, dict):
        given = dict(spec)
    elif "=" in spec:
        given = {}
        for part in spec.split(","):
            name, _, val = part.partition("=")
            name = name.strip()
            try:
                given[name] = int(val)
            except ValueError:
                raise UserError(f"mesh axis size {val!r} for {name!r} is not an integer") from None
    else:
        path = PRESET_DIR / f"{spec}.json"
        if not path.is_file():
            raise UserError(
                f"unknown mesh preset {spec!r}; presets: {', '.join(preset_names())} "
                "(or give sizes like tensor=4,data=2)"
            )
        given = json.loads(path.read_text())["axes"]
    for name, size in given.items():
        if name not in AXES:
            raise UserError(f"unknown mesh axis {name!r}; axes: {', '.join(AXES)}")
        if size < 1:
            raise UserError(f"mesh axis {name}={size} must be >= 1")
        sizes[name] = int(size)
    return sizes


def make_mesh(spec: str | dict[str, int] | None = None, devices: list | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with the jaxturbo axes (`AXES`, in that order).

    Raises UserError when the product of the sizes differs from the device count.
    """
    sizes = parse_mesh_spec(spec)
    devices = list(jax.devices()) if devices is None else list(devices)
    n = math.prod(sizes.values())
    if n != len(devices):
        desc = ",".join(f"{a}={s}" for a, s in sizes.items() if s > 1) or "all axes 1"
        raise UserError(
            f"mesh {desc} needs {n} devices but {len(devices)} are present "
            f"({devices[0].platform}); choose sizes whose product is {len(devices)}"
        )
    arr = np.asarray(devices, dtype=object).reshape(tuple(sizes[a] for a in AXES))
    return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))
