"""Grouped GEMM for mixture-of-experts: our Pallas-Triton `gmm` against `jax.lax.ragged_dot`
and the dense bf16 matmul of the same FLOPs, measured in the same run.

Shapes of one Qwen3-30B-A3B MoE layer (hidden 2048, 128 experts, top-8, expert width 768):
gate/up [E, 2048, 2*768] and down [E, 768, 2048], 16,384 tokens routed by a top-8 softmax
router over random logits (131,072 rows, sorted by expert).  For each GEMM: forward and
forward+backward (d lhs and d rhs) TFLOP/s of ours, of ragged_dot, and of the dense
[M, K] @ [K, N] matmul with the same FLOPs (the rate our kernel is judged against); medians of
`--reps` timed windows.  Every kernel output is checked against ragged_dot's first.
`--sweep` first times a few tile configs of gmm (forward) and of tgmm (the weight gradient) per
GEMM and uses the fastest of each for the headline rows.  `--decode-tokens` adds decode-sized
calls (a few tokens): gmv, gmm and ragged_dot, with the bytes of the routed experts' weights
per second.

  python -m experiments.moe.gmm_bench --preset cpu --out /tmp/gmm     # CPU smoke, interpret
  python -m experiments.moe.gmm_bench --preset qwen3-30b-a3b --sweep   # one GPU, a few minutes

Writes OUT/gmm_bench.{json,md} (OUT a directory, default experiments/moe/results).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_util import device_name, time_fn, write_table
from jaxturbo.models.shapes import shape
from pallas_kernels.grouped_matmul import gmm, gmv
from pallas_kernels.grouped_matmul import pallas_triton as gmm_triton

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Preset:
    tokens: int
    hidden: int
    experts: int
    top_k: int
    width: int
    dtype: str
    decode_tokens: tuple[int, ...]


def _from_shape(name: str, tokens: int, decode_tokens: tuple[int, ...]) -> Preset:
    """A preset with the MoE widths of a shape-table model (`jaxturbo.models.shapes`)."""
    cfg = shape(name)
    return Preset(
        tokens,
        cfg.hidden_size,
        cfg.moe.num_experts,
        cfg.moe.num_experts_per_tok,
        cfg.moe.moe_intermediate_size,
        "bfloat16",
        decode_tokens,
    )


PRESETS = {
    "qwen3-30b-a3b": _from_shape("qwen3-30b-a3b", 16384, (1, 16, 64)),
    "cpu": Preset(24, 64, 8, 2, 32, "bfloat16", (2,)),  # interpret mode: seconds
}
C = gmm_triton.Config
SWEEP_GMM = [
    C(128, 128, 64, 8, 3),
    C(128, 128, 64, 8, 4),
    C(128, 256, 64, 8, 3),
    C(256, 128, 64, 8, 3),
    C(128, 128, 128, 8, 3),
    C(128, 128, 64, 4, 4),
    C(64, 128, 64, 4, 4),
    C(128, 64, 64, 4, 4),
    C(128, 256, 64, 8, 4),
    C(256, 128, 64, 8, 4),
    C(64, 256, 64, 8, 4),
    C(128, 128, 32, 4, 5),
]
SWEEP_TGMM = [
    C(64, 128, 128, 8, 3),
    C(64, 128, 128, 8, 4),
    C(32, 128, 128, 4, 4),
    C(128, 128, 128, 8, 3),
    C(64, 256, 128, 8, 3),
    C(64, 128, 64, 4, 4),
]
CPU_CONFIG = C(16, 32, 32, 4, 2)


def routed_group_sizes(key, tokens: int, experts: int, top_k: int) -> np.ndarray:
    """Rows per expert from a top-k softmax router over random logits (dropless)."""
    logits = jax.random.normal(key, (tokens, experts), jnp.float32)
    _, ids = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)
    return np.bincount(np.asarray(ids).reshape(-1), minlength=experts).astype(np.int32)


def _label(cfg: gmm_triton.Config) -> str:
    return f"m{cfg.block_m} n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"


def _fwd_bwd(fn, compiler_options: dict | None = None):
    """jit of (a, b, ct) -> (out, d a, d b): one forward and its backward."""

    def run(a, b, ct):
        out, vjp = jax.vjp(fn, a, b)
        return (out, *vjp(ct))

    return jax.jit(run, compiler_options=compiler_options or None)


def _ragged_dot(gs, transpose_rhs: bool):
    """jax.lax.ragged_dot (through ragged_dot_general for weights stored [E, N, K])."""
    dims = jax.lax.RaggedDotDimensionNumbers(
        (((1,), (2 if transpose_rhs else 1,)), ((), ())), [0], [0]
    )
    return lambda x, y: jax.lax.ragged_dot_general(x, y, gs, dims)


# XLA options tried, in order, when ragged_dot's forward+backward does not compile with the
# defaults (on an H200 its autotuner found no working config for the weight gradient's fusions)
RAGGED_FALLBACK_OPTIONS = (
    {},
    {"xla_gpu_autotune_level": 0},
    {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False},
)


def _ragged_fwd_bwd(fn, args):
    """(jitted fwd+bwd of ragged_dot, its row label, its outputs) under the first of
    RAGGED_FALLBACK_OPTIONS that compiles and runs; outputs None if none does.  Out of memory
    ends the search: XLA's ragged_dot gradient on GPU materialises [groups, rows, K] masked
    operands, which no compiler option shrinks."""
    for opts in RAGGED_FALLBACK_OPTIONS:
        label = "ragged_dot" + (
            " (" + ", ".join(f"{k}={v}" for k, v in opts.items()) + ")" if opts else ""
        )
        jitted = _fwd_bwd(fn, opts)
        want, err = _outputs(jitted, args)
        if want is not None:
            return jitted, label, want
        if "RESOURCE_EXHAUSTED" in err:
            break
    return _fwd_bwd(fn), "ragged_dot", None  # timed anyway: its row records the error


def _outputs(fn, args) -> tuple[tuple | None, str]:
    """(fn(*args) as float32 numpy arrays, "") or (None, the error's first line) if it fails
    (e.g. out of memory)."""
    try:
        out = fn(*args)
        got = tuple(np.asarray(o, np.float32) for o in (out if isinstance(out, tuple) else (out,)))
    except Exception as e:  # the reference cannot run: kernel rows go unchecked
        err = str(e).splitlines()[0][:100]
        print(f"# reference failed: {err}", flush=True)
        return None, err
    return got, ""


def _rel_err(got, want: tuple) -> float:
    """Max over outputs of max |got - want| / max |want|."""
    got = got if isinstance(got, tuple) else (got,)
    errs = []
    for g, w in zip(got, want):
        g = np.asarray(g, np.float32)
        errs.append(float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-30)))
    return max(errs)


class Bench:
    def __init__(self, reps: int, inner: int):
        self.reps, self.inner, self.rows = reps, inner, []

    def time(self, fn, *args) -> float:
        return time_fn(lambda: fn(*args), repeats=self.reps, inner=self.inner)

    def record(
        self, base: dict, impl: str, fn, args, flops: float, want=None, extra: dict | None = None
    ) -> dict:
        """Time fn(*args) (checking its first output against `want`); a failure is a row."""
        row = dict(base, impl=impl, **(extra or {}))
        try:
            out = fn(*args)
            if want is not None:
                row["max_rel_err"] = _rel_err(out, want)
            t = self.time(fn, *args)
        except Exception as e:  # an uncompilable config or an OOM is a row, not a crash
            row["error"] = str(e).splitlines()[0][:100]
            self.rows.append(row)
            print(f"# {base} {impl}: {row['error']}", flush=True)
            return row
        row.update(ms=t * 1e3, tflops=flops / t / 1e12)
        self.rows.append(row)
        print(
            f"# {base['gemm']} {base['pass']} {impl}: {row['ms']:.3f} ms, "
            f"{row['tflops']:.1f} TFLOP/s",
            flush=True,
        )
        return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.moe.gmm_bench", description=__doc__.splitlines()[0]
    )
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--tokens", type=int, help="override the preset's token count")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--inner", type=int, default=3, help="back-to-back calls per timed window")
    p.add_argument("--sweep", action="store_true", help="time the tile configs first")
    p.add_argument(
        "--transpose-rhs",
        action="store_true",
        help="weights stored [E, N, K] (HF's [experts, out, in])",
    )
    p.add_argument("--skip-ragged", action="store_true", help="leave out jax.lax.ragged_dot")
    p.add_argument("--gemms", default="gate_up,down", help="which of gate_up, down to run")
    p.add_argument("--decode-tokens", help="comma list (default: the preset's; 0 = none)")
    p.add_argument(
        "--out",
        default=str(RESULTS),
        help="directory for gmm_bench.{json,md} (default experiments/moe/results)",
    )
    a = p.parse_args(argv)
    pre = PRESETS[a.preset]
    on_gpu = jax.devices()[0].platform == "gpu"
    dtype = jnp.dtype(pre.dtype)
    tokens = a.tokens or pre.tokens
    sizes = routed_group_sizes(jax.random.PRNGKey(0), tokens, pre.experts, pre.top_k)
    m = int(sizes.sum())
    gs = jnp.asarray(sizes)
    shapes = {"gate_up": (pre.hidden, 2 * pre.width), "down": (pre.width, pre.hidden)}
    if set(a.gemms.split(",")) - set(shapes):
        p.error(f"--gemms {a.gemms!r}: choose from {', '.join(shapes)}")
    gemms = {g: shapes[g] for g in a.gemms.split(",")}
    cpu_cfg = None if on_gpu else CPU_CONFIG  # interpret mode: small tiles, fewer programs
    bench = Bench(a.reps, a.inner)
    summary = {}
    for name, (k, n) in gemms.items():
        ks = jax.random.split(jax.random.PRNGKey(k * n), 4)
        lhs = jax.random.normal(ks[0], (m, k), jnp.float32).astype(dtype)
        w = (jax.random.normal(ks[1], (pre.experts, k, n), jnp.float32) * k**-0.5).astype(dtype)
        rhs = jnp.swapaxes(w, 1, 2) if a.transpose_rhs else w
        ct = jax.random.normal(ks[2], (m, n), jnp.float32).astype(dtype)
        dense_b = w[0]
        flops = 2.0 * m * k * n
        ragged = _ragged_dot(gs, a.transpose_rhs)
        base = dict(gemm=name, m=m, k=k, n=n)
        # ragged_dot's outputs are the check for every kernel row (None if it cannot run)
        want, _ = _outputs(jax.jit(ragged), (lhs, rhs))
        ragged_fb, ragged_fb_impl, want_fb = (
            (None, "ragged_dot", None) if a.skip_ragged else _ragged_fwd_bwd(ragged, (lhs, rhs, ct))
        )
        ours = lambda cfg, tcfg: (
            lambda x, y: gmm(
                x,
                y,
                gs,
                implementation="pallas_triton",
                transpose_rhs=a.transpose_rhs,
                config=cfg,
                tgmm_config=tcfg,
            )
        )
        cfg, tcfg = cpu_cfg, cpu_cfg
        if a.sweep:
            cfg, tcfg = _sweep(
                bench, base, ours, lhs, rhs, ct, gs, flops, want, a.transpose_rhs, on_gpu
            )
        tag = dict(
            config=_label(cfg) if cfg else "default",
            tgmm_config=_label(tcfg) if tcfg else "default",
        )
        fwd, fb = {}, {}
        for key, impl, fn, b in (
            ("ours", "ours (pallas_triton)", ours(cfg, tcfg), rhs),
            ("dense", "dense matmul", jnp.dot, dense_b),
            ("ragged", "ragged_dot", ragged, rhs),
        ):
            if key == "ragged" and a.skip_ragged:
                continue
            mine = key == "ours"
            fwd[key] = bench.record(
                dict(base, **{"pass": "fwd"}),
                impl,
                jax.jit(fn),
                (lhs, b),
                flops,
                want if mine else None,
                tag if mine else None,
            )
            fb[key] = bench.record(
                dict(base, **{"pass": "fwd+bwd"}),
                ragged_fb_impl if key == "ragged" else impl,
                ragged_fb if key == "ragged" else _fwd_bwd(fn),
                (lhs, b, ct),
                3 * flops,
                want_fb if mine else None,
                tag if mine else None,
            )
        for pas, res in (("fwd", fwd), ("fwd+bwd", fb)):
            rate = {k_: r.get("tflops") for k_, r in res.items()}
            if rate.get("ours") and rate.get("dense"):
                summary[f"{name} {pas} ours/dense"] = round(rate["ours"] / rate["dense"], 3)
            if rate.get("ours") and rate.get("ragged"):
                summary[f"{name} {pas} ours/ragged_dot"] = round(rate["ours"] / rate["ragged"], 2)
    decode = (
        [int(t) for t in a.decode_tokens.split(",") if int(t) > 0]
        if a.decode_tokens is not None
        else list(pre.decode_tokens)
    )
    for t in decode:
        _decode_rows(bench, pre, t, dtype, a.transpose_rhs, cpu_cfg)
    targets = {}
    for name in gemms:
        f, b = summary.get(f"{name} fwd ours/dense"), summary.get(f"{name} fwd+bwd ours/dense")
        targets[name] = dict(
            fwd_vs_dense_ge_0_60=f is not None and f >= 0.60,
            fwd_bwd_vs_dense_ge_0_50=b is not None and b >= 0.50,
            vs_ragged_ge_3x=all(
                summary.get(f"{name} {x} ours/ragged_dot", 0) >= 3 for x in ("fwd", "fwd+bwd")
            ),
        )
    cols = [
        "gemm",
        "pass",
        "m",
        "k",
        "n",
        "impl",
        "config",
        "tgmm_config",
        "ms",
        "tflops",
        "gb_per_s",
        "max_rel_err",
        "error",
    ]
    meta = dict(
        device=device_name(),
        jax=jax.__version__,
        preset=a.preset,
        tokens=tokens,
        experts=pre.experts,
        top_k=pre.top_k,
        rows=m,
        dtype=pre.dtype,
        transpose_rhs=a.transpose_rhs,
        reps=a.reps,
        inner=a.inner,
        group_sizes_min_max=[int(sizes.min()), int(sizes.max())],
        ratios=summary,
        targets=targets,
    )
    md = write_table(
        bench.rows,
        cols,
        Path(a.out) / "gmm_bench",
        f"MoE grouped GEMM on {device_name()}",
        meta=meta,
    )
    print(md)
    bad = [r for r in bench.rows if r.get("max_rel_err", 0.0) > 2e-2]
    if bad:
        print(f"{len(bad)} kernel rows differ from ragged_dot's output", file=sys.stderr)
        return 1
    return 0


def _sweep(
    bench: Bench,
    base: dict,
    ours,
    lhs,
    rhs,
    ct,
    gs,
    flops: float,
    want,
    transpose_rhs: bool,
    on_gpu: bool,
):
    """Time each gmm config (forward) and each tgmm config (the weight gradient) of one GEMM;
    returns the fastest correct (gmm, tgmm) configs."""
    best = []
    tg_args = (ct, lhs) if transpose_rhs else (lhs, ct)
    dims = jax.lax.RaggedDotDimensionNumbers((((0,), (0,)), ((), ())), [0], [])
    want_t, _ = _outputs(
        jax.jit(
            lambda x, y: jax.lax.ragged_dot_general(
                x, y, gs, dims, preferred_element_type=jnp.float32
            )
        ),
        tg_args,
    )
    for what, configs, make, args, want_ in (
        (
            "gmm",
            SWEEP_GMM if on_gpu else [CPU_CONFIG, C(32, 32, 16, 4, 2)],
            lambda c: jax.jit(ours(c, None)),
            (lhs, rhs),
            want,
        ),
        (
            "tgmm",
            SWEEP_TGMM if on_gpu else [CPU_CONFIG, C(16, 16, 32, 4, 2)],
            lambda c: jax.jit(
                lambda x, y: gmm_triton.tgmm(x, y, gs, config=c, interpret=not on_gpu)
            ),
            tg_args,
            want_t,
        ),
    ):
        rows = [
            (
                c,
                bench.record(
                    dict(base, **{"pass": f"{what} sweep"}),
                    f"{what} {_label(c)}",
                    make(c),
                    args,
                    flops,
                    want_,
                    dict(config=_label(c)),
                ),
            )
            for c in configs
        ]
        ok = [
            (r["tflops"], c) for c, r in rows if "tflops" in r and r.get("max_rel_err", 0.0) <= 2e-2
        ]
        best.append(max(ok, key=lambda t: t[0])[1] if ok else None)
    return best[0], best[1]


def _decode_rows(bench: Bench, pre: Preset, tokens: int, dtype, transpose_rhs: bool, cfg) -> None:
    """A few tokens through the gate/up weights: gmv (no sort), gmm (sorted) and ragged_dot;
    the rate is the routed experts' weight bytes per second (what decode is bound by)."""
    k, n = pre.hidden, 2 * pre.width
    ks = jax.random.split(jax.random.PRNGKey(tokens), 3)
    logits = jax.random.normal(ks[0], (tokens, pre.experts), jnp.float32)
    ids = jax.lax.top_k(logits, pre.top_k)[1].reshape(-1).astype(jnp.int32)
    x = jax.random.normal(ks[1], (ids.shape[0], k), jnp.float32).astype(dtype)
    w = (jax.random.normal(ks[2], (pre.experts, k, n), jnp.float32) * k**-0.5).astype(dtype)
    rhs = jnp.swapaxes(w, 1, 2) if transpose_rhs else w
    order = jnp.argsort(ids)
    sizes = jnp.bincount(ids, length=pre.experts).astype(jnp.int32)
    xs = x[order]
    routed = int(np.unique(np.asarray(ids)).size)
    nbytes = routed * k * n * jnp.dtype(dtype).itemsize
    base = {"gemm": f"decode {tokens} tok", "pass": "fwd", "m": int(ids.shape[0]), "k": k, "n": n}
    want = np.asarray(jax.lax.ragged_dot(xs, w, sizes), np.float32)  # rows sorted by expert
    flops = 2.0 * ids.shape[0] * k * n

    def add(impl, fn, args, want_):
        r = bench.record(base, impl, fn, args, flops, (want_,))
        if "ms" in r:
            r["gb_per_s"] = nbytes / (r["ms"] / 1e3) / 1e9

    add(
        "gmv (pallas_triton)",
        jax.jit(
            lambda x_, w_: gmv(
                x_, w_, ids, implementation="pallas_triton", transpose_rhs=transpose_rhs
            )
        ),
        (x, rhs),
        np.asarray(want)[np.argsort(np.asarray(order))],
    )
    add(
        "gmm (pallas_triton, sorted)",
        jax.jit(
            lambda x_, w_: gmm(
                x_,
                w_,
                sizes,
                implementation="pallas_triton",
                transpose_rhs=transpose_rhs,
                config=cfg,
            )
        ),
        (xs, rhs),
        want,
    )
    add(
        "ragged_dot (sorted)",
        jax.jit(lambda x_, w_: jax.lax.ragged_dot(x_, w_, sizes)),
        (xs, w),
        want,
    )


if __name__ == "__main__":
    raise SystemExit(main())
