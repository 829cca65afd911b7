"""Longest trainable sequence per sequence-parallel size (SP 1, 2, 4: does it grow with SP?).

For SP in {1, 2, 4}: a mesh over the first SP devices with axis `sequence` = SP (SP=1 is the
plain single-device step, no sequence parallelism, cuDNN attention on GPU as in
experiments.train.bench), the Llama-3.2-1B shape (`jaxturbo.models.shapes`, random weights),
bf16 compute, remat "full", batch 1, one
document per row.  Finds the longest T (1024 x a power of two) for which ONE real training step
(AdamW update included) runs without running out of memory: doubling from `start` for SP=1,
from the SP=1 result for SP>1, stopping at the first out-of-memory error.  With SP>1 attention
goes through `jaxturbo.parallel.sequence` (ring, zigzag layout; or Ulysses with --modes),
cuDNN inside on GPU ("auto").

Loss: by default the full float32 logits of each device's tokens [1, T/SP, vocab] (the setting
of the committed H100 run, results/longest_h100x4.md; at long T those logits and their gradient,
not attention, dominate memory).  `--loss-chunk-tokens N` uses the chunked cross-entropy instead
(every SP size, SP=1 included, then uses it, so the comparison stays like for like).

    python -m experiments.sp.longest --preset cpu    # 8 fake CPU devices, tiny model
    python -m experiments.sp.longest --preset gpu    # 4 GPUs

Each attempt prints one JSON line; at the end a table (SP, longest T, ratio vs SP=1), written
with the attempts to <out>.json / <out>.md (default experiments/sp/results/longest_<device>).
Memory per attempt: XLA's estimate for the compiled step (per device); the allocator's
high-water mark is reported too, but it is the process's, cumulative over the attempts.
--budget-s: no new attempt starts after this many seconds; a search stopped by it reports
"at least T".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

LOSS_CHUNK = [0]  # --loss-chunk-tokens, read by _attempt

PRESETS = {
    # Tiny model on 8 fake CPU devices; an artificial memory limit (tokens per device) stands in
    # for the GPU's out-of-memory error so the whole search and report run.
    "cpu": dict(
        model="tiny",
        start=64,
        max_len=4096,
        fake_devices=8,
        limit_tokens_per_device=256,
        dtype="bfloat16",
    ),
    "gpu": dict(
        model="llama3.2-1b",
        start=16384,
        max_len=1 << 20,
        fake_devices=0,
        limit_tokens_per_device=0,
        dtype="bfloat16",
    ),
}


def _setup_env(preset: dict) -> None:
    if preset["fake_devices"]:
        os.environ.setdefault(
            "XLA_FLAGS", f"--xla_force_host_platform_device_count={preset['fake_devices']}"
        )
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:
        # the search is about memory: let XLA take most of each card (default preallocates 75%)
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared hosts


class FakeOOM(Exception):
    """The CPU preset's artificial memory limit (message mimics XLA's)."""


def _is_oom(e: BaseException) -> bool:
    s = f"{type(e).__name__}: {e}"
    return (
        isinstance(e, FakeOOM)
        or "RESOURCE_EXHAUSTED" in s
        or "out of memory" in s.lower()
        or "Out of memory" in s
    )


def _model_cfg(name: str):
    from jaxturbo.models.shapes import shape

    return shape(name)


def _batch(vocab: int, t: int) -> dict:
    import numpy as np

    rs = np.random.RandomState(0)
    toks = rs.randint(0, vocab, (1, t + 1)).astype(np.int32)
    return {
        "tokens": toks[:, :-1],
        "targets": toks[:, 1:],
        "weights": np.ones((1, t), np.float32),
        "segment_ids": np.ones((1, t), np.int32),
        "positions": np.arange(t, dtype=np.int32)[None],
    }


def _mem(devs) -> dict:
    """Max over devs of the allocator's high-water mark (cumulative over the process: never reset
    between attempts, hence `process_peak_gib`) and of bytes in use now, GiB; None where
    memory_stats is missing (CPU)."""
    peak = inuse = None
    for d in devs:
        try:
            s = d.memory_stats() or {}
        except Exception:
            s = {}
        if "peak_bytes_in_use" in s:
            peak = max(peak or 0, s["peak_bytes_in_use"] / 2**30)
        if "bytes_in_use" in s:
            inuse = max(inuse or 0, s["bytes_in_use"] / 2**30)
    return {"process_peak_gib": peak, "in_use_gib": inuse}


def _attempt(cfg, sp: int, mode: str, t: int, devs, dtype: str, limit_tpd: int) -> dict:
    """One real training step at sequence length t on the first sp devices (raises on OOM)."""
    import jax

    from jaxturbo.models.init import init_params
    from jaxturbo.parallel.mesh import make_mesh
    from jaxturbo.parallel.sequence import model_layout
    from jaxturbo.train import sharding as shd
    from jaxturbo.train.optimizer import OptimizerConfig, make_optimizer
    from jaxturbo.train.step import TrainConfig, init_state, make_train_step, sft_loss

    if limit_tpd and t // sp > limit_tpd:
        raise FakeOOM(
            f"RESOURCE_EXHAUSTED (artificial CPU limit): {t // sp} tokens/device > {limit_tpd}"
        )
    on_gpu = devs[0].platform == "gpu"
    tc = TrainConfig(compute_dtype=dtype, remat="full", loss_chunk_tokens=LOSS_CHUNK[0])
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_steps=1, total_steps=1000))
    host = _batch(cfg.vocab_size, t)
    if sp == 1:
        attn_fn = None
        if on_gpu:

            def attn_fn(q, k, v, segment_ids=None):  # one document per row: causal only
                return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

        with jax.default_device(devs[0]):
            params = init_params(cfg, jax.random.key(0))
            state = init_state(params, opt)
            del params
            step = make_train_step(cfg, tc, opt, loss_fn=sft_loss(cfg, tc, attn_fn=attn_fn))
            batch = {k: jax.device_put(v, devs[0]) for k, v in host.items()}
    else:
        mesh = make_mesh({"sequence": sp}, devices=devs[:sp])
        _, _, ring = model_layout(mode, cfg, mesh, batch=1, seq_len=t)
        with jax.default_device(devs[0]):
            params = init_params(cfg, jax.random.key(0))
        state = init_state(params, opt, mesh=mesh)
        step = make_train_step(cfg, tc, opt, mesh=mesh, params=params, sequence_parallel=mode)
        del params
        batch = shd.put_batch(host, mesh, sequence_ring=ring)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    xla_gib = None
    try:  # XLA's own per-device estimate for this executable (temp + arguments + outputs)
        ma = compiled.memory_analysis()
        xla_gib = (
            ma.temp_size_in_bytes
            + ma.argument_size_in_bytes
            + ma.output_size_in_bytes
            - ma.alias_size_in_bytes
        ) / 2**30
    except Exception:
        pass
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    loss = float(jax.block_until_ready(m["loss"]))
    step_s = time.perf_counter() - t0
    out = {
        "step_s": round(step_s, 3),
        "compile_s": round(compile_s, 2),
        "loss": loss,
        "xla_estimate_gib": None if xla_gib is None else round(xla_gib, 2),
    }
    out.update({k: None if v is None else round(v, 2) for k, v in _mem(devs[:sp]).items()})
    del state, m, batch, compiled, step
    return out


def _free() -> None:
    import jax

    gc.collect()
    jax.clear_caches()
    gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.sp.longest", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--modes", default="ring", help="comma list of ring, ulysses")
    ap.add_argument(
        "--sps", default="1,2,4", help="SP sizes (1 first: it sets the start of the rest)"
    )
    ap.add_argument(
        "--loss-chunk-tokens",
        type=int,
        default=0,
        help="chunked cross-entropy block (0: full float32 logits, as measured)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=330.0,
        help="no new attempt starts after this many seconds",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="output path without extension (default experiments/sp/results/longest_<device>)",
    )
    args = ap.parse_args()
    LOSS_CHUNK[0] = args.loss_chunk_tokens
    preset = PRESETS[args.preset]
    _setup_env(preset)
    import jax

    cfg = _model_cfg(preset["model"])
    devs = jax.devices()
    sps = [int(s) for s in args.sps.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if max(sps) > len(devs):
        raise SystemExit(f"SP={max(sps)} needs {max(sps)} devices; {len(devs)} visible")
    device = devs[0].device_kind.replace(" ", "_") if devs[0].platform == "gpu" else "cpu"
    out = Path(args.out) if args.out else HERE / "results" / f"longest_{device}"
    t_start = time.perf_counter()
    attempts: list[dict] = []
    # (mode, sp) -> {"longest": T or None, "stopped": "oom" | "budget" | "max_len" | "error"}
    found: dict[tuple[str, int], dict] = {}

    def search(mode: str, sp: int, start: int) -> dict:
        t, longest, stopped = start, None, "max_len"
        while t <= preset["max_len"]:
            if time.perf_counter() - t_start > args.budget_s:
                stopped = "budget"
                break
            row = {"sp": sp, "mode": mode if sp > 1 else "none", "T": t}
            try:
                row.update(
                    status="ok",
                    **_attempt(
                        cfg, sp, mode, t, devs, preset["dtype"], preset["limit_tokens_per_device"]
                    ),
                )
            except Exception as e:  # noqa: BLE001 - classify, keep the message short
                row["status"] = "oom" if _is_oom(e) else "error"
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                del e
            _free()
            row.update({f"after_{k}": v for k, v in _mem(devs[:sp]).items() if v is not None})
            row["elapsed_s"] = round(time.perf_counter() - t_start, 1)
            attempts.append(row)
            print(json.dumps(row), flush=True)
            if row["status"] != "ok":
                stopped = row["status"]
                if row["status"] == "oom" and longest is None and t > start // 4:
                    t //= 2  # the first guess was too long: step down, at most twice
                    continue
                break
            longest = t
            if stopped == "oom":  # found by stepping down: the next length up already failed
                break
            t *= 2
        return {"longest": longest, "stopped": stopped}

    base = None
    for mode in modes:
        for sp in sps:
            if sp == 1:
                if base is None:
                    base = search(mode, 1, preset["start"])
                found[(mode, 1)] = base
                continue
            # memory per device scales with T / SP: start at the previous size's result scaled
            # by the SP ratio (one attempt instead of re-proving the shorter lengths)
            prev_sp = max([k for k in sps if k < sp and (mode, k) in found] or [1])
            prev = found.get((mode, prev_sp), base) or {}
            start = (prev.get("longest") or preset["start"]) * sp // prev_sp
            found[(mode, sp)] = search(mode, sp, start)

    ref = (base or {}).get("longest")
    rows = []
    for (mode, sp), r in found.items():
        if sp == 1 and any(x["sp"] == 1 for x in rows):
            continue  # one SP=1 baseline, shared by the modes
        ratio = r["longest"] / ref if (r["longest"] and ref) else None
        rows.append(
            {
                "mode": mode if sp > 1 else "none",
                "sp": sp,
                "longest_T": r["longest"],
                "at_least": r["stopped"] in ("budget", "max_len"),
                "stopped": r["stopped"],
                "ratio_vs_sp1": ratio,
            }
        )
    meta = {
        "preset": args.preset,
        "device": devs[0].device_kind,
        "devices": len(devs),
        "model": preset["model"],
        "params": cfg.num_params(),
        "dtype": preset["dtype"],
        "remat": "full",
        "batch": 1,
        "start": preset["start"],
        "max_len": preset["max_len"],
        "budget_s": args.budget_s,
        "elapsed_s": round(time.perf_counter() - t_start, 1),
        "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "artificial_limit_tokens_per_device": preset["limit_tokens_per_device"] or None,
        "attention": "SP=1: cuDNN via jax.nn.dot_product_attention (GPU) / XLA (CPU); SP>1: "
        "jaxturbo.parallel.sequence sp_attention, implementation auto (cuDNN on GPU)",
        "loss": (
            f"chunked cross-entropy, {LOSS_CHUNK[0]} tokens per block"
            if LOSS_CHUNK[0]
            else "full float32 logits of each device's tokens [1, T/SP, vocab], every SP size"
        ),
        "memory_note": "xla_estimate_gib is XLA's per-device estimate of the attempt's "
        "compiled step; process_peak_gib is the allocator's high-water mark, never "
        "reset within the process (max over the SP devices): cumulative over the "
        "attempts, not per attempt",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "summary": rows, "attempts": attempts}, indent=1)
    )
    fmt = lambda r: (
        "none (not tried: budget)"
        if r["longest_T"] is None and r["at_least"]
        else "none"
        if r["longest_T"] is None
        else ("at least " if r["at_least"] else "")
        + (f"{r['longest_T'] // 1024}K" if r["longest_T"] >= 1024 else str(r["longest_T"]))
    )
    lines = [
        f"Longest trainable sequence, {meta['model']} ({cfg.num_params() / 1e9:.2f} B params), "
        f"{meta['device']}, bf16, remat full, batch 1"
        + (
            f", artificial limit {meta['artificial_limit_tokens_per_device']} tokens/device"
            if meta["artificial_limit_tokens_per_device"]
            else ""
        ),
        "",
        "| SP | mode | longest T | ratio vs SP=1 | stopped by |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = f"{r['ratio_vs_sp1']:.2f}x" if r["ratio_vs_sp1"] else "n/a"
        lines.append(f"| {r['sp']} | {r['mode']} | {fmt(r)} | {ratio} | {r['stopped']} |")
    lines += [
        "",
        f"Loss: {meta['loss']}.",
        "",
        "| SP | mode | T | status | step s | compile s | process peak GiB (cumulative) "
        "| XLA est. GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    cell = lambda a, k: "" if a.get(k) is None else str(a[k])
    for a in attempts:
        lines.append(
            f"| {a['sp']} | {a['mode']} | {a['T']} | {a['status']} | "
            + " | ".join(
                cell(a, k) for k in ("step_s", "compile_s", "process_peak_gib", "xla_estimate_gib")
            )
            + " |"
        )
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
