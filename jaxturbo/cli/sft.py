"""`jaxturbo sft`: supervised fine-tuning on a JSONL/text file, with checkpoints and resume."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from jaxturbo.cli.common import add_mesh_argument, add_model_arguments
from jaxturbo.errors import UserError

NAME = "sft"
HELP = "supervised fine-tuning (packed sequences, assistant-only loss for chats) with resumable checkpoints"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)  # --dtype here is the compute dtype; master weights stay float32
    p.add_argument("--data", required=True,
                   help="JSONL ({text} | {prompt, completion} | {messages}) or a text file "
                        "(blank-line separated paragraphs)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps in total")
    p.add_argument("--out", required=True, help="run directory: checkpoints/, metrics.jsonl, "
                   "loss.png, hf/ (the final model as an HF directory)")
    add_mesh_argument(p)
    p.add_argument("--sequence-parallel", default="none", choices=("none", "ulysses", "ring", "hybrid"),
                   help="split each row's tokens over the mesh's sequence axis: ulysses "
                        "(all-to-all, sequence size must divide the heads), ring (K/V blocks "
                        "rotate, zigzag causal balance), hybrid (ulysses inside, ring across); "
                        "composes with data and fsdp, not yet with tensor")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--batch-size", type=int, default=8, help="global rows per step")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per packed row")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: steps/10, at most 100)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: none)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--remat", default="none", choices=("none", "dots", "full"))
    p.add_argument("--remat-scope", default="loss", choices=("loss", "layer"),
                   help="--remat around the whole loss, or around each layer (the backward then "
                        "holds one layer's activations at a time: large models)")
    p.add_argument("--unroll-layers", action="store_true",
                   help="a Python loop over layers instead of lax.scan: faster steps on GPU "
                        "(Llama-1B on H100: 41%% -> 48%% MFU), longer compile")
    p.add_argument("--loss-chunk-tokens", type=int, default=0,
                   help="compute the LM head + cross-entropy this many tokens at a time, never "
                        "holding the full logits (0: all at once); frees memory for larger batches")
    p.add_argument("--normalize", default="token", choices=("token", "sequence"),
                   help="loss normalisation: per trained token, or per sequence")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=0,
                   help="if > 0: perplexity of the first N tokens of the data (held-in) before "
                        "and after training, in windows of --seq-len; written to eval.json")
    p.add_argument("--no-export", action="store_true", help="do not write the final HF directory")
    g = p.add_argument_group("multi-host (JAX's distributed runtime; TPU pods and SLURM are "
                             "detected without these)")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0's coordinator")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the run")
    g.add_argument("--process-id", type=int, default=None, help="this process's index")


def _held_in_tokens(records: list[dict], tokenizer, n: int):
    import numpy as np
    from jaxturbo.data.tokenize import tokenize_record
    ids: list[int] = []
    for r in records:
        ids += tokenize_record(r, tokenizer)[0].tolist()
        if len(ids) >= n:
            break
    return np.asarray(ids[:n], np.int32)


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise UserError(f"--steps {args.steps} must be >= 1")
    from jaxturbo.train.distributed import initialize
    initialize(args.coordinator, args.num_processes, args.process_id)  # before any device query
    from jaxturbo.bridge import export_hf, load_model
    from jaxturbo.data import encode_documents, read_records
    from jaxturbo.inference.perplexity import perplexity
    from jaxturbo.parallel.mesh import make_mesh
    from jaxturbo.train.loop import RunConfig, train_sft
    from jaxturbo.train.optimizer import OptimizerConfig
    from jaxturbo.train.step import TrainConfig

    records = read_records(args.data)   # bad lines fail here, before the model loads
    mesh = make_mesh(args.mesh) if args.mesh else None
    if mesh is not None:   # mesh and --sequence-parallel agree? (heads are checked once loaded)
        from jaxturbo.train.sharding import check_training_mesh
        check_training_mesh(mesh, args.sequence_parallel)
    elif args.sequence_parallel != "none":
        raise UserError(f"--sequence-parallel {args.sequence_parallel} needs --mesh with a "
                        "sequence axis (e.g. --mesh data=2,sequence=4)")
    cfg, params, tokenizer = load_model(args.model)
    if args.seq_len > cfg.max_position_embeddings:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's context of "
                        f"{cfg.max_position_embeddings}")
    if args.sequence_parallel != "none":   # heads / seq_len / ring size, before any compile
        from jaxturbo.parallel.sequence import model_layout
        model_layout(args.sequence_parallel, cfg, mesh, batch=args.batch_size // args.grad_accum,
                     seq_len=args.seq_len)
    docs = encode_documents(records, tokenizer, args.seq_len)
    data_id = f"{Path(args.data).name}:sha256={hashlib.sha256(Path(args.data).read_bytes()).hexdigest()[:16]}"
    warmup = args.warmup if args.warmup is not None else min(100, args.steps // 10)
    opt = OptimizerConfig(learning_rate=args.lr, warmup_steps=warmup, total_steps=args.steps,
                          min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
                          clip_norm=args.clip or None)
    train = TrainConfig(compute_dtype=args.dtype, grad_accum=args.grad_accum, remat=args.remat,
                        normalize=args.normalize, unroll_layers=args.unroll_layers,
                        remat_scope=args.remat_scope,
                        loss_chunk_tokens=args.loss_chunk_tokens)
    run_cfg = RunConfig(out_dir=args.out, steps=args.steps, batch_size=args.batch_size,
                        seq_len=args.seq_len, seed=args.seed, save_every=args.save_every,
                        keep=args.keep, resume=args.resume,
                        sequence_parallel=args.sequence_parallel)
    out = Path(args.out)
    evals = {}
    held = _held_in_tokens(records, tokenizer, args.eval_tokens) if args.eval_tokens > 0 else None
    if held is not None and not args.resume:
        evals["before"] = perplexity(params, cfg, held, window=args.seq_len).perplexity
        print(f"held-in perplexity before: {evals['before']:.3f}", file=sys.stderr)
    print(f"sft: {len(docs)} documents, {sum(len(d['inputs']) for d in docs)} tokens; "
          f"{args.steps} steps of {args.batch_size} x {args.seq_len}; TensorBoard: not written "
          "(no event-file writer installed); metrics -> metrics.jsonl", file=sys.stderr)
    state, _ = train_sft(cfg, params, docs, run_cfg, opt_cfg=opt, train_cfg=train, mesh=mesh,
                         data_id=data_id)
    import jax
    if jax.process_count() > 1:   # fsdp shards live on other hosts: gather them everywhere
        from jax.experimental import multihost_utils
        final = multihost_utils.process_allgather(state.params, tiled=True)
    else:
        final = jax.device_get(state.params)
    if held is not None:
        evals["after"] = perplexity(final, cfg, held, window=args.seq_len).perplexity
        print(f"held-in perplexity after: {evals['after']:.3f}", file=sys.stderr)
        (out / "eval.json").write_text(json.dumps({"held_in_tokens": int(len(held)), **evals}, indent=1))
    if not args.no_export and jax.process_index() == 0:
        path = export_hf(final, cfg, out / "hf", tokenizer=tokenizer, overwrite=True)
        print(f"model written to {path}", file=sys.stderr)
    return 0
