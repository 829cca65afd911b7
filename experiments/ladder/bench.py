"""Ladder-Residual decode benchmark: residual mode x tensor parallel x batch (x P2P on/off).

Llama-3-8B shape (`jaxturbo.models.shapes`) with random bf16 weights (or a tiny CPU preset),
prompt of `--prompt` tokens, greedy decode of `--new-tokens` through generate's on-device loop
(`jaxturbo.inference.generation.generate_arrays` with the tensor-parallel forward).  Residual modes:
standard, ladder, parallel, and desync (standard without its all-reduces,
`TensorParallel(mesh, skip_allreduce=True)`: the speed bound, not a model).  Per setting:

    prefill s   one jitted cached prefill of the prompt (same forward, same shardings)
    decode s    generate(prompt, N new tokens) - prefill s: N decode steps in one while_loop
                (median over --reps of back-to-back pairs; a run where it is not positive fails)
    tokens/s    batch * N / decode s        speedup: tokens/s over `standard` at the same TP/batch

The random model is the same at every tensor size and weight layout (drawn in HF's layout, then
laid out for the TP size), so each setting's greedy tokens and next-token logits are checked
against its run at the first TP size (`same_model_check`); a disagreement is printed, recorded
in the row's `tp_check`, and makes the run exit with status 1.

NCCL reads NCCL_P2P_DISABLE once per process, so each P2P setting runs in its own worker
process (`--worker`); the parent merges their JSON lines, prints the table last and writes
`results.json`, `results.md` and `tokens_per_s.png` to `--out`.

    python -m experiments.ladder.bench --preset tiny                         # CPU, TP 1/2/4/8
    python -m experiments.ladder.bench --preset 8b --tp 1,2 --batch 1 --p2p on,off

Run from the repository root (the workers are `python -m experiments.ladder.bench --worker`).
Measurements: experiments/ladder/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from experiments.ladder import analysis

ROOT = Path(__file__).resolve().parents[2]
# Decode GEMVs: XLA's Triton GEMM fusions are slower than cuBLAS at batch 1.  XLA's dot merger
# (default: dots under 32 MB sharing an input) turns q/k/v and gate/up into one GEMM over
# weights it concatenates on every step: a full weight copy per layer and token (off, one
# GPU's share of a TP-4 8B decode step went from 3.51 to 2.35 ms on an H100: docs/findings.md).
# The "merge" preset turns it back on for comparison.
GPU_FLAGS = ["--xla_gpu_enable_triton_gemm=false", "--xla_gpu_dot_merger_threshold_mb=0"]
# Flag sets tried for overlap (experiments/ladder/RESULTS.md); chosen with --xla-preset.
XLA_PRESETS = {
    "default": [],
    "merge": ["--xla_gpu_dot_merger_threshold_mb=32"],
    "lhs": [
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "--xla_gpu_all_reduce_combine_threshold_bytes=0",
        "--xla_gpu_enable_highest_priority_async_stream=true",
    ],
    # XLA's one-shot Triton all-reduce runs as a kernel on the compute stream (operation_queue_id
    # 0 in the HLO), so it cannot overlap compute; NCCL's async all-reduce runs on its own stream.
    "nccl": ["--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false"],
    "nccl_lhs_ol4": [
        "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false",
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "--xla_gpu_all_reduce_combine_threshold_bytes=0",
        "--xla_gpu_enable_highest_priority_async_stream=true",
        "--xla_gpu_experimental_parallel_collective_overlap_limit=4",
    ],
    "nccl_lhs": [
        "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false",
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "--xla_gpu_all_reduce_combine_threshold_bytes=0",
        "--xla_gpu_enable_highest_priority_async_stream=true",
    ],
    # the scheduler's cost model: XLA's speed-of-light estimator off (the approximate one gives
    # every async collective a large latency to hide).  Adding
    # --xla_gpu_enable_analytical_latency_estimator=true to this aborted XLA (SIGABRT) on H100.
    "nccl_lhs_nosol": [
        "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false",
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "--xla_gpu_all_reduce_combine_threshold_bytes=0",
        "--xla_gpu_enable_highest_priority_async_stream=true",
        "--xla_gpu_enable_analytical_sol_latency_estimator=false",
    ],
    # NCCL's symmetric-memory kernels (NCCL >= 2.27: low-latency small all-reduces over
    # NVLink), and NCCL user buffers (no copy into NCCL's own buffers)
    "nccl_lhs_symm": [
        "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false",
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "--xla_gpu_all_reduce_combine_threshold_bytes=0",
        "--xla_gpu_enable_highest_priority_async_stream=true",
        "--xla_gpu_experimental_enable_nccl_symmetric_buffers=true",
    ],
    "nccl_lhs_ub": [
        "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false",
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "--xla_gpu_all_reduce_combine_threshold_bytes=0",
        "--xla_gpu_enable_highest_priority_async_stream=true",
        "--xla_gpu_enable_nccl_user_buffers=true",
    ],
    # the same, with the whole decode step (collectives and the while loop included) captured
    # as CUDA graphs: gpt-fast's other lever, launch overhead
    "nccl_lhs_graph": [
        "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false",
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "--xla_gpu_all_reduce_combine_threshold_bytes=0",
        "--xla_gpu_enable_highest_priority_async_stream=true",
        "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,"
        "COLLECTIVES,CONDITIONAL,WHILE",
        "--xla_gpu_graph_min_graph_size=1",
    ],
}
# preset -> (named shape of jaxturbo.models.shapes, fields replaced)
PRESETS = {
    "8b": ("llama3-8b", {}),
    "70b": ("llama3-70b", {}),
    # runs in seconds on 8 fake CPU devices, at every TP up to 8
    "tiny": (
        "tiny",
        dict(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_key_value_heads=8,
            head_dim=16,
            max_position_embeddings=512,
        ),
    ),
}
PROJECTIONS = ("separate", "fused")
MODES = ("standard", "ladder", "parallel", "desync")


def preset_config(name: str):
    """The ModelConfig of preset `name`."""
    from jaxturbo.models.shapes import shape

    shape_name, fields = PRESETS[name]
    return shape(shape_name, **fields)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument(
        "--residual", default="standard,ladder,parallel,desync", help="comma list of residual modes"
    )
    p.add_argument("--tp", default="1,2,4,8", help="comma list of tensor-parallel sizes")
    p.add_argument("--batch", default="1", help="comma list of batch sizes (e.g. 1,4,16,64)")
    p.add_argument(
        "--prompt", type=int, default=None, help="prompt tokens (default 1024; tiny: 64)"
    )
    p.add_argument(
        "--new-tokens", type=int, default=None, help="default 256 (512 for full runs); tiny: 16"
    )
    p.add_argument("--p2p", default="on", help="on, off or on,off (NCCL_P2P_DISABLE=1 when off)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--scan", action="store_true", help="lax.scan over layers instead of unrolling")
    p.add_argument(
        "--xla-preset",
        default="default",
        help=f"comma list of XLA flag sets, one worker each: {', '.join(XLA_PRESETS)}",
    )
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run each setting's worker this many times, one after another (rows "
        "tagged run 1..N, each run's ratio against its own standard; between "
        "processes standard moved by up to 4%% on 4x H100); with N > 1 the "
        "per-run ratios and their medians are printed too (`analysis runs`)",
    )
    p.add_argument(
        "--decode-loop",
        default="device",
        help="device (generate's on-device while loop), host (one jitted step "
        "per token from Python, dispatched asynchronously) or device,host",
    )
    p.add_argument(
        "--dump-hlo", default=None, help="folder for each setting's compiled decode step HLO"
    )
    p.add_argument(
        "--profile",
        default=None,
        help="folder: trace one more generate call per setting and print where each "
        "GPU's decode step goes (`analysis trace`)",
    )
    p.add_argument("--out", default="runs/ladder_bench")
    p.add_argument(
        "--no-ladder-barrier",
        action="store_true",
        help="experiment: make the ladder's optimization barrier the identity in this run "
        "(rows are labelled '<flags>+nobarrier')",
    )
    p.add_argument(
        "--projections",
        default="fused",
        choices=PROJECTIONS,
        help="weight layout: separate (q, k, v, gate, up as HF stores them) or fused "
        "(q/k/v and gate/up one matrix each: jaxturbo.inference.fused; rows "
        "labelled '<flags>+fusedproj')",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    tiny = a.preset == "tiny"
    a.prompt = a.prompt or (64 if tiny else 1024)
    a.new_tokens = a.new_tokens or (16 if tiny else 256)
    return a


# ----------------------------------------------------------------------------- worker
def bench_layer_shapes(cfg, tp: int, projections: str = "separate") -> dict:
    """Per-layer parameter shapes as `shard_params` holds them at tensor size `tp`: KV heads
    replicated up to `tp` where it exceeds them; projections: a `PROJECTIONS` layout."""
    from jaxturbo.bridge.hf import layer_shapes
    from jaxturbo.inference import fused
    from jaxturbo.parallel import tensor

    shapes = layer_shapes(cfg)
    kv = tensor.cache_kv_heads(cfg, tp)
    for n in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        shapes[n] = (kv * cfg.head_dim, cfg.hidden_size)
    if projections not in PROJECTIONS:
        raise ValueError(f"projections={projections!r}; choose one of {PROJECTIONS}")
    if projections == "fused":
        shapes = fused.fused_layer_shapes(shapes, kv, cfg.head_dim)
    return shapes


def _random_params(cfg, mesh, dtype, projections="separate"):
    """Random weights of one model at every tensor size and layout: drawn in HF's layout from
    keys fixed per name (and layer), then laid out for `mesh` as `tensor.shard_params` lays out
    loaded weights (KV heads replicated up to the tensor size, q/k/v and gate/up fused shard by
    shard as `jaxturbo.inference.fused.shard_fused` does).  Made on the devices, one layer at a time into the stacked
    shards (8B never touches the host; the layout change of one layer fits beside 70B's shards
    whatever XLA does with it).  Layer shapes: `bench_layer_shapes(cfg, tp, projections)`."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from jaxturbo.bridge.hf import global_shapes, layer_shapes
    from jaxturbo.inference import fused
    from jaxturbo.parallel import tensor

    tp = tensor.tensor_size(mesh)

    def draw(key, shape, is_norm):
        if is_norm:
            return jnp.ones(shape, dtype)
        return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)

    def make(name, shape, spec, seed):
        f = jax.jit(
            lambda k: draw(k, shape, "norm" in name), out_shardings=NamedSharding(mesh, spec)
        )
        return f(jax.random.key(seed))

    hf_shapes = sorted(layer_shapes(cfg).items())  # K KV heads, whatever tp

    def layer(i):  # layer i's weights [1, ...] in the bench layout
        lp = {
            n: draw(jax.random.fold_in(jax.random.key(100 + j), i), (1, *s), "norm" in n)
            for j, (n, s) in enumerate(hf_shapes)
        }
        p = tensor.replicate_kv_heads({"layers": lp}, cfg, tp)
        if projections == "fused":
            p = fused.fuse_projections(p, cfg, tp)
        return p["layers"]

    shapes = jax.eval_shape(layer, 0)
    want = bench_layer_shapes(cfg, tp, projections)
    if {n: s.shape[1:] for n, s in shapes.items()} != {n: tuple(s) for n, s in want.items()}:
        raise AssertionError(f"drawn layout {shapes} is not bench_layer_shapes {want}")
    specs = tensor.param_specs(
        {**{n: None for n in global_shapes(cfg)}, "layers": {n: None for n in shapes}}
    )
    params = {n: make(n, s, specs[n], i) for i, (n, s) in enumerate(global_shapes(cfg).items())}
    shard = {n: NamedSharding(mesh, specs["layers"][n]) for n in shapes}
    n_layers = cfg.num_hidden_layers
    stack = jax.jit(
        lambda: {n: jnp.zeros((n_layers, *s.shape[1:]), s.dtype) for n, s in shapes.items()},
        out_shardings=shard,
    )()
    one = jax.jit(layer, out_shardings=shard)
    put = jax.jit(
        lambda st, lp, i: {n: jax.lax.dynamic_update_slice_in_dim(st[n], lp[n], i, 0) for n in st},
        donate_argnums=0,
        out_shardings=shard,
    )
    for i in range(n_layers):
        stack = put(stack, one(jnp.int32(i)), jnp.int32(i))
    params["layers"] = stack
    return params


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def decode_seconds(prefill_fn, generate_fn, reps: int) -> tuple[float, float, float]:
    """(prefill s, generate s, decode s) of blocking calls: medians over `reps` pairs, the
    prefill timed right before its generate so that a change in the machine's load (a shared
    CPU) moves both; decode = the median of the pairs' differences.  Raises when it is not
    positive: the decode steps were below the timer's noise, and any tokens/s from it would be
    made up."""
    pres, gens = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        prefill_fn()
        t1 = time.perf_counter()
        generate_fn()
        pres.append(t1 - t0)
        gens.append(time.perf_counter() - t1)
    dec = _median([g - p for g, p in zip(gens, pres)])
    if dec <= 0:
        raise RuntimeError(
            f"decode time {dec * 1e3:.3f} ms <= 0: generate (prefill + decode) took "
            f"{_median(gens) * 1e3:.3f} ms, its prefill alone {_median(pres) * 1e3:.3f} ms "
            f"(median of {reps}); the decode steps are below the timing noise: raise "
            "--new-tokens (or --reps)"
        )
    return _median(pres), _median(gens), dec


