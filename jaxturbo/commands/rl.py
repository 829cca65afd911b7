"""`jaxturbo rl`: GRPO or PPO post-training on a verifiable task (synchronous, one host)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jaxturbo.commands._common import add_model_arguments
from jaxturbo.errors import UserError

NAME = "rl"
HELP = "GRPO/PPO post-training on a verifiable task (arithmetic), rollouts in JAX or transformers"
TASKS = ("arithmetic",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--algo", default="grpo", choices=("grpo", "ppo"),
                   help="grpo (group baseline, no critic) or ppo (value head, GAE)")
    p.add_argument("--task", default="arithmetic", choices=TASKS)
    p.add_argument("--steps", type=int, required=True, help="rollout + update steps")
    p.add_argument("--out", required=True,
                   help="run directory: metrics.jsonl, eval.json, reward.png")
    p.add_argument("--rollout-engine", default="jax", choices=("jax", "hf", "vllm"),
                   help="jax: in-process sampler; hf: transformers fed in memory (slow, CPU); "
                        "vllm: not implemented")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8, help="rollouts per prompt (GRPO's G)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-operand", type=int, default=20, help="arithmetic operands in [0, N]")
    p.add_argument("--chat", action="store_true",
                   help="ask through the tokenizer's chat template (instruct models) instead of "
                        "a raw \"a+b=\" prompt")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--kl-coef", type=float, default=0.0, help="beta of the k3 KL to the start policy")
    p.add_argument("--adv-estimator", default="grpo",
                   choices=("grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"),
                   help="advantage estimator of --algo grpo (ppo always uses gae)")
    p.add_argument("--loss-agg-mode", default="token-mean",
                   choices=("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                            "seq-mean-token-sum-norm"))
    p.add_argument("--async", dest="async_rollouts", action="store_true",
                   help="grpo: produce the next rollouts in a background thread while a step "
                        "trains (truncated-IS correction of the stale policy)")
    p.add_argument("--max-staleness", type=int, default=1,
                   help="with --async: how many updates old rollouts may be")
    p.add_argument("--eval-problems", type=int, default=64,
                   help="held-out problems scored greedily before and after (0: none)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.rollout_engine == "vllm":
        raise UserError("--rollout-engine vllm is not implemented; use jax or hf")
    if args.async_rollouts and args.algo != "grpo":
        raise UserError("--async is implemented for --algo grpo only")
    min_group = 2 if args.algo == "grpo" else 1  # GRPO's baseline is the group
    if args.steps < 1 or args.group_size < min_group or args.prompts_per_step < 1:
        raise UserError(f"need --steps >= 1, --group-size >= {min_group} for {args.algo}, "
                        f"--prompts-per-step >= 1 (got {args.steps}, {args.group_size}, "
                        f"{args.prompts_per_step})")
    import jax.numpy as jnp
    import numpy as np

    from jaxturbo.bridge import load_model
    from jaxturbo.rl.advantages import AdvantageConfig
    from jaxturbo.rl.envs import ArithmeticTask
    from jaxturbo.rl.grpo import GRPOConfig, GRPOLearner, mean_reward
    from jaxturbo.rl.ppo import PPOConfig, PPOLearner
    from jaxturbo.rl.policy_loss import PolicyLossConfig
    from jaxturbo.rl.rollout import HFEngine
    from jaxturbo.train.optimizer import OptimizerConfig
    from jaxturbo.train.step import TrainConfig

    cfg, params, tok = load_model(args.model, dtype=jnp.float32)
    if args.chat:
        def encode(text: str) -> list[int]:
            chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
            return tok.encode(chat, add_special_tokens=False)
        template = "What is {a}+{b}? Answer with the number only."
    else:
        def encode(text: str) -> list[int]:
            return tok.encode(text, add_special_tokens=False)
        template = "{a}+{b}="
    task = ArithmeticTask(encode, tok.decode, max_operand=args.max_operand, template=template)
    stop = tuple(cfg.eos_token_id) + tuple(tok.encode("\n", add_special_tokens=False)[-1:])
    longest_prompt = len(task.encode(task.template.format(a=args.max_operand, b=args.max_operand)))
    common = dict(prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  seq_len=longest_prompt + args.max_new_tokens + 8, kl_coef=args.kl_coef,
                  policy=PolicyLossConfig(loss_agg_mode=args.loss_agg_mode))
    engine = HFEngine(cfg, params) if args.rollout_engine == "hf" else None
    kw = dict(engine=engine, stop_ids=stop, seed=args.seed,
              optimizer=OptimizerConfig(learning_rate=args.lr, warmup_steps=0,
                                        total_steps=args.steps, weight_decay=0.0),
              train=TrainConfig(compute_dtype=args.dtype))
    if args.algo == "grpo":
        learner = GRPOLearner(cfg, params, task, GRPOConfig(
            **common, advantage=AdvantageConfig(args.adv_estimator),
            rollout_mode="async" if args.async_rollouts else "sync",
            max_staleness=args.max_staleness), **kw)
    else:
        learner = PPOLearner(cfg, params, task, PPOConfig(**common), **kw)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    held = task.sample(args.eval_problems, np.random.default_rng(10_000 + args.seed))
    evals: dict[str, float] = {}

    def evaluate(name: str) -> None:
        if held:
            evals[name] = mean_reward(learner.engine, task, held, max_new_tokens=args.max_new_tokens,
                                      stop_ids=stop)
            print(f"held-out reward {name}: {evals[name]:.3f}", file=sys.stderr)

    evaluate("before")
    start = time.perf_counter()
    with open(out / "metrics.jsonl", "a") as f:
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            m = learner.step()
            m.update(step=step, step_s=time.perf_counter() - t0)
            m["rollout_tokens_per_s"] = m["rollout_tokens"] / max(m["rollout_s"], 1e-9)
            f.write(json.dumps(m) + "\n")
            f.flush()
            print(f"step {step}/{args.steps}  reward {m['reward_mean']:.3f}  "
                  f"kl {m.get('kl', 0.0):.4f}  kept {int(m['kept'])}  "
                  f"{m['rollout_tokens_per_s']:.0f} rollout tok/s", file=sys.stderr)
    if args.algo == "grpo":
        learner.close()
    evaluate("after")
    plot_reward(out / "metrics.jsonl", out / "reward.png")
    (out / "eval.json").write_text(json.dumps(
        {"held_out_problems": len(held), "steps": args.steps,
         "seconds": time.perf_counter() - start, **evals}, indent=1))
    return 0


def plot_reward(metrics_path: Path, png: Path) -> None:
    """Training reward (mean over each step's rollouts) against step, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not recs:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in recs], [r["reward_mean"] for r in recs], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("mean rollout reward")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
