"""`jaxturbo sft`: supervised fine-tuning on a JSONL/text file (`jaxturbo.train.sft`)."""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from jaxturbo.cli.common import (
    add_compute_dtype_argument,
    add_config_argument,
    add_mesh_argument,
    add_model_argument,
    add_run_arguments,
    config_yaml,
    save_every_of,
)

NAME = "sft"
HELP = (
    "supervised fine-tuning (packed sequences, assistant-only loss for chats) with resumable "
    "checkpoints"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    add_config_argument(p)
    p.add_argument(
        "--data",
        required=True,
        help="JSONL ({text} | {prompt, completion} | {messages}) or a text file "
        "(blank-line separated paragraphs)",
    )
    p.add_argument("--steps", type=int, required=True, help="optimizer steps in total")
    p.add_argument(
        "--out",
        required=True,
        help="run directory: checkpoints/, metrics.jsonl, "
        "tensorboard/, loss.png, eval.json, config.yaml, hf/ (the final model), "
        "adapter/ (with --lora-rank)",
    )
    add_mesh_argument(p)
    p.add_argument(
        "--sequence-parallel",
        default="none",
        choices=("none", "ulysses", "ring", "hybrid"),
        help="split each row's tokens over the mesh's sequence axis: ulysses "
        "(all-to-all, sequence size must divide the heads), ring (K/V blocks "
        "rotate, zigzag causal balance), hybrid (ulysses inside, ring across); "
        "composes with data, fsdp, expert and tensor",
    )
    p.add_argument("--batch-size", type=int, default=8, help="global rows per step")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per packed row")
    add_compute_dtype_argument(p)
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument(
        "--warmup", type=int, default=None, help="warm-up steps (default: steps/10, at most 100)"
    )
    p.add_argument(
        "--min-lr-ratio",
        type=float,
        default=0.1,
        help="final learning rate of the cosine decay, as a fraction of --lr",
    )
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: none)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument(
        "--remat",
        default="none",
        choices=("none", "dots", "full"),
        help="rematerialisation: keep every activation, only matmul outputs, or "
        "only each layer's input",
    )
    p.add_argument(
        "--remat-scope",
        default="loss",
        choices=("loss", "layer"),
        help="--remat around the whole loss, or around each layer (the backward then "
        "holds one layer's activations at a time: large models)",
    )
    p.add_argument(
        "--unroll-layers",
        action="store_true",
        help="a Python loop over layers instead of lax.scan: faster steps on GPU "
        "(Llama-1B on H100: 41%% -> 48%% MFU), longer compile",
    )
    p.add_argument(
        "--loss-chunk-tokens",
        type=int,
        default=0,
        help="compute the LM head + cross-entropy this many tokens at a time, never "
        "holding the full logits (0: all at once); frees memory for larger batches",
    )
    p.add_argument(
        "--normalize",
        default="token",
        choices=("token", "sequence"),
        help="loss normalisation: per trained token, or per sequence",
    )
    g = p.add_argument_group(
        "LoRA and mixture-of-experts (a MoE model's experts split over the mesh's expert axis, "
        "e.g. --mesh cpu-8-moe or h100x8-moe)"
    )
    g.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        metavar="R",
        help="train rank-R LoRA adapters only, the base weights frozen (0: full "
        "fine-tuning); OUT/hf is then the merged model and OUT/adapter the "
        "adapters (PEFT names)",
    )
    g.add_argument(
        "--lora-alpha",
        type=float,
        default=None,
        metavar="A",
        help="adapter scale A / R (default: A = R, scale 1)",
    )
    g.add_argument(
        "--lora-targets",
        nargs="+",
        default=None,
        metavar="TARGET",
        help="projections that get adapters: attn (q, k, v, o), experts (gate, up, "
        "down of every expert) or module names (q_proj, v_proj, gate_proj, "
        "mlp.experts.down_proj, ...) (default: attn, and experts on a "
        "mixture-of-experts model)",
    )
    g.add_argument(
        "--moe-capacity-factor",
        type=float,
        default=None,
        metavar="F",
        help="cap each expert at ceil(F * pairs / experts) of a device's (token, "
        "expert) pairs, dropping the rest (the dropped fraction is logged) "
        "(default: dropless)",
    )
    add_run_arguments(p, save_every=100)
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=0,
        help="if > 0: perplexity of the first N tokens of the data (held-in) before "
        "and after training, in windows of --seq-len; written to eval.json",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="with --eval-tokens: also every K steps (0: only before and after)",
    )
    g = p.add_argument_group(
        "multi-host (JAX's distributed runtime; TPU pods and SLURM are detected without these)"
    )
    g.add_argument(
        "--coordinator",
        default=None,
        help="HOST:PORT of process 0's coordinator (default: none, one process)",
    )
    g.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="processes in the run (default: none, one process)",
    )
    g.add_argument(
        "--process-id",
        type=int,
        default=None,
        help="this process's index (default: none, one process)",
    )


