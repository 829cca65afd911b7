"""Attention kernel benchmark: jaxturbo's Pallas kernels against cuDNN, XLA and JAX's shipped kernels.

One run measures every implementation on every case, baseline included, forward and
forward+backward, and decode attention's achieved bandwidth against an elementwise copy measured
in the same run.  It writes a JSON file, a Markdown table and a plot, and prints the table last.

  python -m experiments.attention.bench --preset tiny                 # CPU, interpret mode, seconds
  python -m experiments.attention.bench --preset h100 --no-configs    # one H100, ~9 minutes
  python -m experiments.attention.bench --preset h100 --only decode   # the decode tile sweep
  python -m experiments.attention.bench --preset full                 # T up to 16K, every batch

Files: OUT/<part>_<preset>.{json,md,png} with part grid (everything), attention or decode
(`--only`); OUT defaults to experiments/attention/results.

FLOPs: 4*B*H*T*S*D, halved for causal; forward+backward counted as 3.5x forward.  Each timing is
the median over `reps` windows of `inner` back-to-back calls (the dispatch queue hides host
overhead); compile and first run are excluded.  Memory per row (`fwd_MiB`, `fwd_bwd_MiB`): XLA's
buffer assignment for that row's compiled program (arguments + unaliased outputs + temporaries),
so each row's figure is its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_util import compiled_bytes, copy_bandwidth, time_fn
from pallas_kernels import api
from pallas_kernels.decode_attention import pallas_triton as decode_triton
from pallas_kernels.decode_attention.reference import decode_attention_reference
from pallas_kernels.flash_attention import pallas_triton as flash_triton

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    t: int
    h: int
    kh: int
    d: int
    causal: bool
    segments: int = 0  # > 0: that many packed documents of equal length per row
    window: int | None = None

    @property
    def name(self) -> str:
        s = f"B{self.b} T{self.t} H{self.h}/{self.kh} D{self.d} {'causal' if self.causal else 'full'}"
        if self.segments:
            s += f" seg{self.segments}"
        if self.window:
            s += f" win{self.window}"
        return s

    def flops(self) -> float:
        f = 4.0 * self.b * self.h * self.t * self.t * self.d
        if self.window:
            f *= min(1.0, (self.window + 1) / self.t)
        elif self.causal:
            f /= 2
        if self.segments:
            f /= self.segments
        return f


def presets(name: str):
    """(attention cases, implementations, decode (batch, context) grid, kv-head config)."""
    impls = [
        "pallas_triton",
        "mosaic_gpu",
        "mosaic_gpu_serial_pp",
        "mosaic_gpu_bwd",
        "mosaic_gpu_fused_bwd",
        "cudnn",
        "jax_pallas_mha",
        "jax_mgpu_fp16",
        "xla",
    ]
    if name == "tiny":
        cases = [
            Case(1, 64, 2, 1, 32, True),
            Case(1, 64, 2, 2, 32, False),
            Case(1, 64, 2, 1, 32, True, segments=2),
        ]
        return (
            [(c, ["pallas_triton", "xla"]) for c in cases],
            [(1, 128), (2, 256)],
            dict(h=4, kh=2, d=32),
        )
    big = []
    ts = (4096, 8192) if name == "h100" else (2048, 4096, 8192, 16384)
    for t in ts:
        for causal in (True, False):
            if name == "h100" and t > 4096 and not causal:
                continue  # fit the lease: one long case is enough to see the trend
            big.append(Case(4, t, 32, 32, 128, causal))
    # Extra cases (GQA, packed documents, sliding window) against cuDNN only.
    extra = [
        Case(4, 4096, 32, 8, 128, True),
        Case(4, 4096, 32, 32, 128, True, segments=4),
        Case(4, 4096, 32, 32, 128, True, window=1024),
    ]
    # (the Mosaic GPU kernel takes the GQA case; it has no segment ids or window)
    big = [(c, impls) for c in big] + [
        (
            c,
            ["pallas_triton", "cudnn"]
            + (["mosaic_gpu", "mosaic_gpu_bwd", "mosaic_gpu_fused_bwd"] if c.kh != c.h else []),
        )
        for c in extra
    ]
    if name == "h100":
        dec = [(1, 8192), (16, 1024), (16, 8192), (16, 32768), (64, 8192)]
    else:
        dec = [(b, s) for b in (1, 4, 16, 64) for s in (1024, 8192, 32768)]
    return big, dec, dict(h=32, kh=8, d=128)


def compile_and_time(fn, args, reps: int, inner: int):
    """(median seconds per call, the compiled program's bytes, its first output) of
    jit(fn)(*args), compiled once; compile and first call are excluded from the time."""
    compiled = jax.jit(fn).lower(*args).compile()
    first = jax.block_until_ready(compiled(*args))
    t = time_fn(lambda: compiled(*args), repeats=reps, warmup=0, inner=inner)
    return t, compiled_bytes(compiled), first


def make_inputs(c: Case, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (c.b, c.t, c.h, c.d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (c.b, c.t, c.kh, c.d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (c.b, c.t, c.kh, c.d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (c.b, c.t, c.h, c.d), jnp.float32).astype(dtype)
    seg = None
    if c.segments:
        seg = jnp.broadcast_to(jnp.arange(c.t) // (c.t // c.segments), (c.b, c.t)).astype(jnp.int32)
    return q, k, v, do, seg


def attention_fn(impl: str, c: Case, seg, interpret: bool, config=None):
    """A function (q, k, v) -> out for one implementation, or a string saying why none."""
    kw = dict(causal=c.causal, segment_ids=seg, sliding_window=c.window)
    if impl == "pallas_triton":
        return lambda q, k, v: api.attention(
            q, k, v, implementation="pallas_triton", config=config, interpret=interpret, **kw
        )
    if impl == "xla":
        if c.t > 4096:
            return "skipped: materialises B*H*T*T float32 logits"
        return lambda q, k, v: api.attention(q, k, v, implementation="xla", **kw)
    if jax.devices()[0].platform != "gpu":
        return "needs a GPU"
    if impl == "cudnn":
        return lambda q, k, v: api.attention(q, k, v, implementation="cudnn", **kw)
    if impl.startswith("mosaic_gpu"):  # default; serial + ping-pong; our Mosaic backwards
        if c.segments or c.window:
            return "no segment ids / sliding window yet"
        from pallas_kernels.flash_attention import mosaic_gpu

        cfg = {
            "mosaic_gpu": mosaic_gpu.Config(),
            "mosaic_gpu_serial_pp": mosaic_gpu.Config(overlap=False, pingpong=True),
            "mosaic_gpu_bwd": mosaic_gpu.Config(backward="mosaic_gpu"),
            "mosaic_gpu_fused_bwd": mosaic_gpu.Config(backward="mosaic_gpu_fused"),
        }[impl]
        return lambda q, k, v: api.attention(q, k, v, implementation="mosaic_gpu", config=cfg, **kw)
    if impl == "jax_pallas_mha":
        if c.kh != c.h or c.window:
            return "no GQA / sliding window"
        from jax.experimental.pallas.ops.gpu import attention as jax_attention

        return lambda q, k, v: jax_attention.mha(q, k, v, seg, sm_scale=c.d**-0.5, causal=c.causal)
    if impl == "jax_mgpu_fp16":
        if c.segments or c.window:
            return "no segment ids / sliding window"
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        cfg = attention_mgpu.TuningConfig(
            block_q=64,
            block_kv=128,
            max_concurrent_steps=2,
            causal=c.causal,
            block_q_dkv=64,
            block_kv_dkv=64,
            block_q_dq=64,
            block_kv_dq=64,
        )
        # This kernel applies no softmax scale: fold 1/sqrt(D) into q (one cheap elementwise op).
        return lambda q, k, v: attention_mgpu.attention(
            (q * c.d**-0.5).astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16), cfg
        )
    raise ValueError(impl)


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def bench_attention(cases, dtype, reps, inner, interpret, log):
    rows = []
    for c, impls in cases:
        q, k, v, do, seg = make_inputs(c, dtype)
        outs = {}
        for impl in impls:
            row = dict(case=c.name, impl=impl, **dataclasses.asdict(c))
            fn = attention_fn(impl, c, seg, interpret)
            if isinstance(fn, str):
                row["note"] = fn
                rows.append(row)
                continue
            try:
                t_f, mem_f, out = compile_and_time(fn, (q, k, v), reps, inner)
                outs[impl] = np.asarray(out.astype(jnp.float32))
                row.update(
                    fwd_ms=t_f * 1e3,
                    fwd_tflops=c.flops() / t_f / 1e12,
                    fwd_MiB=None if mem_f is None else mem_f / 2**20,
                )

                def fwd_bwd(q, k, v, do, fn=fn):
                    out, vjp = jax.vjp(fn, q, k, v)
                    return vjp(do.astype(out.dtype))

                t_fb, mem_fb, _ = compile_and_time(fwd_bwd, (q, k, v, do), reps, inner)
                row.update(
                    fwd_bwd_ms=t_fb * 1e3,
                    fwd_bwd_tflops=3.5 * c.flops() / t_fb / 1e12,
                    fwd_bwd_MiB=None if mem_fb is None else mem_fb / 2**20,
                )
            except Exception as e:  # one failing baseline must not end the run
                row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                log(traceback.format_exc(limit=3))
            rows.append(row)
            log(
                f"{c.name:40s} {impl:16s} {row.get('fwd_tflops', float('nan')):8.1f} "
                f"{row.get('fwd_bwd_tflops', float('nan')):8.1f} {row.get('note', '')}"
            )
        ref = "cudnn" if "cudnn" in outs else "xla"
        for row in rows:
            if row["case"] == c.name and row["impl"] in outs and ref in outs:
                row[f"rel_err_vs_{ref}"] = rel_err(outs[row["impl"]], outs[ref])
    return rows


def bench_configs(case, configs, dtype, reps, inner, interpret, log):
    """Our forward kernel over a few tile configurations on one case."""
    q, k, v, _, seg = make_inputs(case, dtype)
    rows = []
    for cfg in configs:
        try:
            t, _, _ = compile_and_time(
                attention_fn("pallas_triton", case, seg, interpret, config=cfg),
                (q, k, v),
                reps,
                inner,
            )
            rows.append(
                dict(
                    case=case.name,
                    config=dataclasses.asdict(cfg),
                    fwd_ms=t * 1e3,
                    fwd_tflops=case.flops() / t / 1e12,
                )
            )
        except Exception as e:
            rows.append(
                dict(
                    case=case.name,
                    config=dataclasses.asdict(cfg),
                    note=f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}",
                )
            )
        log(f"config {rows[-1]}")
    return rows


def bench_decode(grid, heads, dtype, reps, inner, interpret, copy_bw, log, configs=()):
    """Decode over (batch, context); `configs` adds extra Pallas-Triton tile configurations."""
    rows = []
    h, kh, d = heads["h"], heads["kh"], heads["d"]
    on_gpu = jax.devices()[0].platform == "gpu"
    for b, s in grid:
        ks = jax.random.split(jax.random.PRNGKey(b * 7 + s), 3)
        q = jax.random.normal(ks[0], (b, h, d), jnp.float32).astype(dtype)
        kc = jax.random.normal(ks[1], (b, s, kh, d), jnp.float32).astype(dtype)
        vc = jax.random.normal(ks[2], (b, s, kh, d), jnp.float32).astype(dtype)
        lengths = jnp.full((b,), s, jnp.int32)
        cache_bytes = 2 * kc.nbytes
        fns = {
            "pallas_triton": lambda q, k, v, n: api.decode_attention(
                q, k, v, n, implementation="pallas_triton", interpret=interpret
            ),
            "xla": lambda q, k, v, n: decode_attention_reference(q, k, v, n),
        }
        for name, cfg in configs:
            fns[f"pallas_triton {name}"] = functools.partial(
                lambda q, k, v, n, cfg: api.decode_attention(
                    q, k, v, n, implementation="pallas_triton", config=cfg, interpret=interpret
                ),
                cfg=cfg,
            )
        if on_gpu:
            from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode

            fns["jax_pallas_gqa"] = lambda q, k, v, n: jax_decode.gqa(q, k, v, kv_seq_len=n)
        ref = None
        for impl, fn in fns.items():
            row = dict(
                batch=b,
                context=s,
                impl=impl,
                kv_bytes=cache_bytes,
                kv_bytes_per_token=2 * kh * d * jnp.dtype(dtype).itemsize,
            )
            try:
                t, _, out = compile_and_time(fn, (q, kc, vc, lengths), reps, inner)
                out = np.asarray(out.astype(jnp.float32))
                if impl == "xla":
                    ref = out
                row.update(
                    us=t * 1e6,
                    gbps=cache_bytes / t / 1e9,
                    frac_of_copy=(cache_bytes / t) / copy_bw if copy_bw else None,
                )
                row["_out"] = out
            except Exception as e:
                row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
        for row in rows[-len(fns) :]:
            out = row.pop("_out", None)
            if out is not None and ref is not None:
                row["rel_err_vs_xla"] = rel_err(out, ref)
            log(
                f"decode B{b} S{s} {row['impl']:16s} {row.get('gbps', float('nan')):8.1f} GB/s "
                f"{row.get('note', '')}"
            )
    return rows


def markdown(result) -> str:
    lines = [
        f"Device: {result['device']}  (jax {result['jax']}, dtype {result['dtype']})",
        "",
        "| case | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd MiB "
        "| rel err | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    f = lambda x, p=2: "" if x is None else f"{x:.{p}f}"
    for r in result["attention"]:
        err = next((v for k, v in r.items() if k.startswith("rel_err")), None)
        lines.append(
            f"| {r['case']} | {r['impl']} | {f(r.get('fwd_ms'), 3)} | "
            f"{f(r.get('fwd_tflops'), 1)} | {f(r.get('fwd_bwd_ms'), 3)} | "
            f"{f(r.get('fwd_bwd_tflops'), 1)} | {f(r.get('fwd_bwd_MiB'), 0)} | "
            f"{'' if err is None else f'{err:.1e}'} | {r.get('note', '')} |"
        )
    if result.get("configs"):
        lines += ["", "| config sweep (ours, fwd) | TFLOP/s | note |", "| --- | --- | --- |"]
        for r in result["configs"]:
            lines.append(
                f"| {r['case']} {r['config']} | {f(r.get('fwd_tflops'), 1)} | {r.get('note', '')} |"
            )
    lines += [
        "",
        f"Copy bandwidth (elementwise, read+write): {result['copy_gbps']:.0f} GB/s",
        "",
        "| batch | context | impl | us | GB/s | of copy | rel err | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["decode"]:
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['impl']} | {f(r.get('us'), 1)} | "
            f"{f(r.get('gbps'), 0)} | {f(r.get('frac_of_copy'), 2)} | "
            f"{'' if r.get('rel_err_vs_xla') is None else f'{r["rel_err_vs_xla"]:.1e}'} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["attention"] if r.get("fwd_tflops")]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(cases)), 4.5), sharey=True)
    width = 0.8 / max(1, len(impls))
    for ax, key, title in zip(axes, ("fwd_tflops", "fwd_bwd_tflops"), ("forward", "fwd+bwd")):
        for i, impl in enumerate(impls):
            ys = [
                next((r.get(key) or 0 for r in rows if r["case"] == c and r["impl"] == impl), 0)
                for c in cases
            ]
            ax.bar(np.arange(len(cases)) + i * width, ys, width, label=impl)
        ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2)
        ax.set_xticklabels(cases, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{title} ({result['device']})")
        ax.set_ylabel("TFLOP/s")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m experiments.attention.bench", description=__doc__.splitlines()[0]
    )
    p.add_argument("--preset", choices=["tiny", "h100", "full"], default="tiny")
    p.add_argument(
        "--out",
        default=RESULTS,
        help="directory for <part>_<preset>.{json,md,png} (default experiments/attention/results)",
    )
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--no-configs", action="store_true")
    p.add_argument("--only", choices=["all", "attention", "decode"], default="all")
    p.add_argument(
        "--impls",
        default=None,
        help="comma-separated implementations to keep (e.g. mosaic_gpu,cudnn)",
    )
    p.add_argument(
        "--cases",
        default=None,
        help="comma-separated indices into the preset's attention cases (e.g. 0)",
    )
    args = p.parse_args(argv)
    on_gpu = jax.devices()[0].platform == "gpu"
    tiny = args.preset == "tiny"
    interpret = not on_gpu
    dtype = jnp.float32 if tiny else jnp.bfloat16
    reps = args.reps or (2 if tiny else 4)
    inner = 1 if tiny else 3
    cases, dec_grid, heads = presets(args.preset)
    if args.cases:
        picked = [int(i) for i in args.cases.split(",")]
        bad = [i for i in picked if not 0 <= i < len(cases)]
        if bad:
            p.error(f"--cases {bad}: the {args.preset} preset has cases 0..{len(cases) - 1}")
        cases = [cases[i] for i in picked]
    if args.impls:
        keep = args.impls.split(",")
        known = {i for _, impls in presets("h100")[0] for i in impls}
        if set(keep) - known:
            p.error(f"--impls {sorted(set(keep) - known)}: choose from {sorted(known)}")
        cases = [(c, [i for i in impls if i in keep]) for c, impls in cases]
    log = lambda s: print(s, flush=True)
    device = jax.devices()[0].device_kind
    log(f"device {device}, preset {args.preset}")
    result = dict(
        device=device,
        jax=jax.__version__,
        dtype=jnp.dtype(dtype).name,
        preset=args.preset,
        host=platform.node(),
        time=time.strftime("%Y-%m-%d %H:%M"),
    )
    result["attention"] = []
    if args.only != "decode":
        result["attention"] = bench_attention(cases, dtype, reps, inner, interpret, log)
    result["configs"] = []
    if on_gpu and not args.no_configs and args.only != "decode":
        C = flash_triton.Config
        result["configs"] = bench_configs(
            cases[0][0],
            [
                C(128, 64, num_warps=8, num_stages=3),
                C(128, 128, num_warps=8, num_stages=2),
                C(64, 64, num_warps=4, num_stages=3),
            ],
            dtype,
            reps,
            inner,
            interpret,
            log,
        )
    result["copy_gbps"] = copy_bandwidth((2 << 30) if on_gpu else (8 << 20)) / 1e9
    dec_cfgs = []
    if on_gpu and not args.no_configs:
        D = decode_triton.Config
        # around the default (block 128, 4 warps, 3 stages, ~512 programs)
        dec_cfgs = [
            ("splits8", D(num_splits=8)),
            ("splits16", D(num_splits=16)),
            ("bk64 w4", D(block_k=64)),
            ("bk64 w8 s4", D(block_k=64, num_warps=8, num_stages=4)),
            ("bk128 w8", D(num_warps=8)),
            ("bk128 s4", D(num_stages=4)),
            ("bk256 w8", D(block_k=256, num_warps=8)),
            # the chunks merged by XLA's two kernels or by the Pallas merge kernel
            ("jnp merge", D(merge="xla")),
            ("merge kernel", D(merge="kernel")),
        ]
    result["decode"] = []
    if args.only != "attention":
        result["decode"] = bench_decode(
            dec_grid, heads, dtype, reps, inner, interpret, result["copy_gbps"] * 1e9, log, dec_cfgs
        )
    os.makedirs(args.out, exist_ok=True)
    part = "grid" if args.only == "all" else args.only
    stem = os.path.join(args.out, f"{part}_{args.preset}")
    with open(stem + ".json", "w") as fh:
        json.dump(result, fh, indent=1, default=float)
    table = markdown(result)
    with open(stem + ".md", "w") as fh:
        fh.write(table + "\n")
    try:
        if result["attention"]:
            plot(result, stem + ".png")
    except Exception as e:  # the table matters more than the picture
        log(f"plot failed: {e}")
    print(table)


if __name__ == "__main__":
    main()
