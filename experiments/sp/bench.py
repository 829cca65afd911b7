"""Sequence-parallel attention throughput per device at fixed tokens per device, vs SP=1.

For each mode (ulysses, ring, hybrid) the sequence is split over all devices of the mesh
(P = device count) with `tokens_per_device` rows each, so the whole sequence is P x longer than
the SP=1 baseline's; per-device throughput = attention FLOPs / P / time.  The baseline is plain
attention on one device over `tokens_per_device` tokens, measured in the same run.  Causal
FLOPs: 4·B·H·T²·D/2; fwd+bwd counted as 3.5x fwd.  Each time is the median of `iters` calls
after a warm-up, for the baseline and every mode alike (`--stat min` takes the best instead).
Memory per row (`fwd_MiB`, `fwdbwd_MiB`): XLA's buffer assignment for that row's compiled
program on one device (arguments + unaliased outputs + temporaries), each row's own figure.

Before timing, a self-check (`_self_check`) compares every mode's output and q/k/v gradients
with the single-device reference (float32 math on the same inputs) on small shapes, and on GPU
also the cuDNN lse forward / saved-lse backward (`flash_attention/cudnn_lse.py`, private JAX
API) against the reference; it prints the max relative errors and exits 1 without timing when
one exceeds the tolerance (2e-2 for bf16, 1e-4 for float32).

  python -m experiments.sp.bench --preset cpu    # 8 fake CPU devices, tiny shapes (checks it runs)
  python -m experiments.sp.bench --preset gpu    # every visible GPU, bf16, Llama-3.2-1B heads
  python -m experiments.sp.bench --preset gpu4   # 4 GPUs, 8K and 32K tokens/device
  python -m experiments.sp.bench --preset gpu4 --check-only   # only the correctness check

Writes OUT/sp_<preset>.{json,md,png} (OUT default experiments/sp/results); prints the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PRESETS = {
    "cpu": dict(
        batch=1,
        heads=8,
        kv_heads=2,
        head_dim=16,
        tokens_per_device=[64, 128],
        dtype="float32",
        iters=3,
        fake_devices=8,
    ),
    "gpu": dict(
        batch=1,
        heads=32,
        kv_heads=8,
        head_dim=64,
        tokens_per_device=[4096, 8192],
        dtype="bfloat16",
        iters=5,
        fake_devices=0,
    ),
    # 4 GPUs at 8K and 32K tokens/device (the RESULTS.md table); Llama-3.2-1B attention heads
    # (32 query, 8 KV, head dim 64).
    "gpu4": dict(
        batch=1,
        heads=32,
        kv_heads=8,
        head_dim=64,
        tokens_per_device=[8192, 32768],
        dtype="bfloat16",
        iters=5,
        fake_devices=0,
        devices=4,
        modes="ulysses,ring",
    ),
}
# Self-check shapes: batch 2 (catches batch-axis mix-ups), small tokens per device.
CHECK_TOKENS = {"cpu": 64}
CHECK_TOKENS_DEFAULT = 1024


def _setup(preset: dict) -> None:
    if preset["fake_devices"]:
        os.environ.setdefault(
            "XLA_FLAGS", f"--xla_force_host_platform_device_count={preset['fake_devices']}"
        )
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared hosts


STATS = ("median", "min")


def _time(fn, args, iters: int, stat: str = "median") -> float:
    """Seconds per call of fn(*args) over `iters` blocking calls after a warm-up: their median
    (or their minimum with stat="min")."""
    import jax

    if stat not in STATS:
        raise ValueError(f"stat {stat!r}: choose one of {STATS}")
    jax.block_until_ready(fn(*args))  # warm up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times) if stat == "min" else sorted(times)[len(times) // 2]


def _rel_err(a, b) -> float:
    """max |a - b| / max |b| in float64 (inf on NaN/inf in a)."""
    import numpy as np

    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _self_check(preset_name: str, preset: dict, modes: list[str], devs) -> dict:
    """Errors (name -> max relative error) of each SP mode and of the cuDNN lse kernels vs the
    single-device float32 reference on small shapes.  Never timed."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxturbo.parallel import sequence as S
    from jaxturbo.parallel.mesh import make_mesh
    from pallas_kernels.flash_attention.reference import attention_reference

    n = len(devs)
    dtype = jnp.dtype(preset["dtype"])
    b, h, kh, d = 2, preset["heads"], preset["kv_heads"], preset["head_dim"]
    # ~4K tokens in all keeps the float32 reference's [B, H, T, T] logits (4 GiB) on one GPU.
    tpd = CHECK_TOKENS.get(preset_name, min(CHECK_TOKENS_DEFAULT, max(128, 4096 // n)))
    t = tpd * n
    rng = np.random.default_rng(1)
    mk = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
    q, k, v, w = mk(b, t, h, d), mk(b, t, kh, d), mk(b, t, kh, d), mk(b, t, h, d)
    f32 = lambda x: x.astype(jnp.float32)
    errs: dict[str, float] = {}

    @jax.jit
    def reference(q, k, v, w):  # float32 math on the same (bf16-valued) inputs
        out, vjp = jax.vjp(
            lambda q, k, v: attention_reference(q, k, v, causal=True), f32(q), f32(k), f32(v)
        )
        return (out, *vjp(f32(w)))

    ref = [np.asarray(x) for x in reference(q, k, v, w)]  # to host: frees the GPU for the modes

    def compare(name, fn):
        """fn(q, k, v) -> out [B,T,H,D]; out and q/k/v grads (cotangent w) vs the reference."""
        out, vjp = jax.vjp(jax.jit(fn), q, k, v)
        grads = vjp(w.astype(out.dtype))
        for what, a, r in zip(("out", "dq", "dk", "dv"), (out, *grads), ref):
            errs[f"{name} {what}"] = _rel_err(a, r)

    mesh = make_mesh({"sequence": n}, devices=devs)
    for mode in modes:
        if mode == "hybrid" and n < 4:
            continue
        u = {"hybrid": 2, "ulysses": n}.get(mode, 1)
        impls = ["auto"] + (["pallas"] if mode == "ring" and devs[0].platform == "gpu" else [])
        for impl in impls:
            sp = S.SequenceParallel(
                mode, ulysses_size=2 if mode == "hybrid" else None, implementation=impl
            )
            r = S.layout_ring_size(sp, sp_size=n, ulysses_size=u, causal=True)

            def fn(q, k, v, sp=sp, r=r):
                zz = lambda x: S.zigzag(x, r)
                out = S.sp_attention(zz(q), zz(k), zz(v), mesh, sp, causal=True)
                return S.unzigzag(out, r)

            compare(f"{mode}[{impl}] SP={n}", fn)

    if devs[0].platform == "gpu":
        _check_cudnn_kernels(q[:, :tpd], k[:, :tpd], v[:, :tpd], w[:, :tpd], errs)
    return errs


def _check_cudnn_kernels(q, k, v, w, errs: dict) -> None:
    """cuDNN lse forward and saved-lse backward (private JAX API) vs the float32 reference:
    causal on one block, and the ring's case, keys split in two halves, each half's backward
    given the *global* output and lse, summed."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.flash_attention import cudnn_lse
    from pallas_kernels.flash_attention.reference import attention_reference

    f32 = lambda x: x.astype(jnp.float32)
    for causal in (True, False):
        ref = lambda q, k, v: attention_reference(q, k, v, causal=causal, return_lse=True)
        (ref_o, ref_l), ref_vjp = jax.vjp(ref, f32(q), f32(k), f32(v))
        ref_g = ref_vjp((f32(w), jnp.zeros_like(ref_l)))
        o, l = jax.jit(lambda q, k, v: cudnn_lse.cudnn_attention_lse(q, k, v, causal=causal))(
            q, k, v
        )
        tag = "causal" if causal else "full"
        errs[f"cudnn_lse {tag} out"] = _rel_err(o, ref_o)
        errs[f"cudnn_lse {tag} lse"] = _rel_err(l, ref_l)
        # Backward from the reference's (global) output and lse.
        o_saved = ref_o.astype(q.dtype)
        bwd = jax.jit(
            lambda q, k, v, o, l, do: cudnn_lse.cudnn_attention_bwd(
                q, k, v, o, l, do, causal=causal
            )
        )
        if causal:
            g = bwd(q, k, v, o_saved, ref_l, w)
        else:  # two key blocks, each with the global out/lse: the ring's use
            s2 = k.shape[1] // 2
            g0 = bwd(q, k[:, :s2], v[:, :s2], o_saved, ref_l, w)
            g1 = bwd(q, k[:, s2:], v[:, s2:], o_saved, ref_l, w)
            g = (
                f32(g0[0]) + f32(g1[0]),
                jnp.concatenate([g0[1], g1[1]], 1),
                jnp.concatenate([g0[2], g1[2]], 1),
            )
            tag = "2-block"
        for what, a, r in zip(("dq", "dk", "dv"), g, ref_g):
            errs[f"cudnn_bwd {tag} {what}"] = _rel_err(a, r)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.sp.bench", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument(
        "--modes", default=None, help="comma-separated, default the preset's or ulysses,ring,hybrid"
    )
    ap.add_argument(
        "--check-only",
        action="store_true",
        help="run the correctness self-check and exit (0 pass, 1 fail)",
    )
    ap.add_argument(
        "--stat",
        choices=STATS,
        default="median",
        help="what one timing is: the median of the preset's calls (default) or "
        "their minimum (best-of)",
    )
    ap.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results"),
        help="directory for sp_<preset>.{json,md,png} (default experiments/sp/results)",
    )
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    modes = (args.modes or preset.get("modes", "ulysses,ring,hybrid")).split(",")
    _setup(preset)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from experiments.bench_util import compiled_bytes
    from jaxturbo.parallel import sequence as S
    from jaxturbo.parallel.mesh import make_mesh
    from pallas_kernels import attention

    devs = jax.devices()
    if preset.get("devices"):
        if len(devs) < preset["devices"]:
            print(
                f"preset {args.preset} needs {preset['devices']} devices, found {len(devs)}",
                file=sys.stderr,
            )
            return 2
        devs = devs[: preset["devices"]]
    n = len(devs)
    dtype = jnp.dtype(preset["dtype"])

    tol = 2e-2 if dtype in (jnp.bfloat16, jnp.float16) else 1e-4
    errs = _self_check(args.preset, preset, modes, devs)
    bad = {name: e for name, e in errs.items() if not e <= tol}
    for name, e in errs.items():
        print(f"check {name:32s} max rel err {e:.2e}{'  FAIL' if name in bad else ''}", flush=True)
    if bad:
        print(
            f"self-check FAILED ({len(bad)} of {len(errs)} above {tol:g}); not timing",
            file=sys.stderr,
        )
        return 1
    print(f"self-check passed ({len(errs)} comparisons, tolerance {tol:g})", flush=True)
    if args.check_only:
        return 0
    b, h, k, d = preset["batch"], preset["heads"], preset["kv_heads"], preset["head_dim"]
    rows = []

    def case(fn, t, label, mode, p, mesh=None):
        rng = np.random.default_rng(0)
        mk = lambda nh: jnp.asarray(rng.normal(size=(b, t, nh, d)), dtype)
        q, kk, v = mk(h), mk(k), mk(k)
        if mesh is not None:  # place the rows where the mode wants them, outside the timing
            sh = NamedSharding(mesh, P(None, "sequence"))
            q, kk, v = (jax.device_put(x, sh) for x in (q, kk, v))
        loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))
        # compiled here once: the programs timed and the memory reported are the same
        fwd = jax.jit(fn).lower(q, kk, v).compile()
        fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kk, v).compile()
        tf = _time(fwd, (q, kk, v), preset["iters"], args.stat)
        tb = _time(fb, (q, kk, v), preset["iters"], args.stat)
        flops = 4 * b * h * t * t * d / 2 / p  # causal, per device
        mib = lambda c: None if compiled_bytes(c) is None else compiled_bytes(c) / 2**20
        rows.append(
            dict(
                label=label,
                mode=mode,
                sp=p,
                seq=t,
                tokens_per_device=t // p,
                fwd_ms=1e3 * tf,
                fwdbwd_ms=1e3 * tb,
                fwd_tflops_per_dev=flops / tf / 1e12,
                fwdbwd_tflops_per_dev=3.5 * flops / tb / 1e12,
                fwd_MiB=mib(fwd),
                fwdbwd_MiB=mib(fb),
            )
        )
        print(rows[-1], flush=True)

    gpu = devs[0].platform == "gpu"
    for tpd in preset["tokens_per_device"]:
        case(
            lambda q, k, v: attention(q, k, v, causal=True),
            tpd,
            "SP=1 (cuDNN)" if gpu else "SP=1",
            "none",
            1,
        )
        for mode in modes:
            if mode == "hybrid" and n < 4:
                continue
            u = 2 if mode == "hybrid" else None
            sp = S.SequenceParallel(mode, ulysses_size=u)
            mesh = make_mesh({"sequence": n}, devices=devs)
            t = tpd * n
            # Inputs are taken as already in the mode's layout (zigzag once per batch).
            fn = lambda q, k, v, sp=sp, mesh=mesh: S.sp_attention(q, k, v, mesh, sp, causal=True)
            case(fn, t, f"{mode} SP={n}" + (f" u={u}" if u else ""), mode, n, mesh)

    for r in rows:
        base = next(
            x
            for x in rows
            if x["mode"] == "none" and x["tokens_per_device"] == r["tokens_per_device"]
        )
        r["fwd_vs_sp1"] = r["fwd_tflops_per_dev"] / base["fwd_tflops_per_dev"]
        r["fwdbwd_vs_sp1"] = r["fwdbwd_tflops_per_dev"] / base["fwdbwd_tflops_per_dev"]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        preset=args.preset,
        device=devs[0].device_kind,
        devices=n,
        jax=jax.__version__,
        batch=b,
        heads=h,
        kv_heads=k,
        head_dim=d,
        dtype=str(dtype),
        causal=True,
        timing=f"{args.stat} of {preset['iters']} calls after a warm-up",
        check_max_rel_err=max(errs.values()) if errs else None,
    )
    stem = out / f"sp_{args.preset}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    head = (
        "| case | tokens/dev | seq | fwd ms | fwd TFLOP/s/dev | vs SP=1 | fwd+bwd ms | "
        "fwd+bwd TFLOP/s/dev | vs SP=1 | fwd+bwd MiB/dev |"
    )
    lines = [f"{meta}", "", head, "|" + " --- |" * 10]
    for r in rows:
        pk = "-" if r["fwdbwd_MiB"] is None else f"{r['fwdbwd_MiB']:.0f}"
        lines.append(
            f"| {r['label']} | {r['tokens_per_device']} | {r['seq']} | "
            f"{r['fwd_ms']:.2f} | {r['fwd_tflops_per_dev']:.3g} | {r['fwd_vs_sp1']:.2f} | "
            f"{r['fwdbwd_ms']:.2f} | {r['fwdbwd_tflops_per_dev']:.3g} | "
            f"{r['fwdbwd_vs_sp1']:.2f} | {pk} |"
        )
    table = "\n".join(lines)
    stem.with_suffix(".md").write_text(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = [f"{r['label']}\n{r['tokens_per_device']}/dev" for r in rows]
        ax.bar(range(len(rows)), [r["fwdbwd_vs_sp1"] for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_ylabel("fwd+bwd throughput per device / SP=1")
        ax.set_title(f"sequence parallel attention, {meta['device']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
