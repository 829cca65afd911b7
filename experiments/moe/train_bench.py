"""MoE training step on one device: tokens/s and MFU on active parameters, LoRA against full
fine-tuning, in one run.

    python -m experiments.moe.train_bench --preset cpu                # CI smoke run (CPU)
    python -m experiments.moe.train_bench --preset qwen3-30b-a3b-4l   # one H100/H200, ~2 min

Model: `jaxturbo.models.shapes` "qwen3-30b-a3b" with 4 layers (hidden 2048, 32 query / 4 KV
heads of 128, 128 experts of width 768, top-8, vocab 151,936), random weights and tokens, one
document per row of 4,096 tokens, bf16 compute, AdamW, the chunked loss (`loss_chunk_tokens`),
the grouped GEMMs of `pallas_kernels.grouped_matmul` ("auto": Pallas-Triton on GPU) and the
attention kernel `pallas_kernels.attention` picks.

Rows (mode, batch rows):
  full  every weight trained: float32 master weights and Adam moments, bf16 compute copy.
  lora  rank `--lora-rank` adapters on attention and every expert (`jaxturbo.models.lora`),
        base weights frozen in bf16, Adam moments for the adapters only; the step
        differentiates the adapters only.

FLOPs per trained token (model FLOPs of the active parameters: the router, the top-k experts'
MLPs, attention's projections and scores, the LM head; not the 128 - k idle experts):
  N_active = L (D (2 H hd + 2 K hd) + E D + 3 k D F) + V D  (matmul weights a token meets)
  full     6 N_active + 6 L H hd T                      (forward 2, backward 4 per weight;
                                                          causal scores and values, halved)
  lora     4 N_active + 6 N_adapter + 6 L H hd T        (no weight gradient of a frozen weight:
                                                          forward 2, input gradient 2)
  N_adapter = L (r * sum over q, k, v, o of (in + out) + 3 k r (D + F))
MFU, two ways: `mfu_dense` = FLOP/s over the rate of a dense bf16 [n, n] @ [n, n] matmul
measured at the start of the same run (`dense_tflops` in the metadata: what this card and
software actually reach on a plain GEMM); `mfu_peak` = FLOP/s over the device's dense bf16 spec
(`jaxturbo.train.metrics.peak_flops`: 989 TFLOP/s for an H100/H200 SXM; None on CPU).
Step time: the median of `steps` steps after a first (warm-up) call of the compiled step.
Memory per row (`xla_gib`): XLA's buffer assignment of that row's compiled step (arguments +
unaliased outputs + temporaries), so each row's figure is its own.  Writes
OUT/train_<preset>.{json,md} (OUT default experiments/moe/results) after every row (a killed
run keeps the rows done), with `lora_over_full` (tokens/s ratio at equal batch) in the
metadata, and prints the table last.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time
from pathlib import Path
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_util import (
    compiled_bytes,
    device_name,
    hlo_copies,
    time_fn,
    trace_kernels,
    write_table,
)
from jaxturbo.models import moe
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.init import init_params
from jaxturbo.models.shapes import shape
from jaxturbo.train.metrics import peak_flops
from jaxturbo.train.optimizer import OptimizerConfig, make_optimizer
from jaxturbo.train.sharding import put_batch
from jaxturbo.train.step import TrainConfig, init_state, make_train_step

PRESETS: dict[str, dict[str, Any]] = {
    # one H200 (141 GB): full fine-tuning holds ~3.0B parameters x 16 bytes of float32 state
    # (weights, gradient, 2 moments: ~48 GB) + the bf16 copy + activations of 4,096 tokens
    "qwen3-30b-a3b-4l": dict(
        cfg=shape("qwen3-30b-a3b", num_hidden_layers=4),
        seq=4096,
        steps=5,
        chunk=4096,
        dense_n=8192,
        # unrolled layers: no per-layer gradient copies into stacked buffers (1.10x); batch 8:
        # full fine-tuning's fixed optimizer cost amortised (experiments/moe/RESULTS.md)
        runs=[
            ("full", 1, "custom", "scan"),
            ("full", 1, "custom", "unrolled"),
            ("full", 8, "custom", "unrolled"),
            ("lora", 1, "custom", "unrolled"),
        ],
    ),
    # seconds on a CPU: the same code paths on the tiny MoE shape
    "cpu": dict(
        cfg=shape("tiny-moe", num_hidden_layers=2),
        seq=128,
        steps=2,
        chunk=128,
        dense_n=256,
        runs=[("full", 2, "custom", "scan"), ("lora", 2, "custom", "scan")],
    ),
}
COLUMNS = [
    "mode",
    "batch",
    "gathers",
    "layers",
    "seq",
    "lora_rank",
    "trained_params",
    "step_s",
    "tokens_per_s",
    "tflops_per_s",
    "mfu_dense",
    "mfu_peak",
    "xla_gib",
    "first_loss",
    "compile_s",
]


def active_matmul_params(cfg: ModelConfig) -> int:
    """Matmul weights one token multiplies by: attention projections, router, its k experts'
    gate/up/down, the LM head (docstring's N_active)."""
    d, m = cfg.hidden_size, cfg.moe
    attn = d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    mlp = m.num_experts * d + 3 * m.num_experts_per_tok * d * m.moe_intermediate_size
    return cfg.num_hidden_layers * (attn + mlp) + cfg.vocab_size * d


def active_adapter_params(cfg: ModelConfig, rank: int) -> int:
    """Adapter weights one token multiplies by: r (in + out) per attention projection and, per
    routed expert, per gate/up/down projection."""
    d, hd, m = cfg.hidden_size, cfg.head_dim, cfg.moe
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    attn = rank * ((d + q) + 2 * (d + kv) + (q + d))
    experts = 3 * m.num_experts_per_tok * rank * (d + m.moe_intermediate_size)
    return cfg.num_hidden_layers * (attn + experts)


def flops_per_token(cfg: ModelConfig, seq: int, lora_rank: int) -> float:
    """Trained FLOPs per token (module docstring): full fine-tuning or LoRA of rank r."""
    scores = 6.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq
    n = active_matmul_params(cfg)
    if lora_rank == 0:
        return 6.0 * n + scores
    return 4.0 * n + 6.0 * active_adapter_params(cfg, lora_rank) + scores


def dense_matmul_rate(n: int) -> float:
    """FLOP/s of a bf16 [n, n] @ [n, n] matmul (float32 accumulation, bf16 result) on device 0:
    median of 5 windows of 10 back-to-back calls, after a warm-up call."""
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    return 2.0 * n**3 / time_fn(lambda: f(a, b), repeats=5, warmup=1, inner=10)


def bench_one(
    cfg: ModelConfig,
    seq: int,
    batch: int,
    mode: str,
    steps: int,
    chunk: int,
    lora_rank: int,
    dense_rate: float,
    trace: bool = False,
    autodiff_gathers: bool = False,
    unroll: bool = False,
) -> dict:
    """One row: compile the step, one warm-up step, then the median of `steps` steps; with
    `trace`, the GPU kernels of 2 more steps under the profiler and the compiled step's HLO
    copies (row["kernels"]).
    `autodiff_gathers`: the step compiled with the plain row gathers of the MoE dispatch,
    whose gradients autodiff makes scatter-adds (the lever the model's custom-gradient
    gathers replace), for a comparison in one run.  `unroll`: TrainConfig.unroll_layers (the
    scan's backward writes each layer's gradients into the stacked ones by
    dynamic-update-slices, which the GPU runs as device-to-device copies)."""
    rank = lora_rank if mode == "lora" else 0
    tc = TrainConfig(
        compute_dtype="bfloat16",
        loss_chunk_tokens=chunk,
        lora_rank=rank,
        lora_alpha=2.0 * rank if rank else None,
        unroll_layers=unroll,
    )
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_steps=1, total_steps=1000))
    # LoRA keeps the frozen base in bf16; full fine-tuning's init_state makes float32 masters
    dtype = jnp.bfloat16 if rank else jnp.float32
    params = jax.jit(lambda k: init_params(cfg, k, dtype=dtype))(jax.random.key(0))
    state = init_state(params, opt, lora=tc.lora)
    del params
    trained = sum(x.size for x in jax.tree.leaves(state.params["lora"] if rank else state.params))
    rs = np.random.RandomState(0)
    toks = rs.randint(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    b = put_batch(
        {
            "tokens": toks[:, :-1],
            "targets": toks[:, 1:],
            "weights": np.ones((batch, seq), np.float32),
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        },
        None,
    )
    step = make_train_step(cfg, tc, opt)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if autodiff_gathers:
            stack.enter_context(
                mock.patch.object(moe, "gather_pairs", lambda x, order, inv, k: x[order // k])
            )
            stack.enter_context(
                mock.patch.object(moe, "unsort_pairs", lambda ys, order, inv: ys[inv])
            )
        compiled = step.lower(state, b).compile()
    compile_s = time.perf_counter() - t0
    nbytes = compiled_bytes(compiled)
    box = [state]

    def run():
        box[0], m = compiled(box[0], b)  # the step donates its state: keep the newest
        return m["loss"]

    first = float(jax.block_until_ready(run()))
    times = []
    for _ in range(max(steps, 1)):
        t = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t)
    dt = float(np.median(times))
    kernels = (
        trace_kernels(lambda: [jax.block_until_ready(run()) for _ in range(2)], 2)
        if trace
        else None
    )
    if kernels is not None:  # what the MemcpyD2D kernels copy
        kernels["hlo_copies"] = hlo_copies(compiled.as_text())
    flops = flops_per_token(cfg, seq, rank) * batch * seq
    peak = peak_flops()
    return {
        "mode": mode,
        "batch": batch,
        "gathers": "autodiff" if autodiff_gathers else "custom",
        "layers": "unrolled" if unroll else "scan",
        "seq": seq,
        "lora_rank": rank,
        "trained_params": int(trained),
        "step_s": dt,
        "tokens_per_s": batch * seq / dt,
        "tflops_per_s": flops / dt / 1e12,
        "mfu_dense": flops / dt / dense_rate,
        "mfu_peak": flops / dt / peak if peak else None,
        "xla_gib": None if nbytes is None else nbytes / 2**30,
        "first_loss": first,
        "compile_s": compile_s,
        **({"kernels": kernels} if kernels else {}),
    }


RUN_OPTIONS = ("autodiff", "unrolled")


def parse_run(text: str) -> tuple[str, int, str, str]:
    """ "MODE,BATCH[,OPTION...]" -> (mode, batch, gathers, layers).  Options: "autodiff" (the
    dispatch's gathers differentiated by autodiff: `bench_one`'s autodiff_gathers; default
    "custom") and "unrolled" (a Python loop over the layers: TrainConfig.unroll_layers;
    default "scan")."""
    parts = text.split(",")
    if len(parts) < 2 or parts[0] not in ("full", "lora") or not parts[1].isdigit():
        raise SystemExit(f"run {text!r}: expected MODE,BATCH[,OPTION...] with MODE full or lora")
    bad = [o for o in parts[2:] if o not in RUN_OPTIONS]
    if bad:
        raise SystemExit(f"run {text!r}: unknown option {bad[0]!r}; options: {RUN_OPTIONS}")
    gathers = "autodiff" if "autodiff" in parts[2:] else "custom"
    return parts[0], int(parts[1]), gathers, "unrolled" if "unrolled" in parts[2:] else "scan"


def lora_over_full(rows: list[dict]) -> dict[str, float]:
    """tokens/s of the lora row over the full row, per batch size and layer loop both ran at
    (the model's own gathers)."""
    ok = {
        (r["mode"], r["batch"], r["layers"]): r["tokens_per_s"]
        for r in rows
        if "error" not in r and r["gathers"] == "custom"
    }
    return {
        f"batch {b}" + ("" if lay == "scan" else f", {lay}"): round(
            ok[("lora", b, lay)] / ok[("full", b, lay)], 3
        )
        for (m, b, lay) in ok
        if m == "full" and ("lora", b, lay) in ok
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.moe.train_bench", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument(
        "--lora-rank", type=int, default=16, help="adapter rank of the lora rows (alpha = 2 r)"
    )
    ap.add_argument(
        "--runs",
        default=None,
        metavar="MODE,BATCH ...",
        help="space-separated rows instead of the preset's (e.g. 'lora,4', 'full,1,autodiff': "
        "the dispatch's row gathers differentiated by autodiff, as a baseline, or "
        "'full,1,unrolled': the layers unrolled)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="skip further rows once this much time has passed",
    )
    ap.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results"),
        help="directory for train_<preset>.{json,md}",
    )
    ap.add_argument(
        "--trace",
        action="store_true",
        help="also trace 2 steps per row on a GPU: kernels by time into kernels_<preset>.json",
    )
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    runs = p["runs"] if args.runs is None else [parse_run(r) for r in args.runs.split()]
    cfg = p["cfg"]
    t_start = time.perf_counter()
    dense = dense_matmul_rate(p["dense_n"])
    peak = peak_flops()
    meta = {
        "preset": args.preset,
        "device": device_name(),
        "layers": cfg.num_hidden_layers,
        "active_matmul_params": active_matmul_params(cfg),
        "params": cfg.num_params(),
        "peak_bf16_tflops": peak and peak / 1e12,
        "dense_tflops": dense / 1e12,
        "dense_n": p["dense_n"],
        "dense_over_peak": peak and round(dense / peak, 3),
        "statistic": f"median of {p['steps']} steps after one warm-up step",
    }
    print(json.dumps(meta), flush=True)
    rows: list[dict] = []
    traced: dict[str, dict] = {}
    md = ""
    for mode, batch, gathers, layers in runs:
        if time.perf_counter() - t_start > args.budget_s:
            rows.append({"mode": mode, "batch": batch, "error": "skipped: time budget"})
        else:
            try:
                rows.append(
                    bench_one(
                        cfg,
                        p["seq"],
                        batch,
                        mode,
                        p["steps"],
                        p["chunk"],
                        args.lora_rank,
                        dense,
                        trace=args.trace,
                        autodiff_gathers=gathers == "autodiff",
                        unroll=layers == "unrolled",
                    )
                )
            except Exception as e:  # an OOM of one row should not lose the others
                rows.append(
                    {"mode": mode, "batch": batch, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                )
            gc.collect()
        kernels = rows[-1].pop("kernels", None)
        if kernels is not None:
            traced[f"{mode},{batch},{gathers},{layers}"] = kernels
            path = Path(args.out) / f"kernels_{args.preset}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(traced, indent=1))
            print(json.dumps({"kernels": mode, **{k: v for k, v in kernels.items() if k != "top"}}))
            for k in kernels["top"][:15]:
                print(
                    f"  {k['us_per_step']:>10.1f} us {k['share']:.3f} x{k['per_step']} {k['kernel']}"
                )
        print(json.dumps(rows[-1]), flush=True)
        # written after every row: a run stopped by its time limit keeps what it measured
        md = write_table(
            rows,
            COLUMNS + (["error"] if any("error" in r for r in rows) else []),
            Path(args.out) / f"train_{args.preset}",
            f"MoE train step, {args.preset}, {device_name()}",
            {**meta, "lora_over_full": lora_over_full(rows)},
        )
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
