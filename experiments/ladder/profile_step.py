"""Kernel-level profile of one GPU's share of a TP-4 Llama-3-8B decode step (no collectives).

A TP-4 decode step runs, on each GPU, the model with a quarter of the heads, KV heads,
MLP width and vocabulary.  This script builds exactly that shard as a one-GPU model (random
bf16 weights), decodes through the foundation's `_generate` loop (layers unrolled, as
`ladder_bench.py` does) under `jax.profiler`, and sums the GPU kernel time per kernel name
from the Perfetto trace.  Output: kernels per decode step, busy time per step (sum of kernel
durations), wall time per step, and the gap (wall - busy) that launch overhead and the loop's
host round trip cost.  This is `desync`'s compute, the upper bound of what Ladder can reach.

  python experiments/ladder/profile_step.py --out $OUT/profile     # one GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

if "--xla_gpu_enable_triton_gemm" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_util import kernel_summary  # noqa: E402

from jaxturbo.generate.decode import _generate  # noqa: E402
from jaxturbo.generate.sampling import SamplingParams  # noqa: E402
from jaxturbo.models.config import ModelConfig  # noqa: E402
from jaxturbo.models.transformer import forward  # noqa: E402
from jaxturbo.train.init import init_params  # noqa: E402

TP = int(os.environ.get("PROFILE_TP", "4"))
SHARD = ModelConfig(model_type="llama", vocab_size=128256 // TP, hidden_size=4096,
                    intermediate_size=14336 // TP,
                    num_hidden_layers=int(os.environ.get("PROFILE_LAYERS", "32")),
                    num_attention_heads=32 // TP, num_key_value_heads=8 // TP, head_dim=128,
                    rope_theta=500000.0, max_position_embeddings=8192)


@dataclasses.dataclass(frozen=True)
class Unrolled:
    """`forward` with the layers unrolled, hashable so `_generate` can take it as model_fn."""

    def __call__(self, *args, **kwargs):
        return forward(*args, unroll=True, **kwargs)


UNROLLED = Unrolled()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--out", default="/tmp/profile")
    ap.add_argument("--scan", action="store_true", help="lax.scan over layers (default: unrolled)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params = init_params(SHARD, jax.random.key(0), jnp.bfloat16)
    toks = jnp.asarray(np.random.RandomState(0).randint(0, SHARD.vocab_size, (1, args.prompt)), jnp.int32)
    lens = jnp.full((1,), args.prompt, jnp.int32)

    def gen(n: int):
        return _generate(params, toks, lens, jax.random.key(0), jnp.asarray([-1], jnp.int32),
                         cfg=SHARD, max_new_tokens=n, sampling=SamplingParams(), stream=None,
                         attn_impl="auto", cache_dtype="bfloat16",
                         model_fn=None if args.scan else UNROLLED)

    def wall(n: int) -> float:
        jax.block_until_ready(gen(n))
        t = time.perf_counter()
        jax.block_until_ready(gen(n))
        return time.perf_counter() - t

    w1, wn = wall(1), wall(args.new + 1)
    wall_step = (wn - w1) / args.new
    trace_dir = out / "trace"
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        jax.block_until_ready(gen(args.new + 1))
    ks = kernel_summary(trace_dir, steps=args.new + 1)
    summary = {"device": jax.devices()[0].device_kind, "shard": "Llama-3-8B / TP 4",
               "layers": "scan" if args.scan else "unrolled",
               "wall_ms_per_step": wall_step * 1e3,
               "weights_GB": sum(a.size * 2 for a in jax.tree.leaves(params)) / 1e9, **ks}
    (out / "profile_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "top"}, indent=1))
    for r in summary["top"][:25]:
        print(f"{r['us_per_step']:9.1f} us  x{r['per_step']:6.2f}  {r['kernel']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
