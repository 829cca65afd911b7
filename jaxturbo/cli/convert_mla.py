"""`jaxturbo convert-mla`: convert a GQA model to multi-head latent attention (CARE).

Data, all from the tokens of --calib-data: the last --eval-tokens tokens are held out and only
scored (perplexity before/after, in windows of --eval-window); calibration reads the first
--calib-samples x --calib-len tokens before them, and healing trains on every position of
consecutive --calib-len windows from the start of those same training tokens (cycled when the
steps need more; overlapping the calibration tokens), never on a held-out token.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jaxturbo.cli.common import read_text_file
from jaxturbo.data import WIKITEXT2_VALID
from jaxturbo.errors import UserError

NAME = "convert-mla"
HELP = "convert a GQA model to MLA (CARE) and export a DeepSeek-V3 HF directory"
_DEFAULT_DATA = WIKITEXT2_VALID


def add_arguments(p: argparse.ArgumentParser) -> None:
    from jaxturbo.convert.mla.factorize import METHODS, RANK_MODES
    from jaxturbo.convert.mla.rope_select import LAYOUTS

    p.add_argument(
        "--model",
        required=True,
        help="registry name (e.g. smollm2-135m), HF directory, or .gguf file",
    )
    p.add_argument("--out", required=True, help="output DeepSeek-V3 HF directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--method",
        choices=METHODS,
        default="care",
        help="svd-joint: SVD of [W_k; W_v] (MHA2MLA); svd: K and V separately; "
        "care: covariance-whitened SVD",
    )
    p.add_argument(
        "--ranks",
        choices=RANK_MODES,
        default="uniform",
        help="uniform latent width, or water-filled across layers and K/V",
    )
    p.add_argument(
        "--kv-budget",
        type=float,
        default=1.0,
        help="(latent + rope key) per token as a fraction of the GQA K+V cache",
    )
    p.add_argument(
        "--rope-dim", type=int, default=None, help="shared rope key width (default: head_dim/2)"
    )
    p.add_argument(
        "--rope-layout",
        choices=LAYOUTS,
        default="geometric",
        help="geometric: DeepSeek-exportable frequencies; free: jaxturbo-only",
    )
    p.add_argument(
        "--rope-criterion",
        choices=("energy", "rotation"),
        default="rotation",
        help="rank (kv head, frequency) pairs by score energy, or by energy times how "
        "much the pair rotates over --calib-len tokens",
    )
    p.add_argument("--alpha", type=float, default=0.01, help="covariance shrinkage in [0, 1]")
    p.add_argument(
        "--calib-data",
        default=str(_DEFAULT_DATA),
        help="text (UTF-8) for calibration, healing and the held-out perplexity",
    )
    p.add_argument(
        "--calib-samples",
        type=int,
        default=32,
        help="calibration windows, from the start of --calib-data",
    )
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=2048,
        help="perplexity before/after of the last N tokens of --calib-data, held out "
        "from calibration and healing; 0 skips",
    )
    p.add_argument("--eval-window", type=int, default=512, help="tokens per perplexity window")
    p.add_argument(
        "--heal-steps",
        type=int,
        default=0,
        help="KL-distillation steps after conversion, trained on every token of "
        "--calib-len windows from the start of --calib-data (cycled if the text "
        "runs out), never on the held-out perplexity windows",
    )
    p.add_argument("--heal-batch", type=int, default=4, help="rows per heal step")
    p.add_argument("--heal-lr", type=float, default=1e-4, help="heal peak learning rate")


def _check(args: argparse.Namespace) -> None:
    if not 0 < args.kv_budget <= 2:
        raise UserError(f"--kv-budget {args.kv_budget} must be in (0, 2]")
    if not 0 <= args.alpha <= 1:
        raise UserError(f"--alpha {args.alpha} must be in [0, 1]")
    for name in ("calib_samples", "calib_len", "eval_window", "heal_batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    for name in ("heal_steps", "eval_tokens"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 0")
    if args.eval_tokens == 1:
        raise UserError("--eval-tokens 1: a perplexity needs >= 2 tokens (0 skips it)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(
            f"output directory {out} already exists and is not empty; choose another "
            "--out or pass --overwrite"
        )


def run(args: argparse.Namespace) -> int:
    _check(args)
    import jax

    from jaxturbo.bridge import load_model
    from jaxturbo.bridge.deepseek import save_deepseek
    from jaxturbo.convert.mla.calibrate import (
        attention_input_covariance,
        calibration_batches,
        split_held_out,
    )
    from jaxturbo.convert.mla.convert import convert_to_mla
    from jaxturbo.convert.mla.evaluate import mla_perplexity
    from jaxturbo.convert.mla.heal import heal, heal_batches
    from jaxturbo.inference import perplexity, window_plan
    from jaxturbo.models.mla import MLAConfig

    text = read_text_file(args.calib_data)
    cfg, params, tok = load_model(args.model)
    if isinstance(cfg, MLAConfig):
        raise UserError(
            f"--model {args.model} is already an MLA (DeepSeek-V3) model; "
            "convert-mla takes a GQA model (llama family)"
        )
    params = jax.tree.map(np.asarray, params)
    ids = np.asarray(tok.encode(text, add_special_tokens=False), np.int32)
    n_eval = args.eval_tokens
    if args.calib_samples * args.calib_len + n_eval > len(ids):
        raise UserError(
            f"{args.calib_data} has {len(ids)} tokens, fewer than calibration "
            f"({args.calib_samples} x {args.calib_len}) plus evaluation ({n_eval}); "
            "lower --calib-samples/--calib-len/--eval-tokens"
        )
    # the scored tokens are held out: calibration and healing see only train_ids
    train_ids, eval_ids = split_held_out(ids, n_eval)
    batches = calibration_batches(train_ids, args.calib_samples, args.calib_len)
    hb = (
        heal_batches(train_ids, args.heal_steps, args.heal_batch, args.calib_len)
        if args.heal_steps
        else []
    )
    with tqdm(total=args.calib_samples, desc="calibrate", unit="sample") as bar:
        cov = attention_input_covariance(params, cfg, batches, progress=bar.update)
    with tqdm(total=cfg.num_hidden_layers, desc=f"factorise ({args.method})", unit="layer") as bar:
        res = convert_to_mla(
            params,
            cfg,
            cov,
            method=args.method,
            ranks=args.ranks,
            kv_budget=args.kv_budget,
            rope_dim=args.rope_dim,
            rope_layout=args.rope_layout,
            alpha=args.alpha,
            rope_criterion=args.rope_criterion,
            context=args.calib_len,
            progress=bar.update,
        )
    mparams = res.params
    if args.heal_steps:
        with tqdm(total=args.heal_steps, desc="heal", unit="step") as bar:

            def tick(m: dict) -> None:
                bar.set_postfix(kl=f"{m['kl']:.4f}")
                bar.update(1)

            mparams = jax.tree.map(
                np.asarray,
                heal(
                    mparams,
                    res.cfg,
                    params,
                    cfg,
                    hb,
                    steps=args.heal_steps,
                    lr=args.heal_lr,
                    progress=tick,
                ),
            )
    summary = res.summary()
    summary["heal_tokens"] = args.heal_steps * args.heal_batch * args.calib_len
    # token index ranges of --calib-data each stage read ([start, end)); evaluation is disjoint
    summary["data_tokens"] = {
        "calibration": [0, args.calib_samples * args.calib_len],
        "heal": [0, sum(b.size for b in hb)],
        "evaluation": [len(train_ids), len(ids)],
    }
    if n_eval:
        windows = len(window_plan(n_eval, args.eval_window, args.eval_window))
        with tqdm(total=2 * windows, desc="perplexity", unit="window") as bar:
            summary["ppl_before"] = perplexity(
                params, cfg, eval_ids, window=args.eval_window, progress=bar.update
            ).perplexity
            summary["ppl_after"] = mla_perplexity(
                mparams, res.cfg, eval_ids, window=args.eval_window, progress=bar.update
            ).perplexity
    out = save_deepseek(
        mparams,
        res.cfg,
        args.out,
        tok,
        overwrite=args.overwrite,
        extra_files={"mla_conversion.json": json.dumps(summary, indent=1)},
    )
    _print_summary(summary, out)
    return 0


def _print_summary(s: dict, out: Path) -> None:
    L = len(s["rank_k"])
    print(
        f"\nMLA conversion: method={s['method']} ranks={s['ranks']} kv_budget={s['kv_budget']} "
        f"rope_dim={s['rope_dim']} kv_lora_rank={s['kv_lora_rank']}"
    )
    print("layer  rank_k  rank_v  latent")
    for i in range(L):
        print(
            f"{i:5d}  {s['rank_k'][i]:6d}  {s['rank_v'][i]:6d}  {s['rank_k'][i] + s['rank_v'][i]:6d}"
        )
    b = 2  # bfloat16 cache
    print(
        f"KV cache per token (bf16): {s['kv_values_per_token_before'] * b} B before, "
        f"{s['kv_values_per_token_after'] * b} B after"
    )
    if s["kv_values_per_token_padded"] != s["kv_values_per_token_after"]:
        print(
            f"exported with every layer padded to kv_lora_rank: "
            f"{s['kv_values_per_token_padded'] * b} B per token "
            f"(+{(s['kv_values_per_token_padded'] / s['kv_values_per_token_after'] - 1) * 100:.1f}%)"
        )
    if "ppl_before" in s:
        print(
            f"perplexity: {s['ppl_before']:.3f} before, {s['ppl_after']:.3f} after"
            + (f" ({s['heal_tokens']} heal tokens)" if s["heal_tokens"] else "")
        )
    print(f"wrote {out}")
