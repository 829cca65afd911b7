"""Decode throughput of jaxturbo's on-device generation loop vs the memory-bandwidth floor.

For each model and batch: prefill time, decode ms/token and tokens/s, and the floor
  bytes read per decode step (all weights once + the KV cache at mean context) / copy bandwidth
with the copy bandwidth measured in the same run.  Writes JSON + Markdown + a plot.

  python experiments/generate_bench.py --preset cpu     # SmolLM2 + a tiny random model, CPU
  python experiments/generate_bench.py --preset gpu     # SmolLM2 (bf16) + Llama-3-8B shape, 1 GPU
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Decode GEMVs are slower through XLA's Triton GEMM fusions than through cuBLAS (BENCHMARKS.md).
if "--xla_gpu_enable_triton_gemm" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import copy_bandwidth, device_name, peak_memory, time_fn, write_table  # noqa: E402

from jaxturbo.inference.generate import _generate  # noqa: E402
from jaxturbo.inference.sampling import SamplingParams  # noqa: E402
from jaxturbo.models.config import ModelConfig  # noqa: E402
from jaxturbo.models.transformer import kv_cache_bytes_per_token  # noqa: E402
from jaxturbo.models.init import init_params  # noqa: E402

LLAMA3_8B = ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096,
                        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                        max_position_embeddings=8192)
# SmolLM2-135M's shapes, for machines without the PyPI GGUF (the lent GPUs: it cannot travel).
SMOLLM2_SHAPE = ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576,
                            intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                            num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                            max_position_embeddings=8192, tie_word_embeddings=True)
TINY = ModelConfig(model_type="llama", vocab_size=4096, hidden_size=256, intermediate_size=768,
                   num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                   max_position_embeddings=2048)

PRESETS = {
    "cpu": dict(models=["smollm2-135m", "tiny"], batches=[1, 16], prompt=128, new=32,
                dtype="float32", copy_bytes=1 << 28),
    "gpu": dict(models=["smollm2-shape", "llama3-8b"], batches=[1, 16], prompt=1024, new=256,
                dtype="bfloat16", copy_bytes=1 << 31),
}


def load(name: str, dtype: str):
    if name == "llama3-8b":
        cfg = LLAMA3_8B
        return cfg, init_params(cfg, jax.random.key(0), jnp.dtype(dtype))
    if name in ("tiny", "smollm2-shape"):
        cfg = TINY if name == "tiny" else SMOLLM2_SHAPE
        return cfg, init_params(cfg, jax.random.key(0), jnp.dtype(dtype))
    from jaxturbo.bridge import load_model
    cfg, params, _ = load_model(name, dtype=dtype, progress=False)
    return cfg, params


def run_case(cfg: ModelConfig, params, batch: int, prompt: int, new: int, bw: float) -> dict:
    rng = np.random.RandomState(0)
    toks = jnp.asarray(rng.randint(0, cfg.vocab_size, (batch, prompt)), jnp.int32)
    lens = jnp.full((batch,), prompt, jnp.int32)
    stops = jnp.asarray([-1], jnp.int32)  # no stop token: every row runs the full length
    dtype = jnp.dtype(jax.tree.leaves(params)[0].dtype).name

    def gen(n: int):
        return lambda: _generate(params, toks, lens, jax.random.key(0), stops, cfg=cfg,
                                 max_new_tokens=n, sampling=SamplingParams(), stream=None,
                                 attn_impl="auto", cache_dtype=dtype)

    t1 = time_fn(gen(1), repeats=5)
    tn = time_fn(gen(new), repeats=3)
    per_tok = (tn - t1) / (new - 1)
    itemsize = jnp.dtype(dtype).itemsize
    weight_bytes = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params)) * itemsize
    if not cfg.tie_word_embeddings:  # the input embedding is gathered, not read whole
        weight_bytes -= cfg.vocab_size * cfg.hidden_size * itemsize
    kv_bytes = kv_cache_bytes_per_token(cfg, dtype) * batch * (prompt + new / 2)
    floor = (weight_bytes + kv_bytes) / bw
    return {"batch": batch, "prompt": prompt, "new_tokens": new, "prefill_s": t1,
            "decode_ms_per_step": per_tok * 1e3, "tokens_per_s": batch / per_tok,
            "floor_ms_per_step": floor * 1e3, "fraction_of_floor": floor / per_tok,
            "weights_GB": weight_bytes / 1e9, "kv_GB_read": kv_bytes / 1e9}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--models", nargs="*", help="override the preset's models")
    ap.add_argument("--out", default="experiments/generate/results")
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    bw = copy_bandwidth(p["copy_bytes"])
    rows = []
    for name in args.models or p["models"]:
        cfg, params = load(name, p["dtype"])
        for b in p["batches"]:
            r = {"model": name, **run_case(cfg, params, b, p["prompt"], p["new"], bw)}
            rows.append(r)
            print(f"{name} batch {b}: {r['tokens_per_s']:.1f} tok/s, "
                  f"{r['decode_ms_per_step']:.2f} ms/step (floor {r['floor_ms_per_step']:.2f})", flush=True)
        del params
    meta = {"device": device_name(), "copy_bandwidth_GBps": round(bw / 1e9, 1),
            "dtype": p["dtype"], "jax": jax.__version__, "peak_bytes_in_use": peak_memory()}
    cols = ["model", "batch", "prompt", "new_tokens", "prefill_s", "decode_ms_per_step",
            "tokens_per_s", "floor_ms_per_step", "fraction_of_floor"]
    out = Path(args.out)
    md = write_table(rows, cols, out, f"Decode throughput ({meta['device']})", meta)
    plot(rows, out)
    print(md)
    return 0


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['model']}\nb={r['batch']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.5))
    ax.bar(x - 0.2, [r["decode_ms_per_step"] for r in rows], 0.4, label="measured")
    ax.bar(x + 0.2, [r["floor_ms_per_step"] for r in rows], 0.4, label="bandwidth floor")
    ax.set_xticks(x, labels)
    ax.set_ylabel("ms per decode step")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