# Cross-TP check: every tensor size runs the same model, so each setting's run must agree with
# its run at the first tensor size.  float32 on CPU rounds alike at every TP (sums reordered
# only): greedy tokens must be equal.  bf16 (and GPU float32, TF32 matmuls) rounds the partial
# sums of an all-reduce differently from one GEMM's, so greedy tokens may part at a near tie
# (8B bf16, one model at TP 1 and 2: at the third token; the tiny preset in bf16 on CPU: at
# the twelfth, its logits 0.6-0.8% apart): the next-token logits after the prompt must agree
# to ROUNDED_TOL of their largest.  Another model's logits are ~140% off.
EXACT_TOL = 1e-4
ROUNDED_TOL = 0.15


def same_model_check(ref: dict, got: dict, *, exact: bool) -> dict:
    """`got`'s run against the reference run `ref` of the same setting at another TP size.

    ref, got: dict(tp, tokens: row 0's first greedy tokens, logp: their log-probs or None,
    logits: row 0's next-token logits after the prompt, [V] numpy).  exact: float32 on CPU.
    Returns dict(ref_tp, logits_rel_err, tokens_agree, logp_max_err, ok, why) for the row."""
    import numpy as np

    lr, lg = (np.asarray(x, np.float64) for x in (ref["logits"], got["logits"]))
    diff = float(np.abs(lg - lr).max())
    rel = diff / max(float(np.abs(lr).max()), 1e-30)
    n = min(len(ref["tokens"]), len(got["tokens"]))
    agree = next((i for i in range(n) if ref["tokens"][i] != got["tokens"][i]), n)
    logp_err = None
    if ref.get("logp") is not None and got.get("logp") is not None:
        upto = min(agree + 1, n)  # the common prefix, and where they part (both near a tie)
        logp_err = float(np.abs(np.subtract(ref["logp"][:upto], got["logp"][:upto])).max())
    top2 = np.sort(lr)[-2:]
    margin = float(top2[1] - top2[0])  # the reference's first greedy choice over the runner-up
    tol = EXACT_TOL if exact else ROUNDED_TOL
    why = ""
    if rel > tol:
        why = (
            f"next-token logits differ by {rel:.2e} of their largest (> {tol:.0e}): not the "
            "same model, or the tensor-parallel forward is wrong"
        )
    elif agree < n and exact:
        why = f"greedy tokens part at token {agree} of {n} (float32 on CPU: they must agree)"
    elif (
        exact
        and logp_err is not None
        and logp_err > tol * max(1.0, float(np.abs(ref["logp"]).max()))
    ):
        why = f"greedy tokens' log-probs differ by {logp_err:.2e}"
    elif agree == 0 and n and margin > 4 * diff:
        why = (
            f"first greedy token differs though the reference's top-2 margin {margin:.3g} is "
            f"over 4x the logits' difference {diff:.3g}"
        )
    return dict(
        ref_tp=ref["tp"],
        logits_rel_err=rel,
        tokens_agree=agree,
        tokens=n,
        logp_max_err=logp_err,
        ok=not why,
        why=why
        or (
            "same tokens"
            if agree == n
            else f"same tokens up to token {agree}, then a near tie in rounding"
        ),
    )


