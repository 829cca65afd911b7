"""Training throughput: tokens/s and MFU of the jaxturbo train step (AdamW, f32 master, bf16).

    python -m experiments.train.bench --preset tiny               # CPU smoke run
    python -m experiments.train.bench --preset llama-1b --unroll  # one H100: Llama-3.2-1B, seq 4096
    python -m experiments.train.bench --preset llama-8b-fsdp      # Llama-3-8B, FSDP over every GPU
    python -m experiments.train.bench --preset llama-1b --probe 4,none,4096   # where time goes

Each configuration is (batch rows, remat policy, loss_chunk_tokens); chunk 0 is the full-logits
cross-entropy, N > 0 the chunked one (`TrainConfig.loss_chunk_tokens`).  `--probe B,REMAT,CHUNK`
times one configuration three ways: the loss forward only, value_and_grad without the optimizer,
and the full step (the differences are the backward and the optimizer update).
`--xla-flags-preset` appends XLA flags (set before the backend starts) to compare compilers.

Random weights and tokens, one document per row.  Attention: cuDNN flash attention through
`jax.nn.dot_product_attention` on GPU (passed as the model's `attn_fn`), the jnp reference on
CPU.  MFU counts model FLOPs (`jaxturbo.train.metrics.train_flops_per_token`: 6N + causal
attention) against the card's dense bf16 peak.  Step time: the median of the preset's steps after
a first (warm-up) call; each configuration is compiled once, before it is timed.  Memory per row
(`xla_GiB`): XLA's buffer assignment for that row's compiled step on one device (arguments +
unaliased outputs + temporaries), so each row's figure is its own.  Writes
OUT/train_<preset>[_<flags>][_unrolled].{json,md} (OUT default experiments/train/results);
prints the table last.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments.bench_util import compiled_bytes
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.init import init_params
from jaxturbo.models.shapes import shape
from jaxturbo.train.metrics import peak_flops, train_flops_per_token
from jaxturbo.train.optimizer import OptimizerConfig, make_optimizer
from jaxturbo.train.step import (
    COMPUTE_DTYPES,
    REMAT_POLICIES,
    TrainConfig,
    init_state,
    make_train_step,
    sft_loss,
)

PRESETS = {
    # Llama-3.2-1B: 16 layers, d 2048, GQA 32/8 heads of 64, vocab 128256, tied embeddings
    "llama-1b": dict(
        cfg=shape("llama3.2-1b"),
        seq=4096,
        steps=8,
        # baseline first, then the chunked loss from the most to the least likely
        # to be fastest: the biggest batch that keeps every activation (no remat)
        # wins if it fits; b2 chunked isolates the loss's own effect; b8 "none" may
        # not fit (then b8 "dots" trades recompute for memory)
        runs=[
            (2, "none", 0),
            (4, "none", 4096),
            (2, "none", 4096),
            (8, "none", 4096),
            (8, "dots", 4096),
            (4, "dots", 4096),
            (4, "none", 8192),
        ],
    ),
    # Llama-3-8B with FSDP over every visible device (the 4-GPU machine): global batch 4 = one
    # row of 4096 per GPU; scan over layers (unrolling 32 layers of 8B compiles slowly)
    "llama-8b-fsdp": dict(
        cfg=shape("llama3-8b"),
        seq=4096,
        steps=3,
        fsdp=True,
        remat_scope="layer",
        runs=[(4, "dots", 4096), (8, "dots", 4096), (8, "full", 4096)],
    ),
    # a 256-token vocabulary: with tiny's 4,096 this run on 8 fake CPU devices stalled in XLA's
    # CPU collectives (a rendezvous timeout) on a loaded 2-core machine
    "tiny-fsdp": dict(
        cfg=shape("tiny", num_hidden_layers=2, vocab_size=256),
        seq=128,
        steps=2,
        fsdp=True,
        remat_scope="layer",
        runs=[(8, "dots", 96)],
    ),
    "tiny": dict(
        cfg=shape("tiny", num_hidden_layers=2),
        # chunk 96 of 256 tokens: three blocks, the last one padded
        seq=128,
        runs=[(2, "none", 0), (2, "full", 0), (2, "none", 96), (2, "dots", 96)],
        steps=3,
    ),
}


def cudnn_attention(q, k, v, segment_ids=None):
    """Causal flash attention (cuDNN); rows are single documents here, so no segment mask."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


UNROLL = [False]  # set from --unroll: every configuration of this run unrolls the layers
MESH = [None]  # an fsdp mesh over every device for presets with fsdp=True
REMAT_SCOPE = ["loss"]  # a preset's remat_scope (TrainConfig): "layer" checkpoints each layer

