"""Compile the tensor-parallel decode loop for a lent GPU host without any GPU, and report
whether its all-reduces overlap compute.

The *schedule* of `bench.py`'s decode step (the same `generate_arrays` while loop, the same shardings
and XLA flags) decides whether each all-reduce is an async start/done pair with compute inside
or a synchronous wait.  `experiments/tools/aot_gpu.py` compiles it for an H100 host without one,
so that schedule is read on a CPU machine before any device time is spent; timing still needs
the GPU.  Setup (the CUDA plugin) in `experiments/tools/aot_gpu.py`.

    python -m experiments.ladder.aot_schedule --preset 8b --tp 4 --residual standard,ladder,desync
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from experiments.ladder import bench, hlo_overlap
from experiments.tools import aot_gpu


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="8b", choices=sorted(bench.PRESETS))
    p.add_argument("--residual", default="standard,ladder,desync")
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--xla-preset", default="nccl_lhs", choices=sorted(bench.XLA_PRESETS))
    p.add_argument(
        "--target", default="h100", choices=sorted(aot_gpu.TARGETS), help="the GPU to compile for"
    )
    p.add_argument(
        "--attn-impl",
        default="auto",
        help="attention implementation inside the step ('auto': what the lent H100 "
        "picks, decided here for a Hopper GPU)",
    )
    p.add_argument(
        "--projections",
        default="fused",
        choices=bench.PROJECTIONS,
        help="weight layout, as bench's --projections",
    )
    p.add_argument("--dump", default=None, help="folder for each mode's compiled HLO")
    p.add_argument(
        "--around-sync",
        action="store_true",
        help="print the scheduled lines around one synchronous all-reduce",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    # the same XLA flags as a bench.py worker: they are read when the backend starts
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), *bench.GPU_FLAGS, *bench.XLA_PRESETS[a.xla_preset]]
    ).strip()
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxturbo.bridge.hf import global_shapes
    from jaxturbo.inference.generation import generate_arrays
    from jaxturbo.inference.sampling import SamplingParams
    from jaxturbo.parallel import tensor
    from jaxturbo.parallel.mesh import make_mesh

    devices = aot_gpu.gpu_devices(a.tp, a.target)
    aot_gpu.dispatch_as_hopper()

    dtype = jnp.bfloat16
    base = bench.preset_config(a.preset)
    tensor.check_tensor_parallel(base, a.tp)
    mesh = make_mesh({"tensor": a.tp}, devices)
    shapes = bench.bench_layer_shapes(base, a.tp, a.projections)
    specs = tensor.param_specs(
        {**{n: None for n in global_shapes(base)}, "layers": {n: None for n in shapes}}
    )

    def abstract(shape, spec, dt=dtype):
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))

    params = {n: abstract(s, specs[n]) for n, s in global_shapes(base).items()}
    params["layers"] = {
        n: abstract((base.num_hidden_layers, *s), specs["layers"][n]) for n, s in shapes.items()
    }
    toks = abstract((a.batch, a.prompt), P(), jnp.int32)
    lens = abstract((a.batch,), P(), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))
    stops = abstract((1,), P(), jnp.int32)

    print(
        f"# {a.preset}, TP {a.tp}, batch {a.batch}, XLA flags {a.xla_preset}"
        f", {a.projections} projections, compiled for "
        f"{devices[0].device_kind} without a device"
    )
    for mode in a.residual.split(","):
        # desync: the standard model without its all-reduces (as in bench.py)
        cfg = base.replace(residual_mode="standard" if mode == "desync" else mode)
        gen_kw = dict(
            cfg=cfg,
            max_new_tokens=a.new_tokens,
            sampling=SamplingParams(),
            stream=None,
            attn_impl=a.attn_impl,
            cache_dtype=jnp.dtype(dtype).name,
            model_fn=tensor.TensorParallel(mesh, unroll=True, skip_allreduce=mode == "desync"),
            kv_heads=tensor.cache_kv_heads(cfg, a.tp),
        )
        compiled = generate_arrays.lower(params, toks, lens, key, stops, **gen_kw).compile()
        text = compiled.as_text()
        mem = compiled.memory_analysis()
        if a.dump:
            Path(a.dump).mkdir(parents=True, exist_ok=True)
            (
                Path(a.dump)
                / f"aot_{a.preset}_{mode}_tp{a.tp}_b{a.batch}_{a.xla_preset}_{a.projections}.hlo.txt"
            ).write_text(text)
        reports = hlo_overlap.analyse(text)
        gib = ""
        if mem is not None:  # per GPU: weights + cache in, XLA's scratch; does it fit?
            gib = (
                f" (per GPU: arguments {mem.argument_size_in_bytes / 2**30:.1f} GiB, "
                f"outputs {mem.output_size_in_bytes / 2**30:.1f} GiB, "
                f"temporaries {mem.temp_size_in_bytes / 2**30:.1f} GiB)"
            )
        print(
            f"== {mode}{gib}\n{hlo_overlap.summary(reports)}\n{hlo_overlap.loops(text)}", flush=True
        )
        if a.around_sync:
            for r in reports:
                if r.sync:
                    name = r.sync[len(r.sync) // 2][0]
                    print(f"-- {r.computation}, around {name}:")
                    print(hlo_overlap.around_sync(text, r.computation, name))
                    break
    return 0


if __name__ == "__main__":
    sys.exit(main())
