"""`jaxturbo rl`: GRPO or PPO post-training on a verifiable task (`jaxturbo.rl.run`)."""

from __future__ import annotations

import argparse
from typing import Any

from jaxturbo.cli.common import (
    add_compute_dtype_argument,
    add_config_argument,
    add_mesh_argument,
    add_model_argument,
    add_run_arguments,
    config_yaml,
    save_every_of,
)

NAME = "rl"
HELP = (
    "GRPO/PPO post-training on a verifiable task (arithmetic; calculator: multi-turn with a "
    "tool, grpo), rollouts in JAX or transformers"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    add_config_argument(p)
    p.add_argument(
        "--algo",
        default="grpo",
        choices=("grpo", "ppo"),
        help="grpo (group baseline, no critic) or ppo (value head, GAE)",
    )
    p.add_argument(
        "--task",
        default="arithmetic",
        choices=("arithmetic", "calculator"),
        help='arithmetic: "a+b=", one completion; calculator (grpo only): '
        '"a+b+c=" as a multi-turn episode, a turn "X+Y=" is answered by a '
        "calculator tool (its output is context, never trained), any other turn "
        "is the final answer",
    )
    p.add_argument(
        "--max-turns",
        type=int,
        default=3,
        help="calculator: policy turns per episode (tool calls + answer)",
    )
    p.add_argument(
        "--multi-turn-advantage",
        default="trajectory",
        choices=("trajectory", "step"),
        help="calculator: episode reward through --adv-estimator (trajectory) or "
        "per-turn returns-to-go normalised over the group (step)",
    )
    p.add_argument("--steps", type=int, required=True, help="rollout + update steps in total")
    p.add_argument(
        "--out",
        required=True,
        help="run directory: metrics.jsonl, eval.json, reward.png, tensorboard/, "
        "checkpoints/, config.yaml, hf/ (the final policy)",
    )
    p.add_argument(
        "--rollout-engine",
        default="jax",
        choices=("jax", "engine", "hf", "vllm"),
        help="jax: in-process static sampler; engine: the serving engine (paged KV "
        "cache, continuous batching, a group's samples share its prompt's "
        "pages; one device); hf: transformers fed in memory (slow, CPU); "
        "vllm: a vllm.LLM fed in memory (untested; needs vllm installed)",
    )
    p.add_argument(
        "--decode-steps",
        type=int,
        default=1,
        help="--rollout-engine engine: decode steps per device launch once every sample "
        "decodes (more spreads the host's per-step work over several tokens)",
    )
    p.add_argument("--prompts-per-step", type=int, default=8, help="problems per step")
    p.add_argument("--group-size", type=int, default=8, help="rollouts per prompt (GRPO's G)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per completion (turn)")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    p.add_argument("--max-operand", type=int, default=20, help="arithmetic operands in [0, N]")
    p.add_argument(
        "--chat",
        action="store_true",
        help="ask through the tokenizer's chat template (instruct models) instead of "
        'a raw "a+b=" prompt',
    )
    p.add_argument("--lr", type=float, default=1e-6, help="learning rate (constant)")
    p.add_argument(
        "--kl-coef", type=float, default=0.0, help="beta of the k3 KL to the start policy"
    )
    p.add_argument(
        "--adv-estimator",
        default="grpo",
        choices=("grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"),
        help="advantage estimator of --algo grpo (ppo always uses gae)",
    )
    p.add_argument(
        "--policy-loss",
        default="vanilla",
        choices=("vanilla", "gspo"),
        help="vanilla: PPO's clipped token ratio; gspo: the GSPO paper's sequence "
        "ratio, clipped per sequence",
    )
    p.add_argument(
        "--loss-agg-mode",
        default=None,
        choices=(
            "token-mean",
            "seq-mean-token-sum",
            "seq-mean-token-mean",
            "seq-mean-token-sum-norm",
        ),
        help="how token losses are averaged (default: the policy loss's: token-mean "
        "for vanilla, seq-mean-token-mean for gspo)",
    )
    p.add_argument(
        "--async",
        dest="async_rollouts",
        action="store_true",
        help="grpo: produce the next rollouts in a background thread while a step "
        "trains (truncated-IS correction of the stale policy)",
    )
    p.add_argument(
        "--max-staleness",
        type=int,
        default=1,
        help="with --async: how many updates old rollouts may be",
    )
    p.add_argument(
        "--eval-problems",
        type=int,
        default=64,
        help="fixed held-out problems scored greedily, never drawn for training "
        "(in any operand order; 0: no evaluation)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=10,
        help="score the held-out problems every K steps (0: only before and after)",
    )
    add_run_arguments(p, save_every=0)
    add_compute_dtype_argument(p)
    add_mesh_argument(p)  # rl: data and fsdp axes only (grpo); rollout rows split over both


def config_of(args: argparse.Namespace) -> Any:
    """The `jaxturbo.rl.run.RLRunConfig` of the flags."""
    from jaxturbo.rl.run import RLRunConfig

    model_dir = None
    if args.rollout_engine == "vllm":
        from jaxturbo.rl.rollout import vllm_available

        if vllm_available():  # else validate() says so, before the model is looked up
            from jaxturbo.bridge.registry import resolve_model

            model_dir = str(resolve_model(args.model))
    return RLRunConfig(
        out_dir=args.out,
        steps=args.steps,
        algo=args.algo,
        task=args.task,
        max_turns=args.max_turns,
        multi_turn_advantage=args.multi_turn_advantage,
        rollout_engine=args.rollout_engine,
        model_dir=model_dir,
        decode_steps=args.decode_steps,
        prompts_per_step=args.prompts_per_step,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        max_operand=args.max_operand,
        chat=args.chat,
        lr=args.lr,
        kl_coef=args.kl_coef,
        adv_estimator=args.adv_estimator,
        policy_loss=args.policy_loss,
        loss_agg_mode=args.loss_agg_mode,
        async_rollouts=args.async_rollouts,
        max_staleness=args.max_staleness,
        eval_problems=args.eval_problems,
        eval_every=args.eval_every,
        save_every=save_every_of(args),
        keep=args.keep,
        resume=args.resume,
        seed=args.seed,
        compute_dtype=args.compute_dtype,
        mesh=args.mesh,
    )


def run(args: argparse.Namespace) -> int:
    config = config_of(args)
    config.validate()  # before the model loads
    if config.mesh:  # a wrong device count fails before the model loads too
        from jaxturbo.parallel.mesh import make_mesh

        make_mesh(config.mesh)
    import jax.numpy as jnp

    from jaxturbo.bridge import export_hf, load_model
    from jaxturbo.rl.run import run_rl

    cfg, params, tok = load_model(args.model, dtype=jnp.float32)

    def export(p, out):
        return export_hf(p, cfg, out, tokenizer=tok, overwrite=True)

    run_rl(
        config,
        cfg,
        params,
        tok,
        export=None if args.no_export else export,
        files={"config.yaml": config_yaml(args._parser, args)},
    )
    return 0
