"""Decode speed of an MLA model (absorbed latent decode) vs its GQA original at long context.

For each shape, context and KV budget: greedy decode steps over a cache already holding
`context` tokens per row (random contents: decode time does not depend on them), timed as
ms per step and tokens/s, next to the bytes each step must read (weights + cache) over the
copy bandwidth measured in the same run.  Both models run through the same loop
(`lax.fori_loop` of one-token forwards, argmax feedback) with attention implementation `auto`:
the GQA decode kernel for the original, `pallas_kernels.mla_decode_attention` for MLA.

  python experiments/mla_decode_bench.py --preset cpu    # seconds, a smoke run
  python experiments/mla_decode_bench.py --preset gpu    # SmolLM2 shape at 8K/32K, Llama-3-8B at 8K

MLA widths at budget b (DeepSeek layout, as `jaxturbo convert-mla` builds them):
rope key dr = head_dim/2, latent R = b * 2*K*hd - dr, nope/value head dims = head_dim.
Random weights (the speed does not depend on them).  Writes JSON + Markdown + a plot.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "--xla_gpu_enable_triton_gemm" not in os.environ.get("XLA_FLAGS", ""):
    # decode GEMVs are faster through cuBLAS than XLA's Triton GEMM fusions (generate_bench.py)
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import copy_bandwidth, device_name, time_fn, write_table  # noqa: E402
from generate_bench import LLAMA3_8B, SMOLLM2_SHAPE, TINY  # noqa: E402

from jaxturbo.models.config import ModelConfig  # noqa: E402
from jaxturbo.models.mla import MLAConfig, init_mla_cache, mla_forward  # noqa: E402
from jaxturbo.models.transformer import Params, forward, init_cache  # noqa: E402
from jaxturbo.train.init import init_params  # noqa: E402

SHAPES = {"smollm2-shape": SMOLLM2_SHAPE, "llama3-8b": LLAMA3_8B, "tiny": TINY}
PRESETS = {
    "cpu": dict(cases=[("tiny", 256)], batch=2, new=8, budgets=(0.5,), dtype="float32",
                copy_bytes=1 << 26),
    "gpu": dict(cases=[("smollm2-shape", 8192), ("smollm2-shape", 32768)],
                batch=16, new=128, budgets=(1.0, 0.5, 0.25), dtype="bfloat16",
                copy_bytes=1 << 31),
}


def mla_shape(cfg: ModelConfig, budget: float, pow2: bool = False) -> MLAConfig | None:
    """MLA widths spending `budget` of the GQA cache (values per token per layer).

    Default: convert-mla's split (rope key dr = head_dim/2, the rest latent: ranks like 160
    or 352, which take the XLA decode path).  pow2: the largest power-of-two latent with a
    power-of-two rope key (what the Pallas-Triton MLA decode kernel needs, DeepSeek-like).
    """
    total = int(round(budget * 2 * cfg.num_key_value_heads * cfg.head_dim))
    dr = cfg.head_dim // 2
    if pow2:
        dr = total - (1 << (total.bit_length() - 1))
        if dr == 0 or dr & (dr - 1):  # total is a power of two, or the rest is not one
            dr = (1 << (total.bit_length() - 1)) // 2
        if dr > cfg.head_dim:  # no such split with a rope key no wider than a head
            return None
    rank = total - dr
    if rank <= 0:
        raise ValueError(f"budget {budget} leaves no latent after a {dr}-dim rope key")
    return MLAConfig(base=cfg, kv_lora_rank=rank, qk_nope_head_dim=cfg.head_dim,
                     qk_rope_head_dim=dr, v_head_dim=cfg.head_dim, latent_norm=False)


def init_mla_params(mcfg: MLAConfig, key: jax.Array, dtype) -> Params:
    """Random MLA params: the GQA model's non-attention leaves plus MLA projections [out, in]."""
    cfg = mcfg.base
    p = init_params(cfg, key, dtype)
    layers = {k: v for k, v in p["layers"].items()
              if not k.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))}
    L, D, H = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads
    R, dn, dr, dv = mcfg.kv_lora_rank, mcfg.qk_nope_head_dim, mcfg.qk_rope_head_dim, mcfg.v_head_dim
    shapes = {"self_attn.q_proj.weight": (L, H * (dn + dr), D),
              "self_attn.kv_a_proj_with_mqa.weight": (L, R + dr, D),
              "self_attn.kv_b_proj.weight": (L, H * (dn + dv), R)}
    for i, (name, shape) in enumerate(shapes.items()):
        layers[name] = (0.02 * jax.random.normal(jax.random.fold_in(key, 1000 + i), shape)).astype(dtype)
    return {**p, "layers": layers}


def random_cache(cache: dict, context: int, key: jax.Array) -> dict:
    """Fill every array of a fresh cache with noise and mark `context` slots valid per row."""
    out = {}
    for i, (name, a) in enumerate(sorted(cache.items())):
        if name == "lengths":
            out[name] = jnp.full_like(a, context)
        else:
            # drawn in the cache dtype: a float32 draw of an 8B model's cache would not fit
            out[name] = jax.random.normal(jax.random.fold_in(key, i), a.shape, a.dtype)
    return out