XLA_FLAG_PRESETS = {
    "default": "",
    # cuBLAS for every GEMM instead of XLA's Triton GEMM fusions
    "no-triton-gemm": "--xla_gpu_enable_triton_gemm=false",
    "latency-hiding": "--xla_gpu_enable_latency_hiding_scheduler=true",
    # FSDP: the latency-hiding scheduler plus XLA's loop pipelining of the per-layer parameter
    # all-gathers and gradient reduce-scatters (issued one scan iteration ahead / behind), and
    # large combine thresholds (the flag set MaxText recommends on GPUs)
    "fsdp-overlap": " ".join(
        [
            "--xla_gpu_enable_latency_hiding_scheduler=true",
            "--xla_gpu_enable_pipelined_all_gather=true",
            "--xla_gpu_enable_pipelined_reduce_scatter=true",
            "--xla_gpu_enable_pipelined_all_reduce=true",
            "--xla_gpu_enable_while_loop_double_buffering=true",
            "--xla_gpu_all_gather_combine_threshold_bytes=1073741824",
            "--xla_gpu_reduce_scatter_combine_threshold_bytes=1073741824",
        ]
    ),
}


def _setup(cfg: ModelConfig, seq: int, batch: int, remat: str, chunk: int):
    """Train config, optimizer, step-0 state, loss function and a random batch [batch, seq]."""
    on_gpu = jax.devices()[0].platform == "gpu"
    tc = TrainConfig(
        compute_dtype="bfloat16",
        remat=remat,
        loss_chunk_tokens=chunk,
        unroll_layers=UNROLL[0],
        remat_scope=REMAT_SCOPE[0],
    )
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_steps=1, total_steps=1000))
    mesh = MESH[0]
    if mesh is None:
        params = init_params(cfg, jax.random.key(0))
    else:  # made in their shards: a whole 8B float32 copy would not fit one device with the rest
        from jaxturbo.train.sharding import param_shardings

        make = functools.partial(init_params, cfg)
        shardings = param_shardings(jax.eval_shape(make, jax.random.key(0)), mesh)
        params = jax.jit(make, out_shardings=shardings)(jax.random.key(0))
    state = init_state(params, opt, mesh=mesh)
    del params
    # with a mesh, sft_loss runs the attention per device over its own rows
    # (step.rows_local_attention): cuDNN's partitioner failed under FSDP auto-sharding
    loss = sft_loss(
        cfg, tc, attn_fn=cudnn_attention if on_gpu and mesh is None else None, mesh=mesh
    )
    rs = np.random.RandomState(0)
    toks = rs.randint(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    b = {
        "tokens": toks[:, :-1],
        "targets": toks[:, 1:],
        "weights": np.ones((batch, seq), np.float32),
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
    }
    from jaxturbo.train.sharding import put_batch

    b = put_batch(b, mesh)
    return tc, opt, state, loss, b


def _time(call: Callable[[], Any], steps: int) -> tuple[float, float, Any]:
    """(first call s, median of `steps` (>= 1) later calls s, first output); blocks on each
    call."""
    t0 = time.perf_counter()
    first = jax.block_until_ready(call())
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(max(steps, 1)):
        t = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t)
    return first_s, float(np.median(times)), first


def _rates(cfg: ModelConfig, seq: int, batch: int, dt: float) -> dict:
    """Global tokens/s; TFLOP/s and MFU per device (model FLOPs split over the mesh)."""
    tokens = batch * seq
    n = 1 if MESH[0] is None else MESH[0].devices.size
    flops = train_flops_per_token(cfg, seq) * tokens / n
    peak = peak_flops()
    return {
        "step_s": dt,
        "tokens_per_s": tokens / dt,
        "tflops_per_s": flops / dt / 1e12,
        "mfu": flops / dt / peak if peak else None,
        "devices": n,
    }


