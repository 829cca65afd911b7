"""Training throughput: tokens/s and MFU of the jaxturbo train step (AdamW, f32 master, bf16).

    python experiments/train_bench.py --preset tiny        # CPU smoke run
    python experiments/train_bench.py --preset llama-1b    # one H100: Llama-3.2-1B shape, seq 4096

Random weights and tokens, one document per row.  Attention: cuDNN flash attention through
`jax.nn.dot_product_attention` on GPU (passed as the model's `attn_fn`), the jnp reference on
CPU.  MFU counts model FLOPs (`jaxturbo.train.metrics.train_flops_per_token`: 6N + causal
attention) against the card's dense bf16 peak.  Writes experiments/train/results_<preset>.json
and .md; prints the table last.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxturbo.models.config import ModelConfig
from jaxturbo.train.init import init_params
from jaxturbo.train.metrics import peak_flops, train_flops_per_token
from jaxturbo.train.optimizer import OptimizerConfig, make_optimizer
from jaxturbo.train.step import TrainConfig, init_state, make_train_step, sft_loss

PRESETS = {
    # Llama-3.2-1B: 16 layers, d 2048, GQA 32/8 heads of 64, vocab 128256, tied embeddings
    "llama-1b": dict(cfg=ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                     num_hidden_layers=16, num_attention_heads=32,
                                     num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                                     tie_word_embeddings=True, max_position_embeddings=8192),
                     seq=4096, runs=[(2, "none"), (4, "dots")], steps=8),
    "tiny": dict(cfg=ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16),
                 seq=128, runs=[(2, "none"), (2, "full")], steps=3),
}


def cudnn_attention(q, k, v, segment_ids=None):
    """Causal flash attention (cuDNN); rows are single documents here, so no segment mask."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def bench_one(cfg: ModelConfig, seq: int, batch: int, remat: str, steps: int) -> dict:
    on_gpu = jax.devices()[0].platform == "gpu"
    tc = TrainConfig(compute_dtype="bfloat16", remat=remat)
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_steps=1, total_steps=1000))
    params = init_params(cfg, jax.random.key(0))
    state = init_state(params, opt)
    del params
    loss = sft_loss(cfg, tc, attn_fn=cudnn_attention if on_gpu else None)
    step = make_train_step(cfg, tc, opt, loss_fn=loss)
    rs = np.random.RandomState(0)
    toks = jnp.asarray(rs.randint(0, cfg.vocab_size, (batch, seq + 1)), jnp.int32)
    b = {"tokens": toks[:, :-1], "targets": toks[:, 1:], "weights": jnp.ones((batch, seq)),
         "segment_ids": jnp.ones((batch, seq), jnp.int32),
         "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))}
    t0 = time.perf_counter()
    state, m = step(state, b)
    first_loss = float(m["loss"])
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, b)
        float(m["loss"])  # block on the step
        times.append(time.perf_counter() - t)
    dt = float(np.median(times))
    tokens = batch * seq
    flops = train_flops_per_token(cfg, seq) * tokens
    peak = peak_flops()
    mem = jax.devices()[0].memory_stats() or {}
    return {"batch": batch, "seq": seq, "remat": remat, "step_s": dt, "tokens_per_s": tokens / dt,
            "tflops_per_s": flops / dt / 1e12, "mfu": flops / dt / peak if peak else None,
            "peak_gib": mem.get("peak_bytes_in_use", 0) / 2 ** 30, "first_loss": first_loss,
            "compile_s": compile_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="skip further configurations once this much time has passed")
    args = ap.parse_args()
    p = PRESETS[args.preset]
    cfg = p["cfg"]
    dev = jax.devices()[0]
    rows, t_start = [], time.perf_counter()
    for batch, remat in p["runs"]:
        if time.perf_counter() - t_start > args.budget_s:
            rows.append({"batch": batch, "remat": remat, "error": "skipped: time budget"})
            continue
        try:
            rows.append(bench_one(cfg, p["seq"], batch, remat, p["steps"]))
        except Exception as e:  # an OOM of one configuration should not lose the others
            rows.append({"batch": batch, "remat": remat, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(__file__).parent / "train"
    out.mkdir(exist_ok=True)
    result = {"preset": args.preset, "device": dev.device_kind, "params": cfg.num_params(),
              "flops_per_token": train_flops_per_token(cfg, p["seq"]), "rows": rows}
    (out / f"results_{args.preset}.json").write_text(json.dumps(result, indent=1))
    lines = [f"train step, {args.preset} ({cfg.num_params() / 1e9:.2f} B params), {dev.device_kind}",
             "", "| batch x seq | remat | step s | tokens/s | TFLOP/s | MFU | peak GiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch']} x {p['seq']} | {r['remat']} | {r['error']} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['batch']} x {r['seq']} | {r['remat']} | {r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {r['tflops_per_s']:.1f} | {mfu} | {r['peak_gib']:.1f} |")
    table = "\n".join(lines)
    (out / f"results_{args.preset}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
