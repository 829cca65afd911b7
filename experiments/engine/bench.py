"""The inference engine (continuous batching over a paged KV cache) against the static batched
`generate`, transformers' continuous batching and a floor, on random weights of a named shape.

Workloads:
  w1       R requests, prompt lengths uniform in [lo, hi] (numpy seed 0), N greedy new tokens
           each, EOS ignored: output tokens/s of the engine, of the static `generate` in padded
           batches (every prompt right-padded to the longest), of transformers' `generate_batch`
           (attn_implementation="paged|sdpa"; when torch is importable), and the floor;
  w2       P prompts x S samples at temperature 1: a shared prefix + unique tokens each, N new
           tokens; the engine with prefix caching on and off (prompt tokens computed vs
           requested);
  latency  one request at a time (prompt, N new tokens): time to first token and per output
           token of the engine and of `generate` at batch 1.

Floor (w1, w2): prefill FLOPs (matmuls 2 x params x prompt tokens computed, plus causal
attention) at the bf16 matmul rate measured in this run, plus per decode step the bytes of the
weights and of every running sequence's KV at the copy bandwidth measured in this run (all
sequences decoding together).  Latency floor: the prompt's FLOPs (first token) and one step's
bytes (per token).

    python -m experiments.engine.bench --preset cpu                 # tiny shape, CPU, < 1 min
    python -m experiments.engine.bench --preset gpu --workload w1 --shape llama3-8b
    python -m experiments.engine.bench --preset gpu --workload w1 --shape llama3-8b --systems hf

Writes <out>.json, <out>.md and <out>.png (default experiments/engine/results/
engine_<preset>_<workload>_<shape>[_<systems>]).  The transformers peer runs first, before JAX
takes the GPU's memory, and frees it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gc
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

from jaxturbo.cli.common import use_decode_xla_flags

use_decode_xla_flags()  # before JAX starts its backend: the flags `jaxturbo generate` decodes with

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.bench_util import (  # noqa: E402
    copy_bandwidth,
    device_name,
    positive_ints,
    time_difference,
    time_fn,
    trace_kernels,
    write_table,
)
from jaxturbo.inference import generate  # noqa: E402
from jaxturbo.inference.engine.config import EngineConfig  # noqa: E402
from jaxturbo.inference.engine.engine import Engine  # noqa: E402
from jaxturbo.inference.engine.model_runner import StepHandle  # noqa: E402
from jaxturbo.inference.engine.params import RequestParams  # noqa: E402
from jaxturbo.models.config import ModelConfig  # noqa: E402
from jaxturbo.models.init import init_params  # noqa: E402
from jaxturbo.models.shapes import shape  # noqa: E402
from jaxturbo.models.transformer import kv_cache_bytes_per_token  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WORKLOADS = ("w1", "w2", "latency")
SYSTEMS = ("engine", "static", "hf")

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(
        shape="tiny",
        dtype="float32",
        copy_bytes=1 << 24,
        matmul=512,
        w1=dict(requests=8, prompt=(16, 64), new=16),
        w2=dict(prompts=2, samples=4, prefix=32, unique=8, new=8),
        latency=dict(requests=2, prompt=32, new=8),
        static_batches=[4],
        engine=dict(
            page_size=16,
            max_num_seqs=8,
            max_num_batched_tokens=64,
            max_model_len=128,
            token_buckets=(64,),
            seq_buckets=(8,),
        ),
        w1_repeats=1,
        latency_engine=None,  # the w1 engine serves
        compilation_cache=False,  # a process-wide JAX setting: leave the test process's alone
        hf=dict(num_blocks=64, block_size=16, max_batch_tokens=256),
    ),
    "gpu": dict(
        shape="llama3-8b",
        dtype="bfloat16",
        copy_bytes=1 << 31,
        matmul=8192,
        w1=dict(requests=256, prompt=(256, 1024), new=256),
        w2=dict(prompts=64, samples=8, prefix=1024, unique=64, new=128),
        latency=dict(requests=4, prompt=512, new=128),
        static_batches=[64, 256],
        engine=dict(
            page_size=16,
            max_num_seqs=256,
            max_num_batched_tokens=2048,
            max_model_len=1280,
            token_buckets=(128, 256, 512, 1024, 2048),
            seq_buckets=(16, 32, 64, 128, 256),
        ),
        w1_repeats=3,
        latency_engine=dict(
            page_size=16,
            max_num_seqs=1,
            max_num_batched_tokens=512,
            max_model_len=1280,
            token_buckets=(16, 32, 64, 128, 256, 512),
            seq_buckets=(1,),
        ),
        compilation_cache=True,
        hf=dict(),
    ),  # transformers sizes its cache from the free GPU memory
}


# ----------------------------------------------------------------------------- workloads
def w1_prompts(w: dict, vocab: int) -> list[list[int]]:
    rng = np.random.RandomState(0)
    lo, hi = w["prompt"]
    lengths = rng.randint(lo, hi + 1, size=w["requests"])
    return [[int(t) for t in rng.randint(0, vocab, n)] for n in lengths]


def w2_prompts(w: dict, vocab: int) -> list[list[int]]:
    rng = np.random.RandomState(1)
    prefix = [int(t) for t in rng.randint(0, vocab, w["prefix"])]
    return [
        prefix + [int(t) for t in rng.randint(0, vocab, w["unique"])] for _ in range(w["prompts"])
    ]


# ----------------------------------------------------------------------------- floors
def matmul_params(cfg: ModelConfig) -> int:
    """Weights every token multiplies by (all layers' projections), not the embedding table."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hq, hk, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return L * (d * hd * (hq + 2 * hk) + hq * hd * d + 3 * d * f)


def prefill_flops(cfg: ModelConfig, computed: list[tuple[int, int]]) -> float:
    """FLOPs of computing positions [start, end) of each sequence: the projections plus causal
    attention (QK^T and PV over the positions before each token)."""
    per_tok = 2 * matmul_params(cfg)
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim
    total = 0.0
    for start, end in computed:
        total += per_tok * (end - start) + attn * (end * (end + 1) - start * (start + 1)) / 2
    return total


def weight_bytes(cfg: ModelConfig, itemsize: int) -> int:
    """Bytes one decode step reads: the projections and the LM head."""
    return (matmul_params(cfg) + cfg.vocab_size * cfg.hidden_size) * itemsize


def decode_floor_s(cfg: ModelConfig, dtype: str, prompts: list[int], new: int, bw: float) -> float:
    """`new` steps of every sequence decoding together: weights once a step + each sequence's
    KV at its context."""
    kv = sum(new * p + new * (new - 1) / 2 for p in prompts) * kv_cache_bytes_per_token(cfg, dtype)
    return (new * weight_bytes(cfg, jnp.dtype(dtype).itemsize) + kv) / bw


def matmul_rate(n: int, dtype: str) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` on device 0."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    t = time_fn(lambda: f(a), repeats=5, inner=10)
    return 2 * n**3 / t


# ----------------------------------------------------------------------------- systems
def run_engine_w1(engine: Engine, prompts: list[list[int]], new: int) -> dict:
    engine.set_prefix_caching(True)  # empty: a repeated run must not reuse the last one's pages
    s0 = engine.stats()
    t0 = time.perf_counter()
    out = engine.generate(prompts, RequestParams(max_tokens=new, ignore_eos=True))
    wall = time.perf_counter() - t0
    s1 = engine.stats()
    assert all(len(c.token_ids) == new for c in out)
    return {
        "wall_s": wall,
        "steps": s1.num_steps - s0.num_steps,
        "preemptions": s1.num_preemptions - s0.num_preemptions,
    }


@contextlib.contextmanager
def host_phases(engine: Engine):
    """Seconds the host spends per phase of `Engine.step` while the block runs (a dict filled
    in place): schedule, launch (build inputs, device_put, dispatch), build (the inputs alone,
    part of launch), fetch (waiting for and reading a step's tokens: where a device-bound loop
    spends its time), resolve (the scheduler's bookkeeping of the tokens) and emit (the
    engine's outputs)."""
    sec: dict[str, float] = collections.defaultdict(float)

    def timed(f, key):
        def g(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                sec[key] += time.perf_counter() - t

        return g

    patched = [
        (engine.scheduler, "schedule"),
        (engine.scheduler, "resolve_tokens"),
        (engine.scheduler, "update_from_output"),
        (engine.runner, "execute"),
        (engine.runner, "_build"),
        (engine, "_emit"),
    ]
    keys = {"schedule": "schedule", "execute": "launch", "_build": "build", "_emit": "emit"}
    for obj, name in patched:
        setattr(obj, name, timed(getattr(obj, name), keys.get(name, "resolve")))
    fetch = StepHandle.fetch
    StepHandle.fetch = timed(fetch, "fetch")
    try:
        yield sec
    finally:
        StepHandle.fetch = fetch
        for obj, name in patched:
            delattr(obj, name)  # the class's method again


def profile_engine_w1(engine: Engine, prompts: list[list[int]], new: int) -> dict:
    """Where an engine step's time goes, from two more W1 runs: host milliseconds per step by
    phase (`host_phases`), then the GPU kernels per step under the profiler (device busy time
    against wall time per step; None off GPU)."""
    steps0 = engine.stats().num_steps
    with host_phases(engine) as sec:
        r = run_engine_w1(engine, prompts, new)
    steps = engine.stats().num_steps - steps0
    out = {
        "steps": steps,
        "wall_ms_per_step": 1e3 * r["wall_s"] / steps,
        "host_ms_per_step": {k: round(1e3 * v / steps, 3) for k, v in sorted(sec.items())},
    }
    kernels = trace_kernels(lambda: run_engine_w1(engine, prompts, new), steps)
    if kernels is not None:
        out["traced"] = kernels
    return out


def run_engine_w2(engine: Engine, prompts: list[list[int]], w: dict, caching: bool) -> dict:
    engine.set_prefix_caching(caching)
    s0 = engine.stats()
    params = [
        RequestParams(max_tokens=w["new"], temperature=1.0, n=w["samples"], seed=i, ignore_eos=True)
        for i in range(len(prompts))
    ]
    t0 = time.perf_counter()
    engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    s1 = engine.stats()
    return {
        "wall_s": wall,
        "steps": s1.num_steps - s0.num_steps,
        "prompt_tokens_requested": s1.prompt_tokens - s0.prompt_tokens,
        "prompt_tokens_computed": s1.prefill_tokens_computed - s0.prefill_tokens_computed,
        "preemptions": s1.num_preemptions - s0.num_preemptions,
    }


def run_engine_latency(engine: Engine, prompts: list[list[int]], new: int) -> dict:
    ttft, tpot = [], []
    p = RequestParams(max_tokens=new, ignore_eos=True)
    for prompt in prompts:
        t0 = time.perf_counter()
        engine.add_request(prompt, p)
        first = None
        while engine.has_unfinished():
            if engine.step() and first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        ttft.append(first - t0)
        tpot.append((end - first) / (new - 1))
    return {"ttft_ms": 1e3 * float(np.median(ttft)), "tpot_ms": 1e3 * float(np.median(tpot))}


def run_static_w1(params, cfg, prompts: list[list[int]], new: int, batch: int) -> dict:
    width = max(map(len, prompts))  # one program: every batch right-padded to the longest prompt
    batches = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    batches[-1] = batches[-1] + [batches[-1][-1]] * (batch - len(batches[-1]))  # same shape
    t0 = time.perf_counter()
    generate(params, cfg, batches[0], max_new_tokens=new, bucket_multiple=width, stop_ids=())
    compile_and_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in batches:
        res = generate(params, cfg, b, max_new_tokens=new, bucket_multiple=width, stop_ids=())
    wall = time.perf_counter() - t0
    assert int(res.num_tokens.min()) == new
    return {
        "wall_s": wall,
        "compile_s": compile_and_first,
        "batch": batch,
        "padded_prompt_tokens": len(batches) * batch * width,
    }


def run_static_latency(params, cfg, prompt: list[int], new: int, reps: int = 3) -> dict:
    gen = lambda n: (
        lambda: (
            generate(
                params, cfg, [prompt], max_new_tokens=n, stop_ids=(), bucket_multiple=len(prompt)
            ).tokens
        )
    )
    first, _, diff = time_difference(
        gen(1), gen(new), repeats=reps, what=f"decode time of {new - 1} steps"
    )
    return {"ttft_ms": 1e3 * first, "tpot_ms": 1e3 * diff / (new - 1)}


def run_hf_w1(
    cfg: ModelConfig, prompts: list[list[int]], new: int, dtype: str, hf_cfg: dict
) -> dict:
    """transformers' continuous batching on random weights of the same shape."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    d = cfg.to_hf_dict()
    d.pop("torch_dtype", None)
    hc = LlamaConfig.from_dict(d)
    hc.eos_token_id = None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            hc, dtype=tdtype, attn_implementation="paged|sdpa"
        ).eval()
    gen = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(**hf_cfg)
    model.generate_batch(
        prompts[:4], generation_config=gen, continuous_batching_config=cb, max_new_tokens=4
    )  # kernels and allocator warm
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    lens = [len(o.generated_tokens) for o in out.values()]
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "wall_s": wall,
        "note": f"transformers paged|sdpa, {len(out)} results, "
        f"new tokens {min(lens)}..{max(lens)} (CB warm-up included)",
        "output_tokens": sum(lens),
    }


# ----------------------------------------------------------------------------- main
def throughput_row(
    system: str, r: dict, prompts: list[list[int]], new: int, floor: float, samples: int = 1
) -> dict:
    out_tok = r.pop("output_tokens", len(prompts) * samples * new)
    total = out_tok + sum(map(len, prompts)) * samples
    return {
        "system": system,
        **r,
        "output_tokens_per_s": out_tok / r["wall_s"],
        "total_tokens_per_s": total / r["wall_s"],
        "floor_s": floor,
        "fraction_of_floor": floor / r["wall_s"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.engine.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    ap.add_argument("--shape", help="model shape (jaxturbo.models.shapes); default: the preset's")
    ap.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma-separated subset of engine,static,hf"
    )
    ap.add_argument("--static-batches", help="comma-separated batch sizes of the static generate")
    ap.add_argument("--out", help="path stem of the .json/.md/.png")
    ap.add_argument(
        "--decode-steps",
        default="1",
        help="w1: comma-separated decode steps per launch; each N > 1 adds an engine row "
        "(dispatch thread, N decode steps per launch)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="w1: also time the engine's host phases per step and trace its GPU kernels "
        "(into the JSON's metadata, `profile`)",
    )
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    name = args.shape or p["shape"]
    cfg = shape(name)
    systems = [s for s in args.systems.split(",") if s]
    bad = set(systems) - set(SYSTEMS)
    if bad:
        ap.error(f"unknown systems {sorted(bad)}; choose from {','.join(SYSTEMS)}")
    workloads = WORKLOADS if args.workload == "all" else (args.workload,)
    decode_steps = positive_ints(args.decode_steps, "--decode-steps", ap.error)
    static_batches = (
        [int(b) for b in args.static_batches.split(",")]
        if args.static_batches
        else p["static_batches"]
    )
    dtype = p["dtype"]
    cache_dir = "default" if p["compilation_cache"] else None
    rows: list[dict] = []
    meta: dict[str, Any] = {
        "shape": name,
        "dtype": dtype,
        "preset": args.preset,
        "workloads": list(workloads),
        "systems": systems,
    }

    w1 = w1_prompts(p["w1"], cfg.vocab_size) if "w1" in workloads else None
    if w1 is not None and "hf" in systems:  # first: before JAX holds the GPU's memory
        if importlib.util.find_spec("torch") is None:
            meta["hf"] = "skipped: torch is not importable"
        else:
            try:
                meta["hf_result"] = run_hf_w1(cfg, w1, p["w1"]["new"], dtype, p["hf"])
            except Exception as e:  # noqa: BLE001 - the peer's failure is a result, not a crash
                meta["hf"] = f"failed: {type(e).__name__}: {e}"[:500]

    bw = copy_bandwidth(p["copy_bytes"])
    rate = matmul_rate(p["matmul"], dtype)
    meta.update(
        device=device_name(),
        jax=jax.__version__,
        copy_bandwidth_GBps=round(bw / 1e9, 1),
        matmul_TFLOPs=round(rate / 1e12, 1),
    )
    print(
        f"{meta['device']}: copy {bw / 1e9:.0f} GB/s, matmul {rate / 1e12:.1f} TFLOP/s", flush=True
    )
    params = init_params(cfg, jax.random.key(0), jnp.dtype(dtype))

    if w1 is not None:
        new = p["w1"]["new"]
        floor = prefill_flops(cfg, [(0, len(q)) for q in w1]) / rate + decode_floor_s(
            cfg, dtype, list(map(len, w1)), new, bw
        )
        meta["w1"] = {**p["w1"], "prompt_tokens": sum(map(len, w1)), "floor_s": floor}
        if "hf_result" in meta:
            rows.append(
                {
                    "workload": "w1",
                    **throughput_row("transformers", meta.pop("hf_result"), w1, new, floor),
                }
            )
    engine = None
    if "engine" in systems and ("w1" in workloads or "w2" in workloads):
        t0 = time.perf_counter()
        engine = Engine(
            params,
            cfg,
            config=EngineConfig(**p["engine"]),
            sort_variants=False,
            compilation_cache_dir=cache_dir,
        )
        meta["engine_startup_s"] = time.perf_counter() - t0
        meta["engine_pool"] = engine.runner.pool_note
        meta["engine_config"] = {
            k: v for k, v in dataclasses.asdict(engine.config).items() if k in p["engine"]
        }
        if w1 is not None:
            variants = [  # the host's scheduling overlapped or not; launch on its own thread
                ("engine", True, False, 1),
                ("engine, synchronous scheduling", False, False, 1),
                ("engine, dispatch thread", True, True, 1),
            ]
            variants += [  # several decode steps per launch
                (f"engine, dispatch thread, {k} decode steps per launch", True, True, k)
                for k in decode_steps
                if k > 1
            ]
            runs: dict[str, list[dict]] = collections.defaultdict(list)
            for _ in range(p["w1_repeats"]):  # interleaved: a noisy host hits every variant
                for label, asynchronous, thread, k in variants:
                    engine.async_scheduling = asynchronous
                    engine.runner.dispatch_thread = thread
                    engine.set_decode_steps(k)
                    runs[label].append(run_engine_w1(engine, w1, new))
            engine.set_decode_steps(1)
            for label, rs in runs.items():  # the run of median wall time
                r = sorted(rs, key=lambda r: r["wall_s"])[len(rs) // 2]
                rows.append({"workload": "w1", **throughput_row(label, r, w1, new, floor)})
                print(f"w1 {label}: {rows[-1]['output_tokens_per_s']:.0f} out tok/s", flush=True)
            meta["w1_statistic"] = f"run of median wall time of {p['w1_repeats']}, interleaved"
            engine.async_scheduling, engine.runner.dispatch_thread = True, False
            if args.profile:
                prof = meta["profile"] = profile_engine_w1(engine, w1, new)
                print(f"profile: {json.dumps({k: v for k, v in prof.items() if k != 'traced'})}")
                for k in prof.get("traced", {}).get("top", [])[:15]:
                    print(f"  {k['us_per_step']:>9.1f} us {k['share']:.3f} {k['kernel']}")
                if "traced" in prof:
                    t = prof["traced"]
                    print(
                        f"traced: wall {t['wall_ms_per_step']:.2f} ms/step, GPU busy "
                        f"{t['busy_ms_per_step']:.2f} ms/step, {t['kernels_per_step']:.0f} "
                        "kernels/step",
                        flush=True,
                    )
        if "w2" in workloads:
            w = p["w2"]
            prompts = w2_prompts(w, cfg.vocab_size)
            n = w["samples"]
            # the floor with caching computes the shared prefix once and each prompt's own
            # tokens once (its n samples share them)
            unique = [(0, w["prefix"])] + [(w["prefix"], len(q)) for q in prompts]
            lens = [len(q) for q in prompts for _ in range(n)]
            floors = {
                True: prefill_flops(cfg, unique) / rate,
                False: prefill_flops(cfg, [(0, m) for m in lens]) / rate,
            }
            for caching in (True, False):
                r = run_engine_w2(engine, prompts, w, caching)
                floor2 = floors[caching] + decode_floor_s(cfg, dtype, lens, w["new"], bw)
                rows.append(
                    {
                        "workload": "w2",
                        **throughput_row(
                            f"engine, prefix cache {'on' if caching else 'off'}",
                            r,
                            prompts,
                            w["new"],
                            floor2,
                            samples=n,
                        ),
                    }
                )
                print(
                    f"w2 caching={caching}: {r['prompt_tokens_computed']} of "
                    f"{r['prompt_tokens_requested']} prompt tokens computed, "
                    f"{r['wall_s']:.2f} s",
                    flush=True,
                )
            meta["w2"] = dict(w)
    if engine is not None and p["latency_engine"] is not None:
        del engine
        engine = None
        gc.collect()  # its pages go before the next program's buffers come
    if w1 is not None and "static" in systems:
        for b in static_batches:
            try:
                r = run_static_w1(params, cfg, w1, new, b)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at a large batch: a result
                meta[f"static_b{b}"] = f"failed: {type(e).__name__}: {e}"[:500]
                print(f"w1 static b={b}: {meta[f'static_b{b}']}", flush=True)
                continue
            rows.append(
                {"workload": "w1", **throughput_row(f"static generate b={b}", r, w1, new, floor)}
            )
            print(f"w1 static b={b}: {rows[-1]['output_tokens_per_s']:.0f} out tok/s", flush=True)
    if "latency" in workloads:
        w = p["latency"]
        prompts = w1_prompts(
            dict(requests=w["requests"], prompt=(w["prompt"], w["prompt"])), cfg.vocab_size
        )
        lat_floor = {
            "ttft_ms": 1e3 * prefill_flops(cfg, [(0, w["prompt"])]) / rate,
            "tpot_ms": 1e3 * decode_floor_s(cfg, dtype, [w["prompt"] + w["new"] // 2], 1, bw),
        }
        rows.append({"workload": "latency", "system": "floor", **lat_floor})
        if "engine" in systems:
            t0 = time.perf_counter()
            if engine is None:
                engine = Engine(
                    params,
                    cfg,
                    sort_variants=False,
                    compilation_cache_dir=cache_dir,
                    config=EngineConfig(**(p["latency_engine"] or p["engine"])),
                )
            startup = time.perf_counter() - t0
            r = run_engine_latency(engine, prompts, w["new"])
            rows.append({"workload": "latency", "system": "engine", **r, "startup_s": startup})
        if "static" in systems:
            rows.append(
                {
                    "workload": "latency",
                    "system": "static generate b=1",
                    **run_static_latency(params, cfg, prompts[0], w["new"]),
                }
            )
        meta["latency"] = dict(w)

    tag = "" if set(systems) == set(SYSTEMS) else "_" + "-".join(systems)
    out = (
        Path(args.out)
        if args.out
        else RESULTS / f"engine_{args.preset}_{args.workload}_{name}{tag}"
    )
    cols = [
        "workload",
        "system",
        "wall_s",
        "output_tokens_per_s",
        "total_tokens_per_s",
        "floor_s",
        "fraction_of_floor",
        "prompt_tokens_requested",
        "prompt_tokens_computed",
        "ttft_ms",
        "tpot_ms",
        "steps",
        "preemptions",
        "batch",
    ]
    cols = [c for c in cols if any(c in r for r in rows)]
    md = write_table(rows, cols, out, f"Inference engine ({meta.get('device')}, {name})", meta)
    plot(rows, out)
    print(md)
    return 0


def plot(rows: list[dict], out: Path) -> None:
    """Output tokens/s per system (w1, w2) and ms per token (latency), one panel each."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [w for w in WORKLOADS if any(r["workload"] == w for r in rows)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, w in zip(axes[0], panels):
        rs = [r for r in rows if r["workload"] == w]
        key, label = (
            ("tpot_ms", "ms per output token")
            if w == "latency"
            else ("output_tokens_per_s", "output tokens/s")
        )
        rs = [r for r in rs if key in r]
        ax.bar(range(len(rs)), [r[key] for r in rs])
        ax.set_xticks(
            range(len(rs)), [r["system"].replace(", ", "\n") for r in rs], fontsize=7, rotation=20
        )
        if w != "latency":  # the floor's throughput, per bar (w2: with and without caching)
            ax.scatter(
                range(len(rs)),
                [r["output_tokens_per_s"] / r["fraction_of_floor"] for r in rs],
                marker="_",
                s=400,
                c="k",
                label="floor",
            )
            ax.legend(fontsize=7)
        ax.set_title(w)
        ax.set_ylabel(label)
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