def _compile(fn, *args) -> tuple[Any, float, float | None]:
    """(compiled fn, compile seconds, its device memory in GiB: `bench_util.compiled_bytes`)."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    nbytes = compiled_bytes(compiled)
    return compiled, time.perf_counter() - t0, None if nbytes is None else nbytes / 2**30


def bench_one(
    cfg: ModelConfig,
    seq: int,
    batch: int,
    remat: str,
    chunk: int,
    steps: int,
    trace_dir: Path | None = None,
) -> dict:
    tc, opt, state, loss, b = _setup(cfg, seq, batch, remat, chunk)
    step = make_train_step(
        cfg, tc, opt, loss_fn=loss, mesh=MESH[0], params=None if MESH[0] is None else state.params
    )
    compiled, compile_s, xla_gib = _compile(step, state, b)
    box = [state]

    def run():
        box[0], m = compiled(box[0], b)  # the step donates its state: keep only the newest
        return m["loss"]

    _, dt, first = _time(run, steps)
    if trace_dir is not None:  # kernel time by name over 2 more steps (bench_util.kernel_summary)
        from experiments.bench_util import kernel_summary

        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            for _ in range(2):
                jax.block_until_ready(run())
        ks = kernel_summary(trace_dir, steps=2)
        (trace_dir / "kernels.json").write_text(json.dumps(ks, indent=1))
        print(
            f"kernels per step {ks['kernels_per_step']:.0f}, busy {ks['busy_ms_per_step']:.1f} ms "
            f"of {dt * 1e3:.1f} ms",
            flush=True,
        )
        for r in ks["top"][:30]:
            print(
                f"{r['us_per_step'] / 1e3:8.2f} ms {100 * r['share']:5.1f}%  x{r['per_step']:5.0f}  "
                f"{r['kernel']}",
                flush=True,
            )
    return {
        "batch": batch,
        "seq": seq,
        "remat": remat,
        "chunk": chunk,
        "layers": "unrolled" if UNROLL[0] else "scan",
        **_rates(cfg, seq, batch, dt),
        "xla_gib": xla_gib,
        "first_loss": float(first),
        "compile_s": compile_s,
    }


def probe(cfg: ModelConfig, seq: int, batch: int, remat: str, chunk: int, steps: int) -> list[dict]:
    """Time the loss forward, value_and_grad (no optimizer) and the full step of one config."""
    tc, opt, state, loss, b = _setup(cfg, seq, batch, remat, chunk)
    dtype = COMPUTE_DTYPES[tc.compute_dtype]

    def total(p, bt):  # as make_train_step does it: bf16 copy of the f32 master weights
        return loss(jax.tree.map(lambda x: x.astype(dtype), p), bt)[0].total

    policy = REMAT_POLICIES[remat]
    if policy is not None:
        total = jax.checkpoint(total, policy=policy)
    rows = []
    for name, fn in (
        ("forward", jax.jit(total)),
        ("value_and_grad", jax.jit(jax.value_and_grad(total))),
    ):
        compiled, compile_s, xla_gib = _compile(fn, state.params, b)
        _, dt, out = _time(lambda c=compiled: c(state.params, b), steps)
        del out
        rows.append({"part": name, "s": dt, "compile_s": compile_s, "xla_gib": xla_gib})
        print(json.dumps(rows[-1]), flush=True)
    row = bench_one(cfg, seq, batch, remat, chunk, steps)  # a fresh state: this one is not donated
    rows.append(
        {
            "part": "step",
            "s": row["step_s"],
            "compile_s": row["compile_s"],
            "xla_gib": row["xla_gib"],
            "mfu": row["mfu"],
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    # the parts are differences of separately timed programs: one that is not positive is noise
    for i, what in ((1, "the backward"), (2, "the optimizer update")):
        d = rows[i]["s"] - rows[i - 1]["s"]
        if d <= 0:
            raise RuntimeError(
                f"{what} timed at {d * 1e3:.3f} ms <= 0 ({rows[i]['part']} {rows[i]['s'] * 1e3:.3f}"
                f" ms minus {rows[i - 1]['part']} {rows[i - 1]['s'] * 1e3:.3f} ms, medians of "
                f"{steps}): below the timing noise; probe a larger batch or more steps"
            )
    return rows


def _parse_config(text: str) -> tuple[int, str, int]:
    batch, remat, chunk = text.split(",")
    if remat not in REMAT_POLICIES:
        raise SystemExit(f"remat {remat!r} in {text!r}; choose {', '.join(REMAT_POLICIES)}")
    return int(batch), remat, int(chunk)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.train.bench", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument(
        "--budget-s",
        type=float,
        default=150.0,
        help="skip further configurations once this much time has passed",
    )
    ap.add_argument(
        "--probe",
        default=None,
        metavar="B,REMAT,CHUNK",
        help="time forward / value_and_grad / step of this one configuration",
    )
    ap.add_argument("--xla-flags-preset", default="default", choices=sorted(XLA_FLAG_PRESETS))
    ap.add_argument(
        "--trace",
        default=None,
        metavar="B,REMAT,CHUNK",
        help="time this one configuration and profile 2 steps: GPU kernel time by name",
    )
    ap.add_argument("--trace-dir", default="/tmp/train_trace")
    ap.add_argument(
        "--runs",
        default=None,
        metavar="B,REMAT,CHUNK ...",
        help="space-separated configurations instead of the preset's grid",
    )
    ap.add_argument(
        "--unroll",
        action="store_true",
        help="unroll the layers (TrainConfig.unroll_layers) instead of lax.scan",
    )
    ap.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results"),
        help="directory for train_<preset>*.{json,md} and probe_<preset>*.json "
        "(default experiments/train/results)",
    )
    args = ap.parse_args(argv)
    UNROLL[0] = args.unroll
    extra = XLA_FLAG_PRESETS[args.xla_flags_preset]
    if extra:  # read when the backend starts, i.e. at the first jax.devices() below
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + extra).strip()
    p = PRESETS[args.preset]
    cfg = p["cfg"]
    REMAT_SCOPE[0] = p.get("remat_scope", "loss")
    if p.get("fsdp"):
        from jaxturbo.parallel.mesh import make_mesh

        MESH[0] = make_mesh(f"fsdp={len(jax.devices())}")
    dev = jax.devices()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ("" if args.xla_flags_preset == "default" else f"_{args.xla_flags_preset}") + (
        "_unrolled" if args.unroll else ""
    )
    if args.trace:
        batch, remat, chunk = _parse_config(args.trace)
        row = bench_one(
            cfg, p["seq"], batch, remat, chunk, p["steps"], trace_dir=Path(args.trace_dir)
        )
        print(json.dumps(row), flush=True)
        return
    if args.probe:
        batch, remat, chunk = _parse_config(args.probe)
        rows = probe(cfg, p["seq"], batch, remat, chunk, p["steps"])
        result = {
            "preset": args.preset,
            "device": dev.device_kind,
            "probe": args.probe,
            "xla_flags": extra,
            "rows": rows,
        }
        (out / f"probe_{args.preset}{suffix}.json").write_text(json.dumps(result, indent=1))
        parts = {r["part"]: r["s"] for r in rows}
        print(
            f"probe {args.probe} x {p['seq']} on {dev.device_kind}: forward {parts['forward']:.3f} s, "
            f"backward {parts['value_and_grad'] - parts['forward']:.3f} s, "
            f"optimizer+rest {parts['step'] - parts['value_and_grad']:.3f} s, step {parts['step']:.3f} s"
        )
        return
    rows, t_start = [], time.perf_counter()
    runs = [_parse_config(r) for r in args.runs.split()] if args.runs else p["runs"]
    for batch, remat, chunk in runs:
        if time.perf_counter() - t_start > args.budget_s:
            rows.append(
                {"batch": batch, "remat": remat, "chunk": chunk, "error": "skipped: time budget"}
            )
            continue
        try:
            rows.append(bench_one(cfg, p["seq"], batch, remat, chunk, p["steps"]))
        except Exception as e:  # an OOM of one configuration should not lose the others
            rows.append(
                {
                    "batch": batch,
                    "remat": remat,
                    "chunk": chunk,
                    "error": f"{type(e).__name__}: {str(e)[:200]}",
                }
            )
        gc.collect()  # drop the last configuration's buffers before the next one allocates
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "preset": args.preset,
        "device": dev.device_kind,
        "params": cfg.num_params(),
        "xla_flags": extra,
        "flops_per_token": train_flops_per_token(cfg, p["seq"]),
        "rows": rows,
    }
    (out / f"train_{args.preset}{suffix}.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"train step, {args.preset} ({cfg.num_params() / 1e9:.2f} B params), {dev.device_kind}"
        + (f", XLA_FLAGS+={extra}" if extra else ""),
        "",
        f"Step s: median of {p['steps']} steps after a warm-up call. XLA GiB: the row's "
        "compiled step, per device.",
        "",
        "| batch x seq | remat | loss chunk | step s | tokens/s | TFLOP/s | MFU | XLA GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        chunk = r["chunk"] or "none"
        if "error" in r:
            lines.append(
                f"| {r['batch']} x {p['seq']} | {r['remat']} | {chunk} | {r['error']} | | | | |"
            )
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        gib = "n/a" if r["xla_gib"] is None else f"{r['xla_gib']:.1f}"
        lines.append(
            f"| {r['batch']} x {r['seq']} | {r['remat']} | {chunk} | {r['step_s']:.3f} | "
            f"{r['tokens_per_s']:.0f} | {r['tflops_per_s']:.1f} | {mfu} | {gib} |"
        )
    table = "\n".join(lines)
    (out / f"train_{args.preset}{suffix}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
