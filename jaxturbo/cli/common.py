"""Arguments and helpers shared by the sub-commands.

One meaning per flag name across commands:
  --dtype         parameter and compute dtype: the weights are cast to it (generate, ppl,
                  export-hf, ladderize).  Training commands keep float32 master weights and
                  take --compute-dtype, the dtype of the step's matmuls (sft, rl).
  --batch-size    rows per optimizer step (sft); ppl's windows per forward pass is
                  --windows-per-batch.
  --eval-every    evaluate every N steps (0: before and after only); --eval-tokens: tokens of
                  the before/after perplexity (sft, convert-mla, ladderize); --eval-problems:
                  held-out problems (rl).
  --save-every, --keep, --resume, --no-checkpoint, --no-export: the same in sft and rl.
  --config FILE.yaml (sft, rl): flag values from a YAML mapping whose keys are the flag names
                  (dashes or underscores); flags on the command line win.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from jaxturbo.errors import UserError

DTYPES = ("float32", "bfloat16")


def add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="registry name (e.g. smollm2-135m), HF directory, or .gguf file",
    )


def add_model_arguments(p: argparse.ArgumentParser, dtype_default: str | None = "float32") -> None:
    """--model and --dtype (the weights are cast to it; None: kept as stored)."""
    add_model_argument(p)
    p.add_argument(
        "--dtype",
        default=dtype_default,
        choices=DTYPES,
        help="parameter and compute dtype: the weights are cast to it"
        + ("" if dtype_default else " (default: the dtype they are stored in)"),
    )


def add_compute_dtype_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compute-dtype",
        default="float32",
        choices=DTYPES,
        help="dtype of the train step's matmuls; the master weights and optimizer "
        "state stay float32",
    )


def add_mesh_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mesh",
        default=None,
        help="mesh preset (see meshes/) or sizes like tensor=4,data=2 (default: one device)",
    )


def add_run_arguments(p: argparse.ArgumentParser, *, save_every: int) -> None:
    """The training commands' output, checkpoint and export flags (sft, rl)."""
    p.add_argument(
        "--save-every",
        type=int,
        default=save_every,
        help="orbax checkpoint every N steps and at the end (0: at the end only)",
    )
    p.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="write no checkpoint (orbax is then not imported)",
    )
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept (the newest)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in OUT/checkpoints (the same "
        "settings; the following steps equal an uninterrupted run's)",
    )
    p.add_argument(
        "--no-export",
        action="store_true",
        help="do not write the final model as an HF directory (OUT/hf)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the run")


def save_every_of(args: argparse.Namespace) -> int | None:
    """--save-every, or None with --no-checkpoint (refusing --resume without checkpoints)."""
    if not args.no_checkpoint:
        return args.save_every
    if args.resume:
        raise UserError("--resume needs checkpoints; drop --no-checkpoint")
    return None


def add_config_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE.yaml",
        help="flag values from a YAML mapping whose keys are flag names (dashes or "
        "underscores); flags on the command line override it; the resolved "
        "values are written to OUT/config.yaml (default: none)",
    )


def _long_option(action: argparse.Action) -> str | None:
    longs = [s for s in action.option_strings if s.startswith("--")]
    return longs[0] if longs else None


def _config_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """{key: action} of the flags a config file may set (key: the flag without "--", with
    underscores)."""
    out = {}
    for a in parser._actions:
        opt = _long_option(a)
        if opt and a.dest not in ("help", "version", "config"):
            out[opt[2:].replace("-", "_")] = a
    return out


def expand_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """argv with the flags of its `--config FILE.yaml` put in front (so the command line's own
    flags, parsed later, win).  Unknown keys: a UserError naming them and the valid ones."""
    if not any("--config" in a.option_strings for a in parser._actions):
        return argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return argv
    import yaml

    path = Path(known.config)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if values is None:
        return argv
    if not isinstance(values, dict):
        raise UserError(
            f"--config {path}: expected a mapping of flag names to values, got "
            f"{type(values).__name__}"
        )
    actions = _config_actions(parser)
    norm = {str(k).lstrip("-").replace("-", "_"): v for k, v in values.items()}
    unknown = [k for k in values if str(k).lstrip("-").replace("-", "_") not in actions]
    if unknown:
        raise UserError(
            f"--config {path}: unknown keys {', '.join(map(str, unknown))}; valid "
            f"keys: {', '.join(sorted(actions))}"
        )
    front: list[str] = []
    for key, value in norm.items():
        action = actions[key]
        flag = _long_option(action)
        if value is None:
            continue
        if action.nargs == 0:  # store_true / store_false switches
            if not isinstance(value, bool):
                raise UserError(
                    f"--config {path}: {key} is a switch; give true or false (got {value!r})"
                )
            if value != action.default:
                front.append(flag)
            continue
        if action.nargs in ("+", "*") and isinstance(value, list):  # one flag, all its values
            front += [flag, *map(str, value)]
            continue
        for v in value if isinstance(value, list) else [value]:
            front += [flag, str(v)]
    return front + argv


def config_yaml(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The run's resolved flag values as YAML (keys: flag names with underscores), what the
    training commands write to OUT/config.yaml and `--config` reads back."""
    import yaml

    values = {key: getattr(args, a.dest) for key, a in _config_actions(parser).items()}
    return yaml.safe_dump(values, sort_keys=False)


def flag_names(message: str, parser: argparse.ArgumentParser) -> str:
    """A library error in the command's own flag names: "group_size=1" -> "--group-size 1", and
    "async_rollouts=True" -> "--async" for a switch (dest names of `parser`'s flags only)."""
    for a in parser._actions:
        opt = _long_option(a)
        if not opt or a.dest in ("help", "version"):
            continue
        pat = rf"(?<![\w-]){re.escape(a.dest)}="
        if a.nargs == 0:
            message = re.sub(pat + r"True\b", opt, message)
        message = re.sub(pat, opt + " ", message)
    return message


# Decode on GPU: cuBLAS GEMVs instead of XLA's Triton GEMM fusions, and no dot merger (it
# concatenated each layer's q/k/v and gate/up weights on every token: 3.51 -> 2.35 ms per step
# for one GPU's share of a TP-4 Llama-8B decode, experiments/ladder/RESULTS.md).  Measured for
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


def tensor_parallel_setup(mesh_spec: str | None, cfg: Any, params: Any, batch: int):
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
