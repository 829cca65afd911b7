"""Every TPU mesh preset compiles its train step and its decode step for that TPU, on a CPU.

What is checked, for tpu-v5p-8 (tensor 4), tpu-v5p-64 (fsdp 8 x tensor 4) and tpu-v6e-256
(data 4 x fsdp 16 x tensor 4), on a tiny model (2 layers, head_dim 128, 256 tokens a row):

  lowered (always)  `jax.jit(step).trace(...).lower(lowering_platforms=("tpu",))` under an
                    `AbstractMesh` of the preset's shape made of abstract TPU devices of the
                    preset's generation: the whole StableHLO program for the preset's chip count,
                    with the Pallas kernels lowered through Mosaic TPU (`tpu_custom_call`: flash
                    attention forward and backward in the train step, the decode kernel in the
                    decode step) and the collectives of each mesh axis (all-reduce over tensor,
                    all-gather / reduce-scatter over fsdp).  This runs JAX's tracing, the
                    shard_map / sharding checks and both lowerings (XLA and Mosaic), not XLA's
                    TPU compiler.
  compiled          where libtpu is installed (`pip install libtpu==0.0.48.*`, the version
                    jax[tpu]==0.11.2 pins; or TPU_LIBRARY_PATH naming its libtpu.so): the same
                    steps on a concrete mesh of libtpu's compile-only devices for the preset's
                    topology, `.lower().compile()`: XLA's TPU pipeline and the Mosaic compiler,
                    as a TPU host would run them.  Skipped, saying so, without libtpu.

The kernels' "auto" dispatch asks the default device's platform, a CPU here: the fixture makes
it answer "tpu" so that the programs hold the kernels a TPU would run.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, NamedSharding  # noqa: E402

from jaxturbo.models.config import ModelConfig  # noqa: E402
from jaxturbo.models.init import init_params  # noqa: E402
from jaxturbo.models.transformer import init_cache  # noqa: E402
from jaxturbo.parallel import tensor  # noqa: E402
from jaxturbo.parallel.axes import AXES  # noqa: E402
from jaxturbo.parallel.mesh import make_mesh, parse_mesh_spec  # noqa: E402
from jaxturbo.train import sharding as shd  # noqa: E402
from jaxturbo.train.optimizer import OptimizerConfig, make_optimizer  # noqa: E402
from jaxturbo.train.step import TrainConfig, TrainState, make_train_step, state_shardings  # noqa: E402

# preset -> (libtpu topology name, the device_kind its chips report)
TPU_PRESETS = {
    "tpu-v5p-8": ("v5p:2x2x1", "TPU v5"),
    "tpu-v5p-64": ("v5p:4x4x2", "TPU v5"),
    "tpu-v6e-256": ("v6e:16x16", "TPU v6 lite"),
}
# TPU tiles: head_dim 128, 256 tokens (two 128-row attention blocks); heads, KV heads, FFN and
# vocabulary divide by the presets' tensor size 4
CFG = ModelConfig(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=128,
    residual_mode="ladder",
)
SEQ, CACHE = 256, 256
S = jax.ShapeDtypeStruct


@pytest.fixture
def dispatch_as_tpu(monkeypatch):
    """Make the kernels' dispatch answer for a TPU rather than this machine's CPU."""
    import pallas_kernels

    for mod in ("registry", "api"):
        m = getattr(pallas_kernels, mod, None)
        for name in ("platform", "_platform"):
            if m is not None and hasattr(m, name):
                monkeypatch.setattr(m, name, lambda: "tpu")


def _abstract_mesh(preset: str) -> AbstractMesh:
    sizes = parse_mesh_spec(preset)
    device = AbstractDevice(device_kind=TPU_PRESETS[preset][1], num_cores=1, platform="tpu")
    return AbstractMesh(
        tuple(sizes[a] for a in AXES),
        AXES,
        axis_types=(AxisType.Auto,) * len(AXES),
        abstract_device=device,
    )


def _train_args(mesh):
    """The jitted train step on `mesh` and shaped arguments carrying the step's shardings."""
    opt = make_optimizer(OptimizerConfig(warmup_steps=1, total_steps=10))
    params = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0)))
    step = make_train_step(
        CFG,
        TrainConfig(compute_dtype="bfloat16", loss_chunk_tokens=1024),
        opt,
        mesh=mesh,
        params=params,
    )
    shapes = TrainState(
        S((), jnp.int32), params, jax.eval_shape(opt.init, params), S((2,), jnp.uint32)
    )
    state = jax.tree.map(
        lambda a, s: S(a.shape, a.dtype, sharding=s), shapes, state_shardings(params, opt, mesh)
    )
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = {
        k: S(
            (rows, SEQ),
            jnp.float32 if k == "weights" else jnp.int32,
            sharding=shd.batch_sharding(mesh),
        )
        for k in ("tokens", "targets", "weights", "segment_ids", "positions")
    }
    return step, (state, batch)


