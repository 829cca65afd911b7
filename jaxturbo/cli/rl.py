"""`jaxturbo rl`: GRPO or PPO post-training on a verifiable task (synchronous, one host)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from jaxturbo.cli.common import add_mesh_argument, add_model_arguments
from jaxturbo.errors import UserError

NAME = "rl"
HELP = ("GRPO/PPO post-training on a verifiable task (arithmetic; calculator: multi-turn with a "
        "tool, grpo), rollouts in JAX or transformers")
TASKS = ("arithmetic", "calculator")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--algo", default="grpo", choices=("grpo", "ppo"),
                   help="grpo (group baseline, no critic) or ppo (value head, GAE)")
    p.add_argument("--task", default="arithmetic", choices=TASKS,
                   help="arithmetic: \"a+b=\", one completion; calculator (grpo only): "
                        "\"a+b+c=\" as a multi-turn episode, a turn \"X+Y=\" is answered by a "
                        "calculator tool (its output is context, never trained), any other turn "
                        "is the final answer")
    p.add_argument("--max-turns", type=int, default=3,
                   help="calculator: policy turns per episode (tool calls + answer)")
    p.add_argument("--multi-turn-advantage", default="trajectory", choices=("trajectory", "step"),
                   help="calculator: episode reward through --adv-estimator (trajectory) or "
                        "per-turn returns-to-go normalised over the group (step)")
    p.add_argument("--steps", type=int, required=True, help="rollout + update steps")
    p.add_argument("--out", required=True,
                   help="run directory: metrics.jsonl, eval.json, reward.png")
    p.add_argument("--rollout-engine", default="jax", choices=("jax", "hf", "vllm"),
                   help="jax: in-process sampler; hf: transformers fed in memory (slow, CPU); "
                        "vllm: a vllm.LLM fed in memory (untested; needs vllm installed)")
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
                   help="fixed held-out problems scored greedily, never drawn for training "
                        "(in any operand order; 0: no evaluation)")
    p.add_argument("--eval-every", type=int, default=10,
                   help="score the held-out problems every K steps (0: only before and after)")
    p.add_argument("--save-every", type=int, default=0,
                   help="orbax checkpoint every N steps and at the end (0: never)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept (newest)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in OUT/checkpoints")
    p.add_argument("--seed", type=int, default=0)
    add_mesh_argument(p)  # rl: data and fsdp axes only (grpo); rollout rows split over both


def _check_args(args: argparse.Namespace) -> None:
    """Every refusal that needs no model: one UserError naming the bad value."""
    if args.task == "calculator" and args.algo != "grpo":
        raise UserError(f"--task calculator (multi-turn) is implemented for --algo grpo only "
                        f"(got --algo {args.algo})")
    if args.max_turns < 1:
        raise UserError(f"--max-turns {args.max_turns}: must be >= 1")
    if args.async_rollouts and args.algo != "grpo":
        raise UserError("--async is implemented for --algo grpo only")
    min_group = 2 if args.algo == "grpo" else 1  # GRPO's baseline is the group
    if args.steps < 1 or args.group_size < min_group or args.prompts_per_step < 1:
        raise UserError(f"need --steps >= 1, --group-size >= {min_group} for {args.algo}, "
                        f"--prompts-per-step >= 1 (got {args.steps}, {args.group_size}, "
                        f"{args.prompts_per_step})")
    for flag, value, low in (("--eval-every", args.eval_every, 0),
                             ("--eval-problems", args.eval_problems, 0),
                             ("--save-every", args.save_every, 0), ("--keep", args.keep, 1),
                             ("--max-operand", args.max_operand, 0)):
        if value < low:
            raise UserError(f"{flag} {value}: must be >= {low}")
    from jaxturbo.rl.envs import ArithmeticTask
    # a held-out set that leaves no training problem is refused before the model loads
    ArithmeticTask(lambda text: [], lambda ids: "", max_operand=args.max_operand,
                   operands=3 if args.task == "calculator" else 2,
                   held_out_size=args.eval_problems)
    if args.resume and args.save_every < 1:
        raise UserError("--resume needs --save-every N >= 1 (the resumed run saves checkpoints "
                        f"too); got --save-every {args.save_every}")
    if args.mesh:
        from jaxturbo.parallel.mesh import parse_mesh_spec
        sizes = parse_mesh_spec(args.mesh)
        bad = ",".join(f"{a}={n}" for a, n in sizes.items() if a in ("tensor", "sequence") and n > 1)
        if bad:
            raise UserError(f"--mesh {args.mesh}: jaxturbo rl supports the data and fsdp axes only "
                            f"(got {bad}); e.g. --mesh data=N or --mesh data=N,fsdp=M")
        if args.algo != "grpo":
            raise UserError(f"--mesh is implemented for --algo grpo only (got --algo {args.algo})")
    if args.rollout_engine == "vllm":
        from jaxturbo.rl.rollout import vllm_available
        if not vllm_available():
            raise UserError("--rollout-engine vllm: vllm is not installed in this environment "
                            "(pip install vllm on a GPU machine); choose jax or hf")


def run_meta(args: argparse.Namespace, model_cfg: Any, learner_cfg: Any, optimizer: Any,
             train: Any) -> dict[str, Any]:
    """What a checkpoint must share with the run resuming it, as JSON values (tuples become
    lists, so a saved meta compares equal to a fresh one)."""
    meta = {"model": model_cfg.to_hf_dict(), "algo": args.algo, "task": args.task,
            "chat": args.chat, "max_operand": args.max_operand, "seed": args.seed,
            "eval_problems": args.eval_problems,  # the held-out set is excluded from training
            "learner": dataclasses.asdict(learner_cfg), "optimizer": dataclasses.asdict(optimizer),
            "train": dataclasses.asdict(train)}
    if args.task == "calculator":
        meta["max_turns"] = args.max_turns
    return json.loads(json.dumps(meta))


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    import jax.numpy as jnp

    from jaxturbo.bridge import load_model
    from jaxturbo.bridge.registry import resolve_model
    from jaxturbo.rl.advantages import AdvantageConfig
    from jaxturbo.rl.envs import ArithmeticTask
    from jaxturbo.rl.grpo import GRPOConfig, GRPOLearner, mean_reward
    from jaxturbo.rl.multiturn import CalculatorEnv, MultiTurnTask
    from jaxturbo.rl.ppo import PPOConfig, PPOLearner
    from jaxturbo.rl.policy_loss import PolicyLossConfig
    from jaxturbo.rl.rollout import HFEngine, VLLMEngine
    from jaxturbo.train.metrics import JsonlWriter
    from jaxturbo.train.optimizer import OptimizerConfig
    from jaxturbo.train.step import TrainConfig

    mesh = None
    if args.mesh:  # before the model loads: a wrong device count fails at once
        from jaxturbo.parallel.mesh import make_mesh
        mesh = make_mesh(args.mesh)
    wall0 = time.perf_counter()
    cfg, params, tok = load_model(args.model, dtype=jnp.float32)

    def plain(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)
    calc = args.task == "calculator"
    if args.chat:
        def encode(text: str) -> list[int]:
            chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
            return tok.encode(chat, add_special_tokens=False)
        template = ("What is {a}+{b}+{c}? You may use a calculator: write X+Y= and it replies "
                    "with the value. Give the final answer as the number only." if calc else
                    "What is {a}+{b}? Answer with the number only.")
    else:
        encode = plain
        template = "{a}+{b}+{c}=" if calc else "{a}+{b}="
    # the held-out problems are drawn first (their own RNG: every evaluation and every resumed
    # run scores the same prompts) and the training sampler never draws one of them
    problems = ArithmeticTask(encode, tok.decode, max_operand=args.max_operand, template=template,
                              operands=3 if calc else 2, held_out_size=args.eval_problems,
                              held_out_seed=10_000 + args.seed)
    stop = tuple(cfg.eos_token_id) + tuple(plain("\n")[-1:])
    longest_prompt = len(encode(template.format(**{k: args.max_operand for k in "abc"})))
    completion_tokens = args.max_new_tokens
    task: Any = problems
    if calc:
        # a tool call ends its turn at "="; a reply is at most the turn's digits + sign + "\n"
        stop += tuple(plain("=")[-1:])
        task = MultiTurnTask(problems, CalculatorEnv(
            plain, lambda ids: tok.decode(ids, skip_special_tokens=True)), max_turns=args.max_turns,
                             max_tool_tokens=args.max_new_tokens + 2)
        completion_tokens = task.max_episode_tokens(args.max_new_tokens)
    common = dict(prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  seq_len=longest_prompt + completion_tokens + 8, kl_coef=args.kl_coef,
                  policy=PolicyLossConfig(loss_agg_mode=args.loss_agg_mode))
    if args.rollout_engine == "hf":
        engine = HFEngine(cfg, params)
    elif args.rollout_engine == "vllm":
        engine = VLLMEngine(cfg, params, model_dir=str(resolve_model(args.model)), seed=args.seed)
    else:
        engine = None
    optimizer = OptimizerConfig(learning_rate=args.lr, warmup_steps=0, total_steps=args.steps,
                                weight_decay=0.0)
    train = TrainConfig(compute_dtype=args.dtype)
    kw = dict(engine=engine, stop_ids=stop, seed=args.seed, optimizer=optimizer, train=train)
    if args.algo == "grpo":
        lcfg = GRPOConfig(**common, advantage=AdvantageConfig(args.adv_estimator),
                          rollout_mode="async" if args.async_rollouts else "sync",
                          max_staleness=args.max_staleness,
                          multi_turn_advantage=args.multi_turn_advantage)
        learner = GRPOLearner(cfg, params, task, lcfg, mesh=mesh, **kw)
    else:
        lcfg = PPOConfig(**common)
        learner = PPOLearner(cfg, params, task, lcfg, **kw)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    ckpt, start = None, 0
    meta = run_meta(args, cfg, lcfg, optimizer, train)
    if args.save_every > 0:
        # imported only here: orbax is an optional dependency (absent on the GPU machine)
        from jaxturbo.train.checkpoint import Checkpointer
        ckpt = Checkpointer(out / "checkpoints", every=args.save_every, keep=args.keep)
        latest = ckpt.latest_step()
        if args.resume and latest is None:
            raise UserError(f"--resume: no checkpoint in {out / 'checkpoints'}; run without "
                            "--resume to start")
        if args.resume:
            state, host = ckpt.restore(latest, learner.checkpoint_state()[0], meta)
            learner.restore(state, host)
            start = latest
        elif latest is not None:
            raise UserError(f"{out / 'checkpoints'} already holds checkpoints (latest step "
                            f"{latest}); pass --resume to continue that run, or choose a new --out")
    if start >= args.steps:
        raise UserError(f"--resume: the checkpoint is at step {start}, which is already "
                        f"--steps {args.steps}; nothing to do")
    log = JsonlWriter(out / "metrics.jsonl", resume_step=start if args.resume else None)
    # fixed prompts: equal shapes, one compiled sampler for all evaluations
    held = task.held_out()
    curve = [{"step": r["step"], "held_out_reward": r["held_out_reward"]}
             for r in log.read() if r.get("kind") == "eval"]

    def evaluate(step: int) -> None:
        if not held or (curve and curve[-1]["step"] == step):
            return
        r = mean_reward(learner.engine, task, held, max_new_tokens=args.max_new_tokens,
                        stop_ids=stop)
        curve.append({"step": step, "held_out_reward": r})
        log.write({"kind": "eval", "step": step, "held_out_reward": r})
        _say(f"held-out reward at step {step}: {r:.3f}", bar)

    bar = None
    if sys.stderr.isatty():  # a bar only on a terminal; logs get one plain line per step
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=start, desc=f"rl {args.algo}", unit="step",
                   file=sys.stderr, dynamic_ncols=True)
    rollout_tokens = rollout_s = 0.0
    try:
        evaluate(start)
        for step in range(start + 1, args.steps + 1):
            t0 = time.perf_counter()
            m = learner.step()
            m.update(kind="train", step=step, step_s=time.perf_counter() - t0)
            m["rollout_tokens_per_s"] = m["rollout_tokens"] / max(m["rollout_s"], 1e-9)
            rollout_tokens += m["rollout_tokens"]
            rollout_s += m["rollout_s"]
            log.write(m)
            if bar is not None:
                bar.set_postfix(reward=f"{m['reward_mean']:.3f}", kl=f"{m.get('kl', 0.0):.4f}",
                                tok_s=f"{m['rollout_tokens_per_s']:.0f}")
                bar.update(1)
            else:
                print(f"step {step}/{args.steps}  reward {m['reward_mean']:.3f}  "
                      f"kl {m.get('kl', 0.0):.4f}  kept {int(m['kept'])}  "
                      f"{m['rollout_tokens_per_s']:.0f} rollout tok/s", file=sys.stderr)
            if ckpt is not None:
                state, host = learner.checkpoint_state()
                ckpt.save(step, state, host, meta, force=step == args.steps)
            if args.eval_every and step % args.eval_every == 0:
                evaluate(step)
        evaluate(args.steps)
    finally:
        if bar is not None:
            bar.close()
        if args.algo == "grpo":
            learner.close()
        if ckpt is not None:
            ckpt.close()  # waits for the asynchronous writes
    wall = time.perf_counter() - wall0
    tok_s = rollout_tokens / max(rollout_s, 1e-9)
    plot_reward(out / "metrics.jsonl", out / "reward.png")
    summary = {"held_out_problems": len(held), "steps": args.steps, "resumed_from": start,
               "seconds": wall, "rollout_tokens_per_s": tok_s, "curve": curve}
    if curve:
        summary.update(before=curve[0]["held_out_reward"], after=curve[-1]["held_out_reward"])
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    held_txt = (f"held-out reward {summary['before']:.3f} (step {curve[0]['step']}) -> "
                f"{summary['after']:.3f} (step {curve[-1]['step']}) on {len(held)} problems; "
                if curve else "")
    print(f"{held_txt}{args.steps - start} steps in {wall:.1f} s wall; mean rollout "
          f"{tok_s:.0f} tok/s; {out}", file=sys.stderr)
    return 0


def _say(msg: str, bar: Any) -> None:
    """A line on stderr that does not break a live progress bar."""
    if bar is not None:
        bar.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr)


def plot_reward(metrics_path: Path, png: Path) -> None:
    """Mean rollout reward per training step and the held-out reward curve, as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in recs if r.get("kind", "train") == "train"]
    held = [r for r in recs if r.get("kind") == "eval"]
    if not recs:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot([r["step"] for r in train], [r["reward_mean"] for r in train], lw=1,
                label="rollout reward (sampled)")
    if held:
        ax.plot([r["step"] for r in held], [r["held_out_reward"] for r in held], "o-", lw=1.5,
                label="held-out reward (greedy)")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