def run_worker(a: argparse.Namespace) -> None:
    import jax

    if a.no_ladder_barrier:
        # only the ladder step calls it; this process then traces the ladder without the barrier
        jax.lax.optimization_barrier = lambda operand: operand
        a.xla_preset = a.xla_preset + "+nobarrier"
    if a.projections == "fused":
        a.xla_preset = a.xla_preset + "+fusedproj"

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import jax.numpy as jnp
    import numpy as np

    from jaxturbo.inference.generation import generate_arrays
    from jaxturbo.inference.generation import prefill as decode_prefill
    from jaxturbo.inference.sampling import SamplingParams
    from jaxturbo.models.transformer import init_cache, kv_cache_bytes_per_token
    from jaxturbo.parallel import tensor
    from jaxturbo.parallel.mesh import make_mesh

    dtype = jnp.dtype(a.dtype)
    devices = jax.devices()
    base = preset_config(a.preset)
    p2p = os.environ.get("NCCL_P2P_DISABLE", "0") != "1"
    # (residual label, batch) -> its run at the first TP size (`same_model_check`)
    refs: dict[tuple[str, int], dict] = {}
    exact = devices[0].platform == "cpu" and dtype == jnp.float32
    for tp in _ints(a.tp):
        if tp > len(devices):
            print(f"# skip TP {tp}: only {len(devices)} devices", file=sys.stderr)
            continue
        mesh = make_mesh({"tensor": tp}, devices[:tp])
        tensor.check_tensor_parallel(base, tp)
        params = _random_params(base, mesh, dtype, a.projections)
        runs = [(m, loop) for m in a.residual.split(",") for loop in a.decode_loop.split(",")]
        bad = sorted({m for m, _ in runs} - set(MODES))
        if bad:
            raise SystemExit(f"--residual {','.join(bad)}: choose from {', '.join(MODES)}")
        for batch in _ints(a.batch):
            rng = np.random.RandomState(batch)
            toks = jnp.asarray(rng.randint(0, base.vocab_size, (batch, a.prompt)), jnp.int32)
            lens = jnp.full((batch,), a.prompt, jnp.int32)
            for mode, loop in runs:
                # desync: the standard model without its all-reduces
                cfg = base.replace(residual_mode="standard" if mode == "desync" else mode)
                model = tensor.TensorParallel(
                    mesh, unroll=not a.scan, skip_allreduce=mode == "desync"
                )
                label = mode + ("" if loop == "device" else "+hostloop")
                row = dict(
                    preset=a.preset,
                    residual=label,
                    tp=tp,
                    batch=batch,
                    prompt=a.prompt,
                    new_tokens=a.new_tokens,
                    p2p=p2p,
                    device=devices[0].device_kind,
                    platform=devices[0].platform,
                    layers="scan" if a.scan else "unrolled",
                    xla_preset=a.xla_preset,
                    kv_bytes_per_token=kv_cache_bytes_per_token(cfg, dtype),
                )
                gen_kw = dict(
                    cfg=cfg,
                    max_new_tokens=a.new_tokens,
                    sampling=SamplingParams(),
                    stream=None,
                    attn_impl="auto",
                    cache_dtype=dtype.name,
                    model_fn=model,
                    kv_heads=tensor.cache_kv_heads(cfg, tp),
                )
                key, stops = jax.random.key(0), jnp.asarray([-1], jnp.int32)  # never stops early

                @jax.jit
                def prefill(params, toks, lens):  # what generate_arrays's prefill does, alone
                    cache = init_cache(
                        cfg,
                        toks.shape[0],
                        a.prompt + a.new_tokens,
                        dtype,
                        kv_heads=tensor.cache_kv_heads(cfg, tp),
                    )
                    last, cache = decode_prefill(model, params, cfg, toks, lens, cache, "auto")
                    # + row 0's logits ([V], for the cross-TP check: a copy too small to time)
                    return jnp.argmax(last, -1), last[0], cache

                t0 = time.perf_counter()
                jax.block_until_ready(prefill(params, toks, lens))

                @functools.partial(jax.jit, donate_argnums=(2,))
                def step(params, tok, cache):
                    logits, cache = model(params, cfg, tok[:, None], cache=cache, attn_impl="auto")
                    return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache

                def host_generate(params, toks, lens, key, stops, **_):
                    # greedy, like generate_arrays with SamplingParams(); no host sync until the end
                    tok, _, cache = prefill(params, toks, lens)
                    out = []
                    for _ in range(a.new_tokens):
                        out.append(tok)
                        tok, cache = step(params, tok, cache)
                    out = jnp.stack(out, 1)
                    return out, jnp.zeros(out.shape, jnp.float32), None

                gen_fn = generate_arrays if loop == "device" else host_generate
                out = jax.block_until_ready(gen_fn(params, toks, lens, key, stops, **gen_kw))
                row["compile_s"] = time.perf_counter() - t0
                # greedy tokens of row 0 and the mean log-prob: two ways of running one residual
                # mode (the device and host loops) must agree here
                first = min(16, a.new_tokens)
                row["first_tokens"] = np.asarray(out[0][0, :first]).tolist()
                run = dict(
                    tp=tp,
                    tokens=row["first_tokens"],
                    logp=None,
                    logits=np.asarray(prefill(params, toks, lens)[1]),
                )
                if loop == "device":  # (the host loop keeps no log-probs)
                    row["mean_logp"] = float(np.asarray(out[1], np.float64).mean())
                    run["logp"] = np.asarray(out[1][0, :first], np.float64).tolist()
                if mode == "desync" and (label, batch) in refs:
                    row["tp_check"] = dict(
                        ok=True,
                        why="not checked: desync drops the all-reduces, another function at TP > 1",
                    )
                elif (label, batch) in refs:
                    row["tp_check"] = same_model_check(refs[(label, batch)], run, exact=exact)
                else:
                    refs[(label, batch)] = run
                    row["tp_check"] = dict(ok=True, why="reference")
                pre, gen, dec = decode_seconds(
                    lambda p=params: jax.block_until_ready(prefill(p, toks, lens)),
                    lambda p=params: jax.block_until_ready(
                        gen_fn(p, toks, lens, key, stops, **gen_kw)
                    ),
                    a.reps,
                )
                row.update(
                    prefill_s=pre,
                    decode_s=dec,
                    generate_s=gen,
                    ms_per_step=1e3 * dec / a.new_tokens,
                    tokens_per_s=batch * a.new_tokens / dec,
                )
                if a.profile:  # one more call, traced (after timing: tracing slows it)
                    with jax.profiler.trace(
                        str(Path(a.profile) / _setting_name(row)), create_perfetto_trace=True
                    ):
                        jax.block_until_ready(gen_fn(params, toks, lens, key, stops, **gen_kw))
                stats = devices[0].memory_stats() or {}
                row["peak_bytes"] = stats.get("peak_bytes_in_use")
                if a.dump_hlo:  # the schedule of the timed executable (compile cache hit)
                    Path(a.dump_hlo).mkdir(parents=True, exist_ok=True)
                    if loop == "device":
                        txt = (
                            generate_arrays.lower(params, toks, lens, key, stops, **gen_kw)
                            .compile()
                            .as_text()
                        )
                    else:
                        _, _, c0 = prefill(params, toks, lens)
                        txt = step.lower(params, toks[:, 0], c0).compile().as_text()
                    name = (
                        f"generate_{a.preset}_{label}_tp{tp}_b{batch}_{a.xla_preset}"
                        f"{'' if p2p else '_nop2p'}.hlo.txt"
                    )
                    (Path(a.dump_hlo) / name).write_text(txt)
                print("ROW " + json.dumps(row), flush=True)
        del params


