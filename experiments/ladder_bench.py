"""Ladder-Residual decode benchmark: residual mode x tensor parallel x batch (x P2P on/off).

Llama-3-8B shape with random bf16 weights (or a tiny CPU preset), prompt of `--prompt` tokens,
greedy decode of `--new-tokens` through the foundation's on-device loop
(`jaxturbo.generate.decode._generate` with the tensor-parallel forward).  Per setting:

    prefill s   one jitted cached prefill of the prompt (same forward, same shardings)
    decode s    generate(prompt, N new tokens) - prefill s: N decode steps in one while_loop
    tokens/s    batch * N / decode s        speedup: tokens/s over `standard` at the same TP/batch

NCCL reads NCCL_P2P_DISABLE once per process, so each P2P setting runs in its own worker
process (`--worker`); the parent merges their JSON lines, prints the table last and writes
`results.json`, `results.md` and `tokens_per_s.png` to `--out`.

    python experiments/ladder_bench.py --preset tiny --mesh cpu-8            # CPU, TP 1/2/4/8
    python experiments/ladder_bench.py --preset 8b --tp 1,2 --batch 1 --p2p on,off
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

# Decode GEMVs: XLA's Triton GEMM fusions are 1.76x slower than cuBLAS here (BENCHMARKS.md).
# XLA's dot merger (default: dots under 32 MB sharing an input) turns q/k/v and gate/up into
# one GEMM over weights it concatenates on every step: a full weight copy per layer and token.
# Off, one GPU's share of a TP-4 8B decode step went from 3.51 to 2.35 ms (H100,
# experiments/ladder/NOTES.md).  The "merge" preset turns it back on for comparison.
GPU_FLAGS = ["--xla_gpu_enable_triton_gemm=false", "--xla_gpu_dot_merger_threshold_mb=0"]
# Flag sets tried for overlap (see experiments/ladder/NOTES.md); chosen with --xla-preset.
XLA_PRESETS = {
    "default": [],
    "merge": ["--xla_gpu_dot_merger_threshold_mb=32"],
    "lhs": ["--xla_gpu_enable_latency_hiding_scheduler=true",
            "--xla_gpu_all_reduce_combine_threshold_bytes=0",
            "--xla_gpu_enable_highest_priority_async_stream=true"],
    # XLA's one-shot Triton all-reduce runs as a kernel on the compute stream (operation_queue_id
    # 0 in the HLO), so it cannot overlap compute; NCCL's async all-reduce runs on its own stream.
    "nccl": ["--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false"],
    "nccl_lhs_ol4": ["--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false",
                     "--xla_gpu_enable_latency_hiding_scheduler=true",
                     "--xla_gpu_all_reduce_combine_threshold_bytes=0",
                     "--xla_gpu_enable_highest_priority_async_stream=true",
                     "--xla_gpu_experimental_parallel_collective_overlap_limit=4"],
    "nccl_lhs": ["--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false",
                 "--xla_gpu_enable_latency_hiding_scheduler=true",
                 "--xla_gpu_all_reduce_combine_threshold_bytes=0",
                 "--xla_gpu_enable_highest_priority_async_stream=true"],
    # the scheduler's cost model: XLA's speed-of-light estimator off (the approximate one gives
    # every async collective a large latency to hide).  Adding
    # --xla_gpu_enable_analytical_latency_estimator=true to this aborted XLA (SIGABRT) on H100.
    "nccl_lhs_nosol": ["--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false",
                       "--xla_gpu_enable_latency_hiding_scheduler=true",
                       "--xla_gpu_all_reduce_combine_threshold_bytes=0",
                       "--xla_gpu_enable_highest_priority_async_stream=true",
                       "--xla_gpu_enable_analytical_sol_latency_estimator=false"],
    # NCCL's symmetric-memory kernels (NCCL >= 2.27: low-latency small all-reduces over
    # NVLink), and NCCL user buffers (no copy into NCCL's own buffers); untimed (session 7)
    "nccl_lhs_symm": ["--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false",
                      "--xla_gpu_enable_latency_hiding_scheduler=true",
                      "--xla_gpu_all_reduce_combine_threshold_bytes=0",
                      "--xla_gpu_enable_highest_priority_async_stream=true",
                      "--xla_gpu_experimental_enable_nccl_symmetric_buffers=true"],
    "nccl_lhs_ub": ["--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false",
                    "--xla_gpu_enable_latency_hiding_scheduler=true",
                    "--xla_gpu_all_reduce_combine_threshold_bytes=0",
                    "--xla_gpu_enable_highest_priority_async_stream=true",
                    "--xla_gpu_enable_nccl_user_buffers=true"],
    # the same, with the whole decode step (collectives and the while loop included) captured
    # as CUDA graphs: gpt-fast's other lever, launch overhead
    "nccl_lhs_graph": ["--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false",
                       "--xla_gpu_enable_latency_hiding_scheduler=true",
                       "--xla_gpu_all_reduce_combine_threshold_bytes=0",
                       "--xla_gpu_enable_highest_priority_async_stream=true",
                       "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,"
                       "COLLECTIVES,CONDITIONAL,WHILE",
                       "--xla_gpu_graph_min_graph_size=1"],
}
PRESETS = {
    # Llama-3-8B: the paper's and BENCHMARKS.md's shape
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
               rms_norm_eps=1e-5, max_position_embeddings=8192),
    # Llama-3-70B (issue 9, TP 8 only)
    "70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                rms_norm_eps=1e-5, max_position_embeddings=8192),
    # runs in seconds on 8 fake CPU devices, at every TP up to 8
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=8, head_dim=16,
                 max_position_embeddings=512),
}
PROJECTIONS = ("separate", "fused", "folded", "folded_mlp", "folded_attn")
MODES = ("standard", "ladder", "ladder+streams", "parallel", "desync")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--residual", default="standard,ladder,parallel,desync",
                   help="comma list of residual modes")
    p.add_argument("--tp", default="1,2,4,8", help="comma list of tensor-parallel sizes")
    p.add_argument("--batch", default="1", help="comma list of batch sizes (BENCHMARKS: 1,4,16,64)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 1024; tiny: 64)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 256 (512 for full runs); tiny: 16")
    p.add_argument("--p2p", default="on", help="on, off or on,off (NCCL_P2P_DISABLE=1 when off)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--scan", action="store_true", help="lax.scan over layers instead of unrolling")
    p.add_argument("--xla-preset", default="default",
                   help=f"comma list of XLA flag sets, one worker each: {', '.join(XLA_PRESETS)}")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    p.add_argument("--processes", type=int, default=1,
                   help="run each setting's worker this many times, one after another (rows "
                        "tagged run 1..N, each run's ratio against its own standard; between "
                        "processes standard moved by up to 4%% on 4x H100: experiments/ladder/"
                        "NOTES.md, session 9); with N > 1 the per-run ratios and their medians "
                        "are printed too (experiments/ladder/runs_report.py)")
    p.add_argument("--decode-loop", default="device",
                   help="device (the foundation's on-device while loop), host (one jitted step "
                        "per token from Python, dispatched asynchronously) or device,host")
    p.add_argument("--dump-hlo", default=None, help="folder for each setting's compiled decode step HLO")
    p.add_argument("--profile", default=None,
                   help="folder: trace one more generate call per setting and print where each "
                        "GPU's decode step goes (experiments/ladder/trace_streams.py)")
    p.add_argument("--out", default="runs/ladder_bench")
    p.add_argument("--no-ladder-barrier", action="store_true",
                   help="experiment: make the ladder's optimization barrier the identity in this run "
                        "(rows are labelled '<flags>+nobarrier')")
    p.add_argument("--unfused-append", action="store_true",
                   help="baseline: the decode step writes the KV cache with XLA before the "
                        "attention kernel (pallas_kernels.api.FUSED_APPEND off; rows labelled "
                        "'<flags>+unfused')")
    p.add_argument("--projections", default="fused", choices=PROJECTIONS,
                   help="weight layout: separate (q, k, v, gate, up as HF stores them), fused "
                        "(q/k/v and gate/up one matrix each: jaxturbo.models.fused; 1.10x at TP 4 "
                        "on 4x H100; rows labelled '<flags>+fusedproj'), folded (fused, with the "
                        "RMSNorm gains in those weights: fused.fold_norms; '+foldnorm'), "
                        "folded_mlp / folded_attn (only the post-attention / input norm folded: "
                        "'+foldmlp' / '+foldattn')")
    p.add_argument("--q-in-kernel", action="store_true",
                   help="fused layouts: the decode kernel scales and rotates the queries itself "
                        "(pallas_kernels.api.ROTATE_Q_IN_KERNEL; rows labelled '<flags>+qkern')")
    p.add_argument("--jnp-merge", action="store_true",
                   help="baseline: the decode kernel's chunks merged in jnp (two XLA kernels) "
                        "instead of the Pallas merge kernel (rows labelled '<flags>+jnpmerge')")
    p.add_argument("--ladder-overlap", default="scheduler",
                   help="comma list for the ladder rows: scheduler (XLA's latency-hiding scheduler "
                        "places the all-reduces) and/or streams (each MLP on a second GPU stream, "
                        "issued with its attention all-reduce; rows labelled 'ladder+streams')")
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
    from jaxturbo.models import fused
    from jaxturbo.parallel import tensor

    shapes = layer_shapes(cfg)
    kv = tensor.cache_kv_heads(cfg, tp)
    for n in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        shapes[n] = (kv * cfg.head_dim, cfg.hidden_size)
    if projections not in PROJECTIONS:
        raise ValueError(f"projections={projections!r}; choose one of {PROJECTIONS}")
    if projections != "separate":  # random values: the rows' shard-by-shard order needs no care
        shapes = fused.fused_layer_shapes(shapes, kv, cfg.head_dim)
    (attn_norm, _), (mlp_norm, _) = fused.FOLDED_NORMS
    folds = {"folded": (attn_norm, mlp_norm), "folded_mlp": (mlp_norm,), "folded_attn": (attn_norm,)}
    for norm in folds.get(projections, ()):  # the gains live in the fused weights
        shapes.pop(norm)
    return shapes


def _random_params(cfg, mesh, dtype, projections="separate"):
    """Random weights made directly in their shards on the devices (8B never touches the host),
    in the `projections` layout (`bench_layer_shapes`)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from jaxturbo.bridge.hf import global_shapes
    from jaxturbo.parallel import tensor

    shapes = bench_layer_shapes(cfg, tensor.tensor_size(mesh), projections)

    def draw(key, shape, is_norm):
        if is_norm:
            return jnp.ones(shape, dtype)
        return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)

    def make(name, shape, spec, seed):
        f = jax.jit(lambda k: draw(k, shape, "norm" in name), out_shardings=NamedSharding(mesh, spec))
        return f(jax.random.key(seed))

    specs = tensor.param_specs({**{n: None for n in global_shapes(cfg)},
                                "layers": {n: None for n in shapes}})
    params = {n: make(n, s, specs[n], i) for i, (n, s) in enumerate(global_shapes(cfg).items())}
    params["layers"] = {n: make(n, (cfg.num_hidden_layers, *s), specs["layers"][n], 100 + i)
                        for i, (n, s) in enumerate(shapes.items())}
    return params


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def run_worker(a: argparse.Namespace) -> None:
    import jax

    if a.no_ladder_barrier:
        # only the ladder step calls it; this process then traces the ladder without the barrier
        jax.lax.optimization_barrier = lambda operand: operand
        a.xla_preset = a.xla_preset + "+nobarrier"
    if a.unfused_append:
        import pallas_kernels.api
        pallas_kernels.api.FUSED_APPEND = False
        a.xla_preset = a.xla_preset + "+unfused"
    if a.projections != "separate":
        a.xla_preset = a.xla_preset + {"fused": "+fusedproj", "folded": "+foldnorm",
                                       "folded_mlp": "+foldmlp",
                                       "folded_attn": "+foldattn"}[a.projections]
    if a.q_in_kernel:
        import pallas_kernels.api
        pallas_kernels.api.ROTATE_Q_IN_KERNEL = True
        a.xla_preset = a.xla_preset + "+qkern"
    if a.jnp_merge:
        from pallas_kernels.decode_attention import pallas_triton
        pallas_triton.DEFAULT_CONFIG = pallas_triton.Config(merge="xla")
        a.xla_preset = a.xla_preset + "+jnpmerge"

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import jax.numpy as jnp
    import numpy as np

    from jaxturbo.generate.decode import _generate
    from jaxturbo.generate.decode import prefill as decode_prefill
    from jaxturbo.generate.sampling import SamplingParams
    from jaxturbo.models.config import ModelConfig
    from jaxturbo.models.transformer import kv_cache_bytes_per_token
    from jaxturbo.parallel import tensor
    from jaxturbo.parallel.mesh import make_mesh

    dtype = jnp.dtype(a.dtype)
    devices = jax.devices()
    base = ModelConfig(**PRESETS[a.preset])
    p2p = os.environ.get("NCCL_P2P_DISABLE", "0") != "1"
    for tp in _ints(a.tp):
        if tp > len(devices):
            print(f"# skip TP {tp}: only {len(devices)} devices", file=sys.stderr)
            continue
        mesh = make_mesh({"tensor": tp}, devices[:tp])
        tensor.check_tensor_parallel(base, tp)
        params = _random_params(base, mesh, dtype, a.projections)
        runs = [(m, o, loop) for m in a.residual.split(",")
                for o in (a.ladder_overlap.split(",") if m == "ladder" else ["scheduler"])
                for loop in a.decode_loop.split(",")]
        for batch in _ints(a.batch):
            rng = np.random.RandomState(batch)
            toks = jnp.asarray(rng.randint(0, base.vocab_size, (batch, a.prompt)), jnp.int32)
            lens = jnp.full((batch,), a.prompt, jnp.int32)
            for mode, overlap, loop in runs:
                cfg = base.replace(residual_mode=mode)
                model = tensor.TensorParallel(mesh, unroll=not a.scan, ladder_overlap=overlap)
                label = mode if overlap == "scheduler" else f"{mode}+{overlap}"
                label += "" if loop == "device" else "+hostloop"
                row = dict(preset=a.preset, residual=label, tp=tp, batch=batch, prompt=a.prompt,
                           new_tokens=a.new_tokens, p2p=p2p, device=devices[0].device_kind,
                           platform=devices[0].platform, layers="scan" if a.scan else "unrolled",
                           xla_preset=a.xla_preset,
                           kv_bytes_per_token=kv_cache_bytes_per_token(cfg, dtype))
                gen_kw = dict(cfg=cfg, max_new_tokens=a.new_tokens, sampling=SamplingParams(),
                              stream=None, attn_impl="auto", cache_dtype=dtype.name,
                              model_fn=model, kv_heads=tensor.cache_kv_heads(cfg, tp))
                key, stops = jax.random.key(0), jnp.asarray([-1], jnp.int32)  # never stops early

                @jax.jit
                def prefill(params, toks, lens):  # what _generate's prefill does, alone
                    cache = tensor.init_cache(cfg, toks.shape[0], a.prompt + a.new_tokens, dtype,
                                              kv_heads=tensor.cache_kv_heads(cfg, tp))
                    last, cache = decode_prefill(model, params, cfg, toks, lens, cache, "auto")
                    return jnp.argmax(last, -1), cache

                t0 = time.perf_counter()
                jax.block_until_ready(prefill(params, toks, lens))
                @functools.partial(jax.jit, donate_argnums=(2,))
                def step(params, tok, cache):
                    logits, cache = model(params, cfg, tok[:, None], cache=cache,
                                          attn_impl="auto")
                    return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache

                def host_generate(params, toks, lens, key, stops, **_):
                    # greedy, like _generate with SamplingParams(); no host sync until the end
                    tok, cache = prefill(params, toks, lens)
                    out = []
                    for _ in range(a.new_tokens):
                        out.append(tok)
                        tok, cache = step(params, tok, cache)
                    out = jnp.stack(out, 1)
                    return out, jnp.zeros(out.shape, jnp.float32), None

                gen_fn = _generate if loop == "device" else host_generate
                out = jax.block_until_ready(gen_fn(params, toks, lens, key, stops, **gen_kw))
                # greedy tokens of row 0 and the mean log-prob: two ways of running one residual
                # mode (e.g. ladder and ladder+streams) must agree here
                row["first_tokens"] = np.asarray(out[0][0, :8]).tolist()
                if loop == "device":  # (the host loop keeps no log-probs)
                    row["mean_logp"] = float(np.asarray(out[1], np.float64).mean())
                row["compile_s"] = time.perf_counter() - t0
                pre = _median_time(lambda: jax.block_until_ready(prefill(params, toks, lens)), a.reps)
                gen = _median_time(lambda: jax.block_until_ready(
                    gen_fn(params, toks, lens, key, stops, **gen_kw)), a.reps)
                dec = max(gen - pre, 1e-9)
                row.update(prefill_s=pre, decode_s=dec, generate_s=gen,
                           ms_per_step=1e3 * dec / a.new_tokens,
                           tokens_per_s=batch * a.new_tokens / dec)
                if a.profile:  # one more call, traced (after timing: tracing slows it)
                    with jax.profiler.trace(str(Path(a.profile) / _setting_name(row)),
                                            create_perfetto_trace=True):
                        jax.block_until_ready(gen_fn(params, toks, lens, key, stops, **gen_kw))
                stats = devices[0].memory_stats() or {}
                row["peak_bytes"] = stats.get("peak_bytes_in_use")
                if a.dump_hlo:  # the schedule of the timed executable (compile cache hit)
                    Path(a.dump_hlo).mkdir(parents=True, exist_ok=True)
                    if loop == "device":
                        txt = _generate.lower(params, toks, lens, key, stops,
                                              **gen_kw).compile().as_text()
                    else:
                        _, c0 = prefill(params, toks, lens)
                        txt = step.lower(params, toks[:, 0], c0).compile().as_text()
                    name = (f"generate_{a.preset}_{label}_tp{tp}_b{batch}_{a.xla_preset}"
                            f"{'' if p2p else '_nop2p'}.hlo.txt")
                    (Path(a.dump_hlo) / name).write_text(txt)
                print("ROW " + json.dumps(row), flush=True)
        del params


