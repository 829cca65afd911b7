"""`jaxturbo ladderize`: convert a pretrained Llama to hybrid Ladder-Residual, optionally heal it.

The last N layers read the residual stream one module late (Ladder-Residual, Zhang et al.
2025), which lets tensor parallelism overlap each all-reduce with the next module.  The
conversion changes no weight (`jaxturbo.convert.ladderize`), and without training it costs
quality; `--heal-steps S` distils the converted model toward the original (token-level KL,
`jaxturbo.convert.distill`).  Written as an HF directory that transformers loads with
`trust_remote_code=True` (`jaxturbo.bridge.ladder_hf`), with ladder_conversion.json (the
perplexities, the token ranges each stage read) and, after healing, heal/ (metrics.jsonl,
TensorBoard events, kl.png).

Data, all from the tokens of --heal-data (default: the shipped WikiText-2 validation text; no
training split is shipped, so its first part is the held-in training part): the last
--eval-tokens tokens are held out and only scored (perplexity before conversion, after it and
after healing, in windows of --eval-window); healing trains on every position of consecutive
--heal-len windows from the start of the tokens before them (cycled when the steps need
more), never on a held-out token.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from jaxturbo.cli.common import add_model_arguments, read_text_file
from jaxturbo.data import WIKITEXT2_VALID
from jaxturbo.errors import UserError

NAME = "ladderize"
HELP = (
    "convert a Llama to hybrid Ladder-Residual on its last N layers, optionally heal it by "
    "distillation; write an HF directory"
)
# the measured cost of converting without training (experiments/ladderize/results/
# ppl_smollm2-135m.md): the epilog and the note after a conversion without --heal-steps
QUALITY_COST = (
    "converting layers without training costs quality: WikiText-2 perplexity x1.46 "
    "with 8 of SmolLM2-135M's 30 layers converted, x3.4 with 15 "
    "(experiments/ladderize/RESULTS.md)"
)
EPILOG = (
    QUALITY_COST[0].upper() + QUALITY_COST[1:] + ". --heal-steps S recovers part of it: "
    "S steps of KL distillation toward the original model.  Data: healing trains on the "
    "first tokens of --heal-data (default: the shipped WikiText-2 validation text, whose "
    "first part serves as the training part), the perplexities score its last "
    "--eval-tokens tokens, which healing never reads."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    add_model_arguments(p, dtype_default=None)  # None: the weights' stored dtype
    p.add_argument(
        "--ladder-layers",
        "--layers",
        dest="layers",
        type=int,
        required=True,
        metavar="N",
        help="Ladder-Residual on the last N layers (0 .. number of layers); without "
        "--heal-steps this costs quality (see below)",
    )
    p.add_argument("--out", required=True, help="output directory (must not exist yet)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument(
        "--heal-steps",
        type=int,
        default=0,
        help="KL-distillation steps toward the original model after conversion, "
        "trained on every token of --heal-len windows from the start of "
        "--heal-data (cycled if the text runs out), never on the held-out "
        "last --eval-tokens tokens that are scored; 0: no healing",
    )
    p.add_argument(
        "--heal-data",
        default=str(WIKITEXT2_VALID),
        help="text (UTF-8): healing trains on its start, the perplexity scores its "
        "held-out end (default: the shipped WikiText-2 validation text)",
    )
    p.add_argument("--heal-batch", type=int, default=4, help="rows per heal step")
    p.add_argument("--heal-len", type=int, default=256, help="tokens per heal window")
    p.add_argument("--heal-lr", type=float, default=1e-4, help="heal peak learning rate")
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=2048,
        help="perplexity before/after conversion and after healing of the last N "
        "tokens of --heal-data, held out from healing; 0 skips",
    )
    p.add_argument(
        "--eval-window",
        type=int,
        default=None,
        help="tokens per perplexity window (default: 512, or the model's context when shorter)",
    )


def _check(args: argparse.Namespace) -> None:
    for name in ("heal_batch", "heal_len", "eval_window"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    for name in ("heal_steps", "eval_tokens"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 0")
    if args.eval_tokens == 1:
        raise UserError("--eval-tokens 1: a perplexity needs >= 2 tokens (0 skips it)")
    if not args.heal_lr > 0:
        raise UserError(f"--heal-lr {args.heal_lr} must be > 0")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise UserError(
            f"output directory {out} already exists and is not empty; choose another "
            "--out or pass --overwrite"
        )


def run(args: argparse.Namespace) -> int:
    _check(args)
    import jax
    import numpy as np

    from jaxturbo.bridge import load_hf, load_tokenizer, resolve_model
    from jaxturbo.bridge.ladder_hf import save_ladder_hf
    from jaxturbo.convert.ladderize import (
        heal,
        heal_batches,
        ladder_config,
        ladderize,
        split_held_out,
    )
    from jaxturbo.models.config import ModelConfig

    src = resolve_model(args.model)
    # the range check needs only config.json: fail before reading weights or text
    src_cfg = ModelConfig.from_json(src / "config.json")
    ladder_config(src_cfg, args.layers)
    if args.layers == 0 and args.heal_steps:
        # the student would be the teacher itself: KL 0, a zero gradient
        print(
            "--ladder-layers 0 leaves the model unchanged: nothing to heal, --heal-steps ignored",
            file=sys.stderr,
        )
        args.heal_steps = 0
    ctx = src_cfg.max_position_embeddings
    if args.eval_window is None:
        args.eval_window = min(512, ctx)
    for flag, value, used in (
        ("--eval-window", args.eval_window, args.eval_tokens > 0),
        ("--heal-len", args.heal_len, args.heal_steps > 0),
    ):
        if used and value > ctx:
            raise UserError(
                f"{flag} {value} is larger than the model's context of {ctx} tokens; "
                f"choose {flag} <= {ctx}"
            )
    n_eval, uses_text = args.eval_tokens, args.eval_tokens > 0 or args.heal_steps > 0
    if uses_text:
        text = read_text_file(args.heal_data)
        try:
            tok = load_tokenizer(src)
        except UserError as e:
            raise UserError(
                f"{e}: healing and the perplexity need one (--eval-tokens 0 and no "
                "--heal-steps convert without)"
            ) from None
        ids = np.asarray(tok.encode(text, add_special_tokens=False), np.int32)
        need = n_eval + (args.heal_batch * args.heal_len if args.heal_steps else 0)
        if need > len(ids):
            raise UserError(
                f"{args.heal_data} has {len(ids)} tokens, fewer than evaluation "
                f"({n_eval}) plus one heal batch ({args.heal_batch} x "
                f"{args.heal_len}); lower --eval-tokens/--heal-batch/--heal-len"
            )
        # the scored tokens are held out: healing sees only train_ids
        train_ids, eval_ids = split_held_out(ids, n_eval)
    print(f"loading {src}", file=sys.stderr)
    cfg, params, _ = load_hf(src, dtype=args.dtype)
    params = jax.tree.map(np.asarray, params)
    lcfg = ladderize(params, cfg, args.layers)
    summary: dict = {
        "layers": cfg.num_hidden_layers,
        "ladder_layers": args.layers,
        "heal_steps": args.heal_steps,
    }
    if uses_text:
        summary["data"] = str(args.heal_data)

    def score(p, c) -> float:
        from jaxturbo.inference import perplexity

        return perplexity(
            p, c, eval_ids, window=min(args.eval_window, n_eval), batch_size=2
        ).perplexity

    if n_eval:
        summary["ppl_before"] = score(params, cfg)
        if not args.heal_steps:
            summary["ppl_converted"] = score(params, lcfg)
    out_params, heal_log = params, None
    if args.heal_steps:
        hb = heal_batches(
            train_ids,
            args.heal_steps,
            args.heal_batch,
            args.heal_len,
            flags="--heal-batch or --heal-len",
        )
        out = Path(args.out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        heal_log = Path(tempfile.mkdtemp(prefix=f"{out.name}.heal-", dir=out.parent))
        try:
            evaluate = (lambda p, step: {"perplexity": score(p, lcfg)}) if n_eval else None
            res = heal(
                params,
                lcfg,
                cfg,
                hb,
                steps=args.heal_steps,
                lr=args.heal_lr,
                out_dir=heal_log,
                evaluate=evaluate,
            )
            # the weights' own dtype (float32 master weights while healing)
            out_params = jax.tree.map(
                lambda h, o: np.asarray(h).astype(o.dtype), res.params, params
            )
            summary.update(
                heal_batch=args.heal_batch,
                heal_len=args.heal_len,
                heal_lr=args.heal_lr,
                heal_tokens=args.heal_steps * args.heal_batch * args.heal_len,
                kl_first=res.history[0]["loss"],
                kl_last=res.history[-1]["loss"],
            )
            if n_eval:
                summary["ppl_converted"] = res.evals[0]["perplexity"]
                summary["ppl_healed"] = res.evals[-1]["perplexity"]
            # token index ranges of --heal-data each stage read ([start, end)); disjoint
            summary["data_tokens"] = {"heal": [0, sum(b.size for b in hb)]}
        except BaseException:
            shutil.rmtree(heal_log, ignore_errors=True)
            raise
    if n_eval:
        summary.setdefault("data_tokens", {})["evaluation"] = [len(train_ids), len(ids)]
    try:
        out = save_ladder_hf(
            out_params,
            lcfg,
            args.out,
            tokenizer_src=src,
            overwrite=args.overwrite,
            extra_files={"ladder_conversion.json": json.dumps(summary, indent=1)},
            extra_dirs={"heal": heal_log} if heal_log else None,
        )
    finally:
        if heal_log is not None:
            shutil.rmtree(heal_log, ignore_errors=True)
    _print_summary(summary, n_eval, args)
    print(
        f"wrote {out} (Ladder-Residual on the last {lcfg.ladder_layers} of "
        f"{lcfg.num_hidden_layers} layers; load with trust_remote_code=True)"
    )
    return 0


def _print_summary(s: dict, n_eval: int, args: argparse.Namespace) -> None:
    """What each stage read and scored: the heal tokens, the held-out perplexities, and the
    quality note when converted layers were not healed."""
    if "heal_tokens" in s:
        a, b = s["data_tokens"]["heal"]
        print(
            f"healing: {s['heal_steps']} steps x {s['heal_batch']} x {s['heal_len']} tokens "
            f"({s['heal_tokens']} in all) of KL distillation toward the original model, peak "
            f"lr {s['heal_lr']:g}, trained on tokens [{a}, {b}) of {args.heal_data}; training "
            f"KL {s['kl_first']:.4f} at step 1, {s['kl_last']:.4f} at step {s['heal_steps']}"
        )
    if "ppl_before" in s:
        base = s["ppl_before"]
        a, b = s["data_tokens"]["evaluation"]
        print(
            f"perplexity of tokens [{a}, {b}) of {args.heal_data} (the last {n_eval}, held out: "
            f"never trained on; windows of {min(args.eval_window, n_eval)}):"
        )
        print(f"  before conversion  {base:12.3f}")
        print(
            f"  after conversion   {s['ppl_converted']:12.3f}  (x{s['ppl_converted'] / base:.3f})"
        )
        if "ppl_healed" in s:
            print(
                f"  after healing      {s['ppl_healed']:12.3f}  "
                f"(x{s['ppl_healed'] / base:.3f}; {s['heal_steps']} steps)"
            )
    if s["ladder_layers"] and not s["heal_steps"]:
        print(
            f"note: {QUALITY_COST}; --heal-steps S heals the converted model by KL "
            "distillation toward the original"
        )
