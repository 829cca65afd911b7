"""Arguments and helpers shared by the sub-commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxturbo.errors import UserError

DTYPES = ("float32", "bfloat16")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="registry name (e.g. smollm2-135m), HF directory, or .gguf file")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="parameter/compute dtype")


def add_mesh_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default=None,
                   help="mesh preset (see meshes/) or sizes like tensor=4,data=2 (default: one device)")


# Decode on GPU: cuBLAS GEMVs instead of XLA's Triton GEMM fusions, and no dot merger (it
# concatenated each layer's q/k/v and gate/up weights on every token: 3.51 -> 2.35 ms per step
# for one GPU's share of a TP-4 Llama-8B decode, experiments/ladder/NOTES.md).  Measured for
# decoding only, so only the decoding commands ask for them.
DECODE_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false", "--xla_gpu_dot_merger_threshold_mb=0")


def use_decode_xla_flags() -> None:
    """Add DECODE_XLA_FLAGS to XLA_FLAGS (flags the user set win).  Must run before JAX starts
    its backend, i.e. before the model is loaded; CPU ignores these GPU flags."""
    import os
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in DECODE_XLA_FLAGS if f.split("=")[0] not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


def tensor_parallel_setup(mesh_spec: str | None, cfg, params, batch: int):
    """(params, mesh) for inference over `--mesh`'s tensor (and data) axes; (params, None)
    without a mesh.  Bad meshes (wrong device count, fsdp/sequence axes, a tensor size that does
    not divide heads / KV heads / hidden / vocab, a batch the data axis does not divide) raise
    UserError naming the valid choices, before anything is compiled."""
    if not mesh_spec:
        return params, None
    from jaxturbo.inference import fused
    from jaxturbo.parallel import tensor
    from jaxturbo.parallel.mesh import make_mesh
    mesh = make_mesh(mesh_spec)
    tensor.check_mesh(cfg, mesh, batch)
    # q/k/v and gate/up as one matrix each: the same logits, decode 1.10x faster at TP 4 on
    # 4x H100 (experiments/ladder/RESULTS.md)
    if fused.can_fuse(params["layers"]):
        return fused.shard_fused(params, cfg, mesh), mesh
    return tensor.shard_params(params, cfg, mesh), mesh


def read_text_file(path: str) -> str:
    f = Path(path)
    if not f.is_file():
        raise UserError(f"data file {path} does not exist")
    text = f.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UserError(f"data file {path} is empty; give a text file with content")
    return text
