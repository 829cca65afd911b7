"""Ragged paged attention (`pallas_kernels.ragged_paged_attention`) against the contiguous
kernels it replaces in the inference engine, in one run.

(a) decode: batch B of one new token over C cached tokens (GQA 32/8, head_dim 128, bf16 on
    GPU), the paged kernel (shuffled page tables, page sizes 16 and 64, a few tile configs)
    against the contiguous-cache decode kernel (`pallas_kernels.decode_attention`, Pallas-
    Triton) and XLA; reported as microseconds and as the fraction of the copy bandwidth
    measured in the same run (K/V bytes read / time / copy bandwidth).
(b) mixed step: prefill chunks (the last `chunk` tokens of `context`-token prompts) and
    decode tokens at `context` in one ragged call, against the flash attention kernel on the
    chunks plus the decode kernel on the decode tokens (two calls, as a contiguous-cache
    engine would run them).

Every output is checked against a baseline's before it is timed (rel_err).  Times: `us` is
GPU kernel time per call from a profiler trace (what an engine step running under CUDA
graphs would see; empty off GPU), `wall_us` the median over `reps` windows of `inner`
back-to-back calls of the wall time per call (host dispatch included).

  python -m experiments.engine.rpa_bench --preset cpu    # interpret mode, seconds
  python -m experiments.engine.rpa_bench --preset gpu    # one GPU, a few minutes

Writes OUT.{json,md} (OUT a path stem, default experiments/engine/results/rpa_<preset>).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_util import copy_bandwidth, device_name, time_fn, trace_kernels, write_table
from jaxturbo.models.shapes import shape
from pallas_kernels import api
from pallas_kernels.decode_attention.reference import decode_attention_reference
from pallas_kernels.ragged_paged_attention import pallas_triton as rpa_triton
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference

RESULTS = Path(__file__).resolve().parent / "results"
_8B = shape("llama3-8b")  # the GPU preset's attention: its heads, KV heads and head_dim

C = rpa_triton.Config
PRESETS = {
    "cpu": dict(
        heads=(4, 2, 16),
        dtype="float32",
        decode=[(1, 256)],
        page_sizes=(16,),
        decode_configs=[],
        mixed=[dict(chunks=1, chunk=16, decodes=2, context=64)],
        mixed_configs=[],
        reps=1,
        inner=1,
        copy_bytes=1 << 22,
        xla_mixed=True,
    ),
    "gpu": dict(
        heads=(_8B.num_attention_heads, _8B.num_key_value_heads, _8B.head_dim),
        dtype="bfloat16",
        decode=[(1, 8192), (16, 8192)],
        page_sizes=(16, 64),
        decode_configs=[
            ("bk64", C(block_k=64)),
            ("bk128 stages3", C(block_k=128, num_stages=3)),
            ("splits16", C(num_splits=16)),
            ("splits32", C(num_splits=32)),
            ("merge xla", C(merge="xla")),
            ("warps2", C(num_warps=2)),
        ],
        mixed=[dict(chunks=4, chunk=512, decodes=60, context=2048)],
        mixed_configs=[
            ("rows128", C(block_rows=128)),
            ("rows32", C(block_rows=32)),
            ("rows128 bk32", C(block_rows=128, block_k=32)),
            ("rows128 stages3", C(block_rows=128, num_stages=3)),
        ],
        reps=7,
        inner=20,
        copy_bytes=1 << 31,
        xla_mixed=False,
    ),
}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def paged(k: jax.Array, v: jax.Array, page_size: int, seed: int = 0):
    """Contiguous caches [B, S, K, D] -> (k_pages, v_pages [1 + B*S/P, P, K, D], page_tables
    [B, S/P]): every sequence's pages at shuffled pool positions (page 0: the null page)."""
    b, s, kh, d = k.shape
    n = b * s // page_size
    perm = np.random.default_rng(seed).permutation(n)  # logical page i lives at pool perm[i]+1
    where = np.empty(n, np.int64)
    where[perm] = np.arange(n)  # pool slot j (minus the null page) holds logical page where[j]

    def pool(x):
        pages = x.reshape(n, page_size, kh, d)[jnp.asarray(where)]
        return jnp.concatenate([jnp.zeros((1, page_size, kh, d), x.dtype), pages])

    tables = jnp.asarray((perm + 1).reshape(b, s // page_size), jnp.int32)
    return pool(k), pool(v), tables


def device_us(fn, args, calls: int) -> float | None:
    """GPU kernel microseconds per call of fn(*args) from a profiler trace (None off GPU or
    when the profiler is unavailable)."""

    def run():
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)

    k = trace_kernels(run, calls)
    return None if k is None else k["busy_ms_per_step"] * 1e3


def measure(row: dict, fn, args, p: dict, want=None) -> tuple[dict, jax.Array | None]:
    """Run, check against `want`, time; fills row (an error becomes a note)."""
    try:
        f = jax.jit(fn)
        out = f(*args)
        jax.block_until_ready(out)
        if want is not None:
            row["rel_err"] = rel_err(out, want)
        row["wall_us"] = time_fn(lambda: f(*args), repeats=p["reps"], inner=p["inner"]) * 1e6
        us = device_us(f, args, p["inner"])
        if us is not None:
            row["us"] = us
        return row, out
    except Exception as e:  # one failing variant must not lose the others
        row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return row, None


def bench_decode(p: dict, interpret: bool, copy_bw: float, log) -> list[dict]:
    h, kh, d = p["heads"]
    dtype = jnp.dtype(p["dtype"])
    rows = []
    for b, s in p["decode"]:
        ks = jax.random.split(jax.random.key(b * 7 + s), 3)
        q = jax.random.normal(ks[0], (b, h, d), jnp.float32).astype(dtype)
        kc = jax.random.normal(ks[1], (b, s, kh, d), dtype)
        vc = jax.random.normal(ks[2], (b, s, kh, d), dtype)
        lengths = jnp.full((b,), s, jnp.int32)
        qsl = jnp.arange(b + 1, dtype=jnp.int32)
        kv_bytes = 2 * kc.nbytes
        case = f"decode B{b} ctx{s} H{h}/{kh} D{d}"
        base = dict(part="decode", case=case, kv_MB=kv_bytes / 1e6)
        want = None
        variants = [
            (
                "contiguous decode xla",
                None,
                lambda q, k, v, n: decode_attention_reference(q, k, v, n),
                (q, kc, vc, lengths),
            ),
            (
                "contiguous decode pallas_triton",
                None,
                lambda q, k, v, n: api.decode_attention(
                    q, k, v, n, implementation="pallas_triton", interpret=interpret
                ),
                (q, kc, vc, lengths),
            ),
        ]
        for page in p["page_sizes"]:
            kp, vp, tables = paged(kc, vc, page)
            pargs = (q, kp, vp, tables, lengths, qsl)
            variants.append((f"ragged xla p{page}", None, ragged_paged_attention_reference, pargs))
            for name, cfg in [("", None)] + list(p["decode_configs"] if b == 1 else []):
                variants.append(
                    (
                        f"ragged pallas_triton p{page}" + (f" {name}" if name else ""),
                        cfg,
                        lambda *a, cfg=cfg: api.ragged_paged_attention(
                            *a, implementation="pallas_triton", config=cfg, interpret=interpret
                        ),
                        pargs,
                    )
                )
        case_rows = []
        for impl, _, fn, args in variants:
            row, out = measure(dict(base, impl=impl), fn, args, p, want)
            if want is None and out is not None:
                want = out  # XLA on the contiguous cache: the baseline every row is checked by
            t = _time(row)
            if t:
                row["frac_of_copy"] = kv_bytes / (t * 1e-6) / copy_bw
            case_rows.append(row)
            log(row)
        rows += _speedups(case_rows, "contiguous decode pallas_triton")
    return rows


def _time(row: dict) -> float | None:
    """Kernel time when the profiler gave one, else wall time (microseconds)."""
    return row.get("us") or row.get("wall_us")


def _speedups(rows: list[dict], baseline: str) -> list[dict]:
    """speedup_vs_baseline = baseline's time / the row's, for rows of one case."""
    ref = next((_time(r) for r in rows if r["impl"] == baseline), None)
    for r in rows:
        if ref and _time(r):
            r["speedup_vs_baseline"] = ref / _time(r)
    return rows


def _mixed_batch(m: dict, h: int, kh: int, d: int, dtype, page: int):
    """`chunks` prefill chunks (the last `chunk` tokens of `context`-token prompts), then
    `decodes` decode tokens at `context`: contiguous and paged views of the same data."""
    c, qc, n_dec, ctx = m["chunks"], m["chunk"], m["decodes"], m["context"]
    s = c + n_dec
    ks = jax.random.split(jax.random.key(ctx + qc), 3)
    t = c * qc + n_dec
    q = jax.random.normal(ks[0], (t, h, d), jnp.float32).astype(dtype)
    kc = jax.random.normal(ks[1], (s, ctx, kh, d), dtype)
    vc = jax.random.normal(ks[2], (s, ctx, kh, d), dtype)
    kp, vp, tables = paged(kc, vc, page)
    qsl = jnp.asarray(np.concatenate([[0], np.cumsum([qc] * c + [1] * n_dec)]), jnp.int32)
    lens = jnp.full((s,), ctx, jnp.int32)
    return q, kc, vc, (q, kp, vp, tables, lens, qsl)


def bench_mixed(p: dict, interpret: bool, log) -> list[dict]:
    h, kh, d = p["heads"]
    dtype = jnp.dtype(p["dtype"])
    rows = []
    for m in p["mixed"]:
        c, qc, n_dec, ctx = m["chunks"], m["chunk"], m["decodes"], m["context"]
        page = p["page_sizes"][0]
        q, kc, vc, pargs = _mixed_batch(m, h, kh, d, dtype, page)
        n_pre = c * qc
        # causal FLOPs: chunk token j of a prompt sees ctx - qc + j + 1 keys; a decode ctx
        seen = c * (qc * (ctx - qc) + qc * (qc + 1) / 2) + n_dec * ctx
        flops = 4.0 * h * d * seen
        case = f"mixed {c}x{qc} + {n_dec} decodes ctx{ctx} H{h}/{kh} D{d} p{page}"
        base = dict(part="mixed", case=case, kv_MB=2 * kc.nbytes / 1e6)

        def split_step(q, kc, vc, prefill):
            """The contiguous-cache engine: flash on the chunks, the decode kernel after."""
            qp = q[:n_pre].reshape(c, qc, h, d)
            pre = prefill(qp, kc[:c], vc[:c]).reshape(n_pre, h, d)
            dec = api.decode_attention(
                q[n_pre:],
                kc[c:],
                vc[c:],
                jnp.full((n_dec,), ctx, jnp.int32),
                implementation="pallas_triton",
                interpret=interpret,
            )
            return jnp.concatenate([pre, dec])

        flash = lambda q, k, v: api.attention(  # noqa: E731
            q, k, v, causal=True, implementation="pallas_triton", interpret=interpret
        )
        auto = lambda q, k, v: api.attention(q, k, v, causal=True)  # noqa: E731
        variants = [
            (
                "flash prefill + decode pallas_triton",
                lambda q, k, v: split_step(q, k, v, flash),
                (q, kc, vc),
            ),
            (
                "flash prefill (api auto) + decode pallas_triton",
                lambda q, k, v: split_step(q, k, v, auto),
                (q, kc, vc),
            ),
        ]
        if p["xla_mixed"]:  # gathers T x context K/V: too large for the GPU preset's batch
            variants.append(("ragged xla", ragged_paged_attention_reference, pargs))
        for name, cfg in [("", None)] + list(p["mixed_configs"]):
            variants.append(
                (
                    "ragged pallas_triton" + (f" {name}" if name else ""),
                    lambda *a, cfg=cfg: api.ragged_paged_attention(
                        *a, implementation="pallas_triton", config=cfg, interpret=interpret
                    ),
                    pargs,
                )
            )
        want, case_rows = None, []
        for impl, fn, args in variants:
            row, out = measure(dict(base, impl=impl), fn, args, p, want)
            if want is None and out is not None:
                want = out  # flash + decode: the baseline every row is checked by
            if _time(row):
                row["TFLOPs"] = flops / (_time(row) * 1e-6) / 1e12
            case_rows.append(row)
            log(row)
        rows += _speedups(case_rows, variants[0][0])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.engine.rpa_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument(
        "--out", help="path stem of the .json/.md (default experiments/engine/results/rpa_<preset>)"
    )
    ap.add_argument("--only", choices=["all", "decode", "mixed"], default="all")
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    interpret = jax.devices()[0].platform != "gpu"
    copy_bw = copy_bandwidth(p["copy_bytes"])

    def log(row):
        print(
            f"{row['case']:48s} {row['impl']:52s} us {row.get('us') or 0:9.1f} "
            f"wall {row.get('wall_us') or 0:9.1f} {row.get('note', '')}",
            flush=True,
        )

    rows = []
    if args.only in ("all", "decode"):
        rows += bench_decode(p, interpret, copy_bw, log)
    if args.only in ("all", "mixed"):
        rows += bench_mixed(p, interpret, log)
    meta = {
        "device": device_name(),
        "copy_bandwidth_GBps": round(copy_bw / 1e9, 1),
        "dtype": p["dtype"],
        "reps": p["reps"],
        "inner": p["inner"],
        "interpret": interpret,
        "jax": jax.__version__,
        "baseline": "decode: contiguous decode pallas_triton; mixed: flash prefill + decode "
        "pallas_triton",
        "us": "GPU kernel time per call (profiler)",
        "wall_us": "wall time per call, back-to-back calls",
    }
    cols = [
        "part",
        "case",
        "impl",
        "us",
        "wall_us",
        "frac_of_copy",
        "TFLOPs",
        "speedup_vs_baseline",
        "rel_err",
        "kv_MB",
        "note",
    ]
    out = Path(args.out) if args.out else RESULTS / f"rpa_{args.preset}"
    md = write_table(rows, cols, out, f"Ragged paged attention ({meta['device']})", meta)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