def _setting_name(row: dict) -> str:
    return (f"{row['residual']}_tp{row['tp']}_b{row['batch']}_{row['xla_preset']}"
            f"{'' if row['p2p'] else '_nop2p'}")


# ----------------------------------------------------------------------------- driver
def _table(rows: list[dict]) -> str:
    key = lambda r: (r["tp"], r["batch"], r["p2p"], r["xla_preset"], r.get("run", 1))  # noqa: E731
    base = {key(r): r["tokens_per_s"] for r in rows if r["residual"] == "standard"}
    head = ("| residual | TP | batch | P2P | XLA flags | tokens/s | prefill s | decode s | ms/step | speedup vs standard |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for r in sorted(rows, key=lambda r: (r["xla_preset"], not r["p2p"], r.get("run", 1), r["tp"], r["batch"],
                                         MODES.index(r["residual"]) if r["residual"] in MODES else 9)):
        ref = base.get(key(r))
        sp = f"{r['tokens_per_s'] / ref:.3f}x" if ref else "-"
        run = f" (run {r['run']})" if r.get("run", 1) > 1 else ""
        lines.append(f"| {r['residual']} | {r['tp']} | {r['batch']} | {'on' if r['p2p'] else 'off'} | {r['xla_preset']}{run} | "
                     f"{r['tokens_per_s']:.1f} | {r['prefill_s']:.4f} | {r['decode_s']:.4f} | "
                     f"{r['ms_per_step']:.3f} | {sp} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in MODES:
        for p2p in (True, False):
            pts = sorted((r["tp"], r["tokens_per_s"]) for r in rows
                         if r["residual"] == mode and r["p2p"] == p2p and r["batch"] == min(x["batch"] for x in rows))
            if pts:
                ax.plot(*zip(*pts), marker="o", ls="-" if p2p else "--",
                        label=f"{mode}{'' if p2p else ' (P2P off)'}")
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
    if a.processes < 1:
        raise SystemExit(f"--processes {a.processes}: use 1 or more")
    if a.processes > 1 and a.profile:
        raise SystemExit("--profile traces one process per setting: use it with --processes 1")
    settings = [(s, x, run) for x in a.xla_preset.split(",") for s in a.p2p.split(",")
                for run in range(1, a.processes + 1)]
    for setting, xla, run in settings:
        if setting not in ("on", "off") or xla not in XLA_PRESETS:
            raise SystemExit(f"--p2p {setting!r} / --xla-preset {xla!r}: use on/off and {list(XLA_PRESETS)}")
        env = dict(os.environ)
        # compiled executables are shared between workers (P2P only changes NCCL at run time)
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / "jax_cache"))
        # the host platform gets 8 fake devices (the cpu-8 mesh); GPUs are unaffected
        env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
                                     *GPU_FLAGS, *XLA_PRESETS[xla]]).strip()
        env.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on the shared hosts
        env["NCCL_P2P_DISABLE"] = "1" if setting == "off" else "0"
        env.setdefault("PYTHONUNBUFFERED", "1")
        args = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--worker"]
        cmd = [sys.executable, str(Path(__file__).resolve()), *args, "--worker", "--xla-preset", xla]
        # rows are streamed, so a run cut off by a time limit still leaves what it measured
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.startswith("ROW "):
                rows.append(dict(json.loads(line[4:]), run=run))
                r = rows[-1]
                print(f"# {r['residual']} tp={r['tp']} b={r['batch']} p2p={setting} xla={xla}"
                      f"{f' run {run}' if a.processes > 1 else ''}: "
                      f"{r['tokens_per_s']:.1f} tok/s, {r['ms_per_step']:.3f} ms/step, "
                      f"prefill {r['prefill_s']:.3f} s (compile {r['compile_s']:.0f} s)", flush=True)
                (out / "results.json").write_text(json.dumps(rows, indent=1))
        if proc.wait():
            print(f"# worker (P2P {setting}, xla {xla}) exited with {proc.returncode}", file=sys.stderr)
    if not rows:
        print("no results", file=sys.stderr)
        return 1
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    table = _table(rows)
    (out / "results.md").write_text(f"{rows[0]['preset']} on {rows[0]['device']}\n\n{table}\n")
    _plot(rows, out / "tokens_per_s.png")
    print(f"\n{rows[0]['preset']} on {rows[0]['device']} ({rows[0]['layers']} layers, "
          f"XLA flag sets {a.xla_preset})\n{table}")
    if a.processes > 1:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "ladder"))
        import runs_report
        runs = runs_report.table(runs_report.group_runs(rows))
        (out / "runs.md").write_text(runs + "\n")
        print(f"\nrun by run (each ladder against the standard of its own process)\n{runs}")
    if a.profile:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "ladder"))
        import trace_streams
        prof = []
        for r in rows:
            d = Path(a.profile) / _setting_name(r)
            try:
                got = trace_streams.summarize(trace_streams.load_events(d),
                                              PRESETS[a.preset]["num_hidden_layers"])
            except (FileNotFoundError, ValueError) as e:
                print(f"# profile {d}: {e}", file=sys.stderr)
                continue
            prof += [dict(setting=_setting_name(r), **g) for g in got]
        if not prof:
            print("# profile: no GPU kernels in the traces (CPU run?)", file=sys.stderr)
        else:
            (out / "profile.json").write_text(json.dumps(prof, indent=1))
            (out / "profile.md").write_text(trace_streams.table(prof) + "\n")
            print("\nwhere each GPU's decode step goes (ms per step; trace_streams.py)\n"
                  + trace_streams.table(prof))
    return 0


if __name__ == "__main__":
    sys.exit(main())