def _decode_args(mesh):
    """One tensor-parallel decode step (rows over data x fsdp) and its shaped arguments."""
    tp = tensor.TensorParallel(mesh)

    def decode(params, tokens, cache):
        logits, cache = tp(params, CFG, tokens, cache=cache)
        return jnp.argmax(logits[:, -1], axis=-1), cache

    params = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0), dtype=jnp.bfloat16))
    params = jax.tree.map(
        lambda a, s: S(a.shape, a.dtype, sharding=NamedSharding(mesh, s)),
        params,
        tensor.param_specs(params),
    )
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    heads = tensor.cache_kv_heads(CFG, mesh.shape["tensor"])
    cache = jax.eval_shape(lambda: init_cache(CFG, rows, CACHE, jnp.bfloat16, kv_heads=heads))
    specs = tensor.cache_specs(mesh)
    cache = {
        k: S(v.shape, v.dtype, sharding=NamedSharding(mesh, specs[k])) for k, v in cache.items()
    }
    row = NamedSharding(mesh, jax.sharding.PartitionSpec(tensor.row_axes(mesh), None))
    return jax.jit(decode), (params, S((rows, 1), jnp.int32, sharding=row), cache)


@pytest.mark.parametrize("preset", sorted(TPU_PRESETS))
def test_train_and_decode_steps_lower_for_the_preset_tpu(preset, dispatch_as_tpu):
    mesh = _abstract_mesh(preset)
    sizes = parse_mesh_spec(preset)
    chips = int(np.prod(list(sizes.values())))
    mesh_line = ", ".join(f'"{a}"={sizes[a]}' for a in AXES)
    texts = {}
    with jax.sharding.use_abstract_mesh(mesh):
        for name, (fn, args) in (("train", _train_args(mesh)), ("decode", _decode_args(mesh))):
            texts[name] = fn.trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    for name, text in texts.items():
        assert f"mhlo.num_partitions = {chips} : i32" in text, name
        assert f"<[{mesh_line}]>" in text, name  # the preset's mesh, every axis
        assert "all_reduce" in text, name  # tensor parallelism's sums
    train, decode = texts["train"], texts["decode"]
    # Mosaic TPU kernels: flash attention forward + backward (dq, dk/dv), the decode kernel
    assert train.count("tpu_custom_call") >= 2, train.count("tpu_custom_call")
    assert decode.count("tpu_custom_call") >= 1
    if sizes["fsdp"] > 1:  # parameters gathered over fsdp, gradients reduce-scattered back
        assert "all_gather" in train and "reduce_scatter" in train
    assert "all_gather" in decode  # the vocab-parallel logits, gathered to sample


def _libtpu_devices(topology: str):
    from jax._src import cloud_tpu_init

    if cloud_tpu_init.get_tpu_library_path() is None:
        pytest.skip(
            "libtpu is not installed: the XLA TPU compile is not checked (pip install "
            "libtpu==0.0.48.* runs it; the StableHLO lowering is checked above)"
        )
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)


@pytest.mark.parametrize("preset", sorted(TPU_PRESETS))
def test_train_and_decode_steps_compile_for_the_preset_tpu(preset, dispatch_as_tpu):
    topology, kind = TPU_PRESETS[preset]
    devices = _libtpu_devices(topology)
    assert devices[0].device_kind == kind
    mesh = make_mesh(preset, devices=devices)
    for name, (fn, args) in (("train", _train_args(mesh)), ("decode", _decode_args(mesh))):
        compiled = fn.trace(*args).lower().compile()
        text = compiled.as_text()
        assert "tpu_custom_call" in text, name  # the Mosaic kernels survived compilation
        # the programs fit a chip's HBM many times over: a tiny model on a huge slice
        mem = compiled.memory_analysis()
        assert mem.temp_size_in_bytes + mem.argument_size_in_bytes < 2**30, (name, mem)