def _setting_name(row: dict) -> str:
    return (
        f"{row['residual']}_tp{row['tp']}_b{row['batch']}_{row['xla_preset']}"
        f"{'' if row['p2p'] else '_nop2p'}"
    )


# ----------------------------------------------------------------------------- driver
def _table(rows: list[dict]) -> str:
    key = lambda r: (r["tp"], r["batch"], r["p2p"], r["xla_preset"], r.get("run", 1))  # noqa: E731
    base = {key(r): r["tokens_per_s"] for r in rows if r["residual"] == "standard"}
    head = (
        "| residual | TP | batch | P2P | XLA flags | tokens/s | prefill s | decode s | ms/step | speedup vs standard | same model as TP |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    lines = [head]
    for r in sorted(
        rows,
        key=lambda r: (
            r["xla_preset"],
            not r["p2p"],
            r.get("run", 1),
            r["tp"],
            r["batch"],
            MODES.index(r["residual"]) if r["residual"] in MODES else 9,
        ),
    ):
        ref = base.get(key(r))
        sp = f"{r['tokens_per_s'] / ref:.3f}x" if ref else "-"
        run = f" (run {r['run']})" if r.get("run", 1) > 1 else ""
        lines.append(
            f"| {r['residual']} | {r['tp']} | {r['batch']} | {'on' if r['p2p'] else 'off'} | {r['xla_preset']}{run} | "
            f"{r['tokens_per_s']:.1f} | {r['prefill_s']:.4f} | {r['decode_s']:.4f} | "
            f"{r['ms_per_step']:.3f} | {sp} | {_check_cell(r)} |"
        )
    return "\n".join(lines)


def _check_cell(row: dict) -> str:
    """The row's cross-TP check in a few words (`same_model_check`)."""
    c = row.get("tp_check")
    if not c or "ref_tp" not in c:
        return c["why"] if c else "-"
    verdict = "ok" if c["ok"] else "FAILED"
    return (
        f"{c['ref_tp']}: {verdict}, {c['tokens_agree']}/{c['tokens']} tokens, "
        f"logits {c['logits_rel_err']:.1e}"
    )


def check_failures(rows: list[dict]) -> list[str]:
    """One line per row whose run disagrees with its run at the first TP size."""
    return [
        f"{r['residual']} TP {r['tp']} batch {r['batch']} ({r['xla_preset']}, P2P "
        f"{'on' if r['p2p'] else 'off'}) against TP {r['tp_check']['ref_tp']}: "
        f"{r['tp_check']['why']}"
        for r in rows
        if not r.get("tp_check", {}).get("ok", True)
    ]


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in MODES:
        for p2p in (True, False):
            pts = sorted(
                (r["tp"], r["tokens_per_s"])
                for r in rows
                if r["residual"] == mode
                and r["p2p"] == p2p
                and r["batch"] == min(x["batch"] for x in rows)
            )
            if pts:
                ax.plot(
                    *zip(*pts),
                    marker="o",
                    ls="-" if p2p else "--",
                    label=f"{mode}{'' if p2p else ' (P2P off)'}",
                )
    ax.set_xlabel("tensor parallel")
    ax.set_ylabel("tokens/s (smallest batch)")
    ax.set_title(f"{rows[0]['preset']} decode, {rows[0]['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker:
        run_worker(a)
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    failed_workers: list[str] = []
    if a.processes < 1:
        raise SystemExit(f"--processes {a.processes}: use 1 or more")
    if a.processes > 1 and a.profile:
        raise SystemExit("--profile traces one process per setting: use it with --processes 1")
    settings = [
        (s, x, run)
        for x in a.xla_preset.split(",")
        for s in a.p2p.split(",")
        for run in range(1, a.processes + 1)
    ]
    for setting, xla, run in settings:
        if setting not in ("on", "off") or xla not in XLA_PRESETS:
            raise SystemExit(
                f"--p2p {setting!r} / --xla-preset {xla!r}: use on/off and {list(XLA_PRESETS)}"
            )
        env = dict(os.environ)
        # compiled executables are shared between workers (P2P only changes NCCL at run time)
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str((out / "jax_cache").resolve()))
        # the host platform gets 8 fake devices (the cpu-8 mesh); GPUs are unaffected
        env["XLA_FLAGS"] = " ".join(
            [
                env.get("XLA_FLAGS", ""),
                "--xla_force_host_platform_device_count=8",
                *GPU_FLAGS,
                *XLA_PRESETS[xla],
            ]
        ).strip()
        env.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on the shared hosts
        env["NCCL_P2P_DISABLE"] = "1" if setting == "off" else "0"
        env.setdefault("PYTHONUNBUFFERED", "1")
        # the worker imports this package wherever the parent was started
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        args = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--worker"]
        cmd = [
            sys.executable,
            "-m",
            "experiments.ladder.bench",
            *args,
            "--worker",
            "--xla-preset",
            xla,
        ]
        # rows are streamed, so a run cut off by a time limit still leaves what it measured
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.startswith("ROW "):
                rows.append(dict(json.loads(line[4:]), run=run))
                r = rows[-1]
                print(
                    f"# {r['residual']} tp={r['tp']} b={r['batch']} p2p={setting} xla={xla}"
                    f"{f' run {run}' if a.processes > 1 else ''}: "
                    f"{r['tokens_per_s']:.1f} tok/s, {r['ms_per_step']:.3f} ms/step, "
                    f"prefill {r['prefill_s']:.3f} s (compile {r['compile_s']:.0f} s); "
                    f"same model: {_check_cell(r)}",
                    flush=True,
                )
                (out / "results.json").write_text(json.dumps(rows, indent=1))
        if proc.wait():
            print(
                f"# worker (P2P {setting}, xla {xla}) exited with {proc.returncode}",
                file=sys.stderr,
            )
            failed_workers.append(
                f"worker (P2P {setting}, xla {xla}, run {run}) exited with {proc.returncode}"
            )
    if not rows:
        print("no results", file=sys.stderr)
        return 1
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    table = _table(rows)
    (out / "results.md").write_text(f"{rows[0]['preset']} on {rows[0]['device']}\n\n{table}\n")
    _plot(rows, out / "tokens_per_s.png")
    print(
        f"\n{rows[0]['preset']} on {rows[0]['device']} ({rows[0]['layers']} layers, "
        f"XLA flag sets {a.xla_preset})\n{table}"
    )
    if a.processes > 1:
        runs = analysis.runs_table(analysis.group_runs(rows))
        (out / "runs.md").write_text(runs + "\n")
        print(f"\nrun by run (each ladder against the standard of its own process)\n{runs}")
    if a.profile:
        prof = []
        for r in rows:
            d = Path(a.profile) / _setting_name(r)
            try:
                got = analysis.summarize(
                    analysis.load_events(d), preset_config(a.preset).num_hidden_layers
                )
            except (FileNotFoundError, ValueError) as e:
                print(f"# profile {d}: {e}", file=sys.stderr)
                continue
            prof += [dict(setting=_setting_name(r), **g) for g in got]
        if not prof:
            print("# profile: no GPU kernels in the traces (CPU run?)", file=sys.stderr)
        else:
            (out / "profile.json").write_text(json.dumps(prof, indent=1))
            (out / "profile.md").write_text(analysis.trace_table(prof) + "\n")
            print(
                "\nwhere each GPU's decode step goes (ms per step; analysis trace)\n"
                + analysis.trace_table(prof)
            )
    failed = check_failures(rows)
    if failed:  # last, so that the table and the files above are there to look at
        print(
            "\nCROSS-TP CHECK FAILED: a tensor size disagrees with the first (another model, "
            "or a wrong tensor-parallel forward)\n  " + "\n  ".join(failed),
            file=sys.stderr,
        )
    if failed_workers:
        print(
            "\nINCOMPLETE: " + "; ".join(failed_workers) + " (its error is above)", file=sys.stderr
        )
    return 1 if failed or failed_workers else 0


if __name__ == "__main__":
    sys.exit(main())
