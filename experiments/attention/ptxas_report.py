"""ptxas's verdict on the Mosaic GPU attention kernels, for an H100, without a GPU.

Compiles the forward and (optionally) the backward of `pallas_kernels.flash_attention.mosaic_gpu`
for sm_90a through `experiments/tools/aot_gpu.py` (deviceless XLA) with Mosaic GPU's ptxas dump on,
and prints one row per kernel: registers, spill bytes, and every ptxas warning (the one that
matters most here: "wgmma.mma_async instructions are serialized", which halves a kernel's
speed without changing its results).  A pre-flight check for a kernel change: it costs no
device time, and a kernel that spills or serialises need not be timed.

    python -m experiments.attention.ptxas_report                    # default forward + backwards
    python -m experiments.attention.ptxas_report --configs "overlap=False,pingpong=True"
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import tempfile
from pathlib import Path

from experiments.tools import aot_gpu

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_ENTRY = re.compile(r"entry function '(\w+)'")


def parse_ptxas(text: str) -> dict:
    """registers, spill store/load bytes, kernel name and warnings of one ptxas -v report."""
    regs, spill, entry = _REGS.search(text), _SPILL.search(text), _ENTRY.search(text)
    return dict(
        kernel=entry.group(1) if entry else "?",
        registers=int(regs.group(1)) if regs else None,
        spill_stores=int(spill.group(1)) if spill else None,
        spill_loads=int(spill.group(2)) if spill else None,
        warnings=[
            ln.strip()
            for ln in text.splitlines()
            if "warning" in ln.lower() or "performance loss" in ln.lower()
        ],
    )


def _config(text: str):
    """'overlap=False,block_k=64' -> mosaic_gpu.Config with those fields."""
    from pallas_kernels.flash_attention import mosaic_gpu

    kw = {}
    fields = {f.name: f.type for f in dataclasses.fields(mosaic_gpu.Config)}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in fields:
            raise SystemExit(f"config field {name!r}: choose from {sorted(fields)}")
        kw[name] = {"True": True, "False": False}.get(
            value, int(value) if value.isdigit() else value
        )
    return mosaic_gpu.Config(**kw)


def compile_report(fn, args, dump: Path) -> list[dict]:
    """Compile fn(*args) for the abstract GPU with ptxas dumps into `dump`; one row per kernel."""
    import jax

    dump.mkdir(parents=True, exist_ok=True)
    os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
    os.environ["MOSAIC_GPU_DUMP_TO"] = str(dump)
    jax.jit(fn).lower(*args).compile()
    files = sorted(dump.glob("*.ptxas"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    return [parse_ptxas(f.read_text()) for f in files]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.attention.ptxas_report", description=__doc__.splitlines()[0]
    )
    p.add_argument("--shape", default="4,4096,32,8,128", help="B,T,H,K,D (K: KV heads)")
    p.add_argument(
        "--configs",
        default=";backward=mosaic_gpu",
        help="';'-separated Config overrides; a config whose backward is mosaic_gpu "
        "also compiles the gradient",
    )
    p.add_argument("--causal", default="1", choices=("0", "1"))
    a = p.parse_args(argv)
    devices = aot_gpu.gpu_devices(1)
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from pallas_kernels import api

    b, t, h, kh, d = (int(x) for x in a.shape.split(","))
    mesh = jax.sharding.Mesh(devices, ("x",))
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(mesh, P()))  # noqa: E731
    args = (sds(b, t, h, d), sds(b, t, kh, d), sds(b, t, kh, d))
    causal = a.causal == "1"
    print(
        f"# B{b} T{t} H{h}/{kh} D{d} {'causal' if causal else 'full'}, sm_90a "
        f"({devices[0].device_kind}, compiled without a device)"
    )
    print("| config | pass | kernel | registers | spill st/ld bytes | warnings |")
    print("| --- | --- | --- | ---: | ---: | --- |")
    for text in a.configs.split(";"):
        cfg = _config(text)

        def fwd(q, k, v, cfg=cfg):
            return api.attention(
                q, k, v, causal=causal, implementation="mosaic_gpu", config=cfg, interpret=False
            )

        def grad(q, k, v, cfg=cfg):
            return jax.grad(lambda *x: fwd(*x).astype(jnp.float32).sum(), argnums=(0, 1, 2))(
                q, k, v
            )

        own_bwd = cfg.backward.startswith("mosaic_gpu")
        passes = [("forward", fwd)] + ([("gradient", grad)] if own_bwd else [])
        for name, fn in passes:
            with tempfile.TemporaryDirectory() as tmp:
                for r in compile_report(fn, args, Path(tmp)):
                    print(
                        f"| {text or 'default'} | {name} | {r['kernel']} | {r['registers']} | "
                        f"{r['spill_stores']}/{r['spill_loads']} | "
                        f"{'; '.join(r['warnings']) or '-'} |",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
