"""Perplexity of a `jaxturbo sft` checkpoint's params and of the base model on a text file.

    python experiments/train/eval_checkpoint.py --model smollm2-135m --run RUN_DIR \
        --data FILE --tokens 4096 --window 128

Used for the held-out number of the 200-step WikiText run (README.md): the same first N tokens
(text paragraphs as `jaxturbo sft` tokenizes them) scored by both models, in windows.
"""

from __future__ import annotations

import argparse
import json

import jax
import orbax.checkpoint as ocp

from jaxturbo.bridge import load_model
from jaxturbo.cli.sft import _held_in_tokens
from jaxturbo.data import read_records
from jaxturbo.inference.perplexity import perplexity
from jaxturbo.train.checkpoint import Checkpointer
from jaxturbo.train.optimizer import OptimizerConfig, make_optimizer
from jaxturbo.train.step import init_state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--run", required=True, help="the --out directory of a jaxturbo sft run")
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=128)
    args = ap.parse_args()
    cfg, params, tok = load_model(args.model, progress=False)
    ids = _held_in_tokens(read_records(args.data), tok, args.tokens)
    ckpt = Checkpointer(f"{args.run}/checkpoints", every=1)
    step = ckpt.latest_step()
    # the optimizer's hyper-parameters do not change the state's structure: defaults will do
    like = init_state(params, make_optimizer(OptimizerConfig()))
    state = ckpt._mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like))))["state"]
    out = {"data": args.data, "tokens": int(len(ids)), "window": args.window, "step": step,
           "base": perplexity(params, cfg, ids, window=args.window).perplexity,
           "trained": perplexity(state.params, cfg, ids, window=args.window).perplexity}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