def decode_loop(step_fn, steps: int):
    """jit(params, cache, tok) -> last tokens after `steps` greedy one-token steps."""
    @jax.jit
    def run(params, cache, tok):
        def body(_, carry):
            cache, tok = carry
            logits, cache = step_fn(params, tok[:, None], cache)
            return cache, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        _, tok = jax.lax.fori_loop(0, steps, body, (cache, tok))
        return tok
    return run


def nbytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def bench_case(name: str, context: int, budgets, batch: int, new: int, dtype, bw: float) -> list[dict]:
    cfg = SHAPES[name]
    key = jax.random.key(0)
    tok = jnp.zeros((batch,), jnp.int32)
    # cache slots a multiple of 256, as generation's buckets are: the decode kernels then tile
    # the cache without padding it (a pad would copy the whole cache every step)
    slots = -(-(context + new + 1) // 256) * 256
    rows = []
    variants = [("gqa", None)]
    for b in budgets:
        variants.append((f"mla@{b:g}", mla_shape(cfg, b)))
        m2 = mla_shape(cfg, b, pow2=True)
        if m2 is not None and m2.kv_lora_rank != variants[-1][1].kv_lora_rank:
            variants.append((f"mla@{b:g} pow2", m2))
    for label, mcfg in variants:
        if mcfg is None:
            params = init_params(cfg, key, dtype)
            cache = init_cache(cfg, batch, slots, dtype)
            step = lambda p, t, c: forward(p, cfg, t, cache=c, attn_impl="auto")  # noqa: E731
            kv_per_token = 2 * cfg.num_key_value_heads * cfg.head_dim
        else:
            params = init_mla_params(mcfg, key, dtype)
            cache = init_mla_cache(mcfg, batch, slots, dtype)
            step = lambda p, t, c, m=mcfg: mla_forward(p, m, t, cache=c, attn_impl="auto")  # noqa: E731
            kv_per_token = mcfg.kv_lora_rank + mcfg.qk_rope_head_dim
        cache = random_cache(cache, context, key)
        one, many = decode_loop(step, 1), decode_loop(step, new + 1)
        t1 = time_fn(lambda: one(params, cache, tok), repeats=3)
        tn = time_fn(lambda: many(params, cache, tok), repeats=3)
        per_step = (tn - t1) / new
        itemsize = jnp.dtype(dtype).itemsize
        weight_bytes = nbytes(params) - (0 if cfg.tie_word_embeddings else
                                         cfg.vocab_size * cfg.hidden_size * itemsize)
        kv_bytes = cfg.num_hidden_layers * kv_per_token * itemsize * batch * (context + new / 2)
        floor = (weight_bytes + kv_bytes) / bw
        on_gpu = jax.devices()[0].platform == "gpu"  # what "auto" picks (pallas_kernels.api)
        impl = "-" if mcfg is None else ("pallas" if on_gpu and all(
            n & (n - 1) == 0 for n in (mcfg.kv_lora_rank, mcfg.qk_rope_head_dim)) else "xla")
        rows.append({"shape": name, "model": label, "context": context, "batch": batch,
                     "kv_values_per_token_layer": kv_per_token,
                     "latent+rope": "-" if mcfg is None else
                     f"{mcfg.kv_lora_rank}+{mcfg.qk_rope_head_dim}", "mla_decode": impl,
                     "ms_per_step": per_step * 1e3, "tokens_per_s": batch / per_step,
                     "floor_ms": floor * 1e3, "fraction_of_floor": floor / per_step,
                     "kv_GB_read": kv_bytes / 1e9})
        r = rows[-1]
        print(f"{name} ctx {context} {label}: {r['tokens_per_s']:.0f} tok/s, {r['ms_per_step']:.3f} "
              f"ms/step (floor {r['floor_ms']:.3f})", flush=True)
        del params, cache
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_gqa"] = r["tokens_per_s"] / base
    return rows


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = sorted({(r["shape"], r["context"]) for r in rows}, key=lambda g: (g[0], g[1]))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 3.4), squeeze=False)
    for ax, (shape, ctx) in zip(axes[0], groups):
        rs = [r for r in rows if r["shape"] == shape and r["context"] == ctx]
        x = np.arange(len(rs))
        ax.bar(x, [r["tokens_per_s"] for r in rs])
        ax.set_xticks(x, [r["model"] for r in rs], rotation=30)
        ax.set_title(f"{shape}, ctx {ctx}, batch {rs[0]['batch']}", fontsize=9)
        ax.set_ylabel("decode tokens/s")
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--out", default="experiments/mla/decode")
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    bw = copy_bandwidth(p["copy_bytes"])
    rows = []
    for name, ctx in p["cases"]:
        try:
            rows += bench_case(name, ctx, p["budgets"], p["batch"], p["new"], jnp.dtype(p["dtype"]), bw)
        except Exception as e:  # one case running out of memory should not lose the others
            print(f"{name} ctx {ctx}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    meta = {"device": device_name(), "copy_bandwidth_GBps": round(bw / 1e9, 1), "dtype": p["dtype"],
            "new_tokens": p["new"], "jax": jax.__version__}
    cols = ["shape", "model", "context", "batch", "kv_values_per_token_layer", "latent+rope",
            "mla_decode", "ms_per_step",
            "tokens_per_s", "speedup_vs_gqa", "floor_ms", "fraction_of_floor"]
    out = Path(args.out)
    md = write_table(rows, cols, out, f"MLA vs GQA decode ({meta['device']})", meta)
    if rows:
        plot(rows, out)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
