"""Sequence-parallel attention throughput per device at fixed tokens per device, vs SP=1.

For each mode (ulysses, ring, hybrid) the sequence is split over all devices of the mesh
(P = device count) with `tokens_per_device` rows each, so the whole sequence is P x longer than
the SP=1 baseline's; per-device throughput = attention FLOPs / P / time.  The baseline is plain
attention on one device over `tokens_per_device` tokens, measured in the same run.  Also
reports peak device memory (GPU).  Causal FLOPs: 4·B·H·T²·D/2; fwd+bwd counted as 3.5x fwd.

  python experiments/sp_bench.py --preset cpu    # 8 fake CPU devices, tiny shapes (checks it runs)
  python experiments/sp_bench.py --preset gpu    # every visible GPU, bf16, Llama-1B-like heads

Writes experiments/sp/results/sp_bench_<preset>.{json,md,png}; prints the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PRESETS = {
    "cpu": dict(batch=1, heads=8, kv_heads=2, head_dim=16, tokens_per_device=[64, 128],
                dtype="float32", iters=3, fake_devices=8),
    "gpu": dict(batch=1, heads=32, kv_heads=8, head_dim=64, tokens_per_device=[4096, 8192],
                dtype="bfloat16", iters=5, fake_devices=0),
}


def _setup(preset: dict) -> None:
    if preset["fake_devices"]:
        os.environ.setdefault("XLA_FLAGS",
                              f"--xla_force_host_platform_device_count={preset['fake_devices']}")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared hosts


def _time(fn, args, iters: int) -> float:
    import jax
    jax.block_until_ready(fn(*args))  # compile + warm up
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--modes", default="ulysses,ring,hybrid")
    ap.add_argument("--out", default=str(Path(__file__).parent / "sp" / "results"))
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    _setup(preset)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from jaxturbo.parallel import sequence as S
    from jaxturbo.parallel.mesh import make_mesh
    from pallas_kernels import attention

    devs = jax.devices()
    n = len(devs)
    dtype = jnp.dtype(preset["dtype"])
    b, h, k, d = preset["batch"], preset["heads"], preset["kv_heads"], preset["head_dim"]
    rows = []

    def case(fn, t, label, mode, p, mesh=None):
        rng = np.random.default_rng(0)
        mk = lambda nh: jnp.asarray(rng.normal(size=(b, t, nh, d)), dtype)
        q, kk, v = mk(h), mk(k), mk(k)
        if mesh is not None:  # place the rows where the mode wants them, outside the timing
            sh = NamedSharding(mesh, P(None, "sequence"))
            q, kk, v = (jax.device_put(x, sh) for x in (q, kk, v))
        fwd = jax.jit(fn)
        loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))
        fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        tf = _time(fwd, (q, kk, v), preset["iters"])
        tb = _time(fb, (q, kk, v), preset["iters"])
        flops = 4 * b * h * t * t * d / 2 / p  # causal, per device
        mem = None
        stats = devs[0].memory_stats() if devs[0].platform == "gpu" else None
        if stats:
            mem = stats.get("peak_bytes_in_use")
        rows.append(dict(label=label, mode=mode, sp=p, seq=t, tokens_per_device=t // p,
                         fwd_ms=1e3 * tf, fwdbwd_ms=1e3 * tb,
                         fwd_tflops_per_dev=flops / tf / 1e12,
                         fwdbwd_tflops_per_dev=3.5 * flops / tb / 1e12,
                         peak_bytes=mem))
        print(rows[-1], flush=True)

    for tpd in preset["tokens_per_device"]:
        case(lambda q, k, v: attention(q, k, v, causal=True), tpd, "SP=1", "none", 1)
        for mode in args.modes.split(","):
            if mode == "hybrid" and n < 4:
                continue
            u = 2 if mode == "hybrid" else None
            sp = S.SequenceParallel(mode, ulysses_size=u)
            mesh = make_mesh({"sequence": n})
            t = tpd * n
            # Inputs are taken as already in the mode's layout (zigzag once per batch).
            fn = lambda q, k, v, sp=sp, mesh=mesh: S.sp_attention(q, k, v, mesh, sp, causal=True)
            case(fn, t, f"{mode} SP={n}" + (f" u={u}" if u else ""), mode, n, mesh)

    for r in rows:
        base = next(x for x in rows if x["mode"] == "none"
                    and x["tokens_per_device"] == r["tokens_per_device"])
        r["fwd_vs_sp1"] = r["fwd_tflops_per_dev"] / base["fwd_tflops_per_dev"]
        r["fwdbwd_vs_sp1"] = r["fwdbwd_tflops_per_dev"] / base["fwdbwd_tflops_per_dev"]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(preset=args.preset, device=devs[0].device_kind, devices=n, jax=jax.__version__,
                batch=b, heads=h, kv_heads=k, head_dim=d, dtype=str(dtype), causal=True)
    (out / f"sp_bench_{args.preset}.json").write_text(json.dumps(dict(meta=meta, rows=rows),
                                                                 indent=1))
    head = ("| case | tokens/dev | seq | fwd ms | fwd TFLOP/s/dev | vs SP=1 | fwd+bwd ms | "
            "fwd+bwd TFLOP/s/dev | vs SP=1 | peak GiB |")
    lines = [f"{meta}", "", head, "|" + " --- |" * 10]
    for r in rows:
        pk = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"
        lines.append(f"| {r['label']} | {r['tokens_per_device']} | {r['seq']} | "
                     f"{r['fwd_ms']:.2f} | {r['fwd_tflops_per_dev']:.3g} | {r['fwd_vs_sp1']:.2f} | "
                     f"{r['fwdbwd_ms']:.2f} | {r['fwdbwd_tflops_per_dev']:.3g} | "
                     f"{r['fwdbwd_vs_sp1']:.2f} | {pk} |")
    table = "\n".join(lines)
    (out / f"sp_bench_{args.preset}.md").write_text(table + "\n")
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
        fig.savefig(out / f"sp_bench_{args.preset}.png", dpi=120)
    except ImportError:
        pass
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