def run(args: argparse.Namespace) -> int:
    from jaxturbo.train.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)  # before any device query
    from jaxturbo.bridge import export_hf, load_model
    from jaxturbo.data import read_records
    from jaxturbo.parallel.mesh import make_mesh
    from jaxturbo.train.optimizer import OptimizerConfig
    from jaxturbo.train.sft import RunConfig, run_sft
    from jaxturbo.train.step import TrainConfig

    warmup = args.warmup if args.warmup is not None else min(100, args.steps // 10)
    opt = OptimizerConfig(
        learning_rate=args.lr,
        warmup_steps=warmup,
        total_steps=args.steps,
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        clip_norm=args.clip or None,
    )
    train = TrainConfig(
        compute_dtype=args.compute_dtype,
        grad_accum=args.grad_accum,
        remat=args.remat,
        normalize=args.normalize,
        unroll_layers=args.unroll_layers,
        remat_scope=args.remat_scope,
        loss_chunk_tokens=args.loss_chunk_tokens,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=None if args.lora_targets is None else tuple(args.lora_targets),
        moe_capacity_factor=args.moe_capacity_factor,
    )
    run_cfg = RunConfig(
        out_dir=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        save_every=save_every_of(args),
        keep=args.keep,
        resume=args.resume,
        eval_every=args.eval_every,
        sequence_parallel=args.sequence_parallel,
    )
    train.validate()
    records = read_records(args.data)  # bad lines fail here, before the model loads
    mesh = make_mesh(args.mesh) if args.mesh else None
    run_cfg.check(mesh, args.grad_accum)  # mesh against --sequence-parallel, batch, ...
    cfg, params, tokenizer = load_model(args.model)
    data = Path(args.data)
    data_id = f"{data.name}:sha256={hashlib.sha256(data.read_bytes()).hexdigest()[:16]}"

    lora = train.lora

    def export(p, out):
        if lora is None:
            return export_hf(p, cfg, out, tokenizer=tokenizer, overwrite=True)
        # LoRA: p is {"base", "lora"}; the adapters beside the merged model
        from jaxturbo.bridge.lora import export_merged_hf, save_adapters

        adapters = save_adapters(
            p["lora"], p["base"], lora, Path(out).parent / "adapter", base_model=args.model
        )
        print(f"adapters written to {adapters}", file=sys.stderr)
        return export_merged_hf(p["base"], p["lora"], lora, cfg, out, tokenizer, overwrite=True)

    run_sft(
        cfg,
        params,
        tokenizer,
        records,
        run_cfg,
        opt_cfg=opt,
        train_cfg=train,
        mesh=mesh,
        data_id=data_id,
        eval_tokens=args.eval_tokens,
        export=None if args.no_export else export,
        files={"config.yaml": config_yaml(args._parser, args)},
    )
    return 0
