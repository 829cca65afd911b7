"""A whole RL run on a verifiable task: the learner driven by the shared training loop.

    config = RLRunConfig(out_dir="run", steps=200, algo="grpo", chat=True)
    config.validate()                                  # before the model loads
    summary = run_rl(config, model_cfg, params, tokenizer, export=...)

What `jaxturbo rl` runs.  The learner (`GRPOLearner` or `PPOLearner`) gives the loop its data
(`next_rollouts`, whose position is the problem sampler's state) and its step (`update`);
`jaxturbo.train.trainer.train` adds the checkpoints (resume continues exactly, the held-out
set's settings in the checkpoint's metadata), metrics.jsonl, TensorBoard, the progress, the
held-out evaluation (greedy, on problems training never draws) and reward.png.  At the end:
eval.json (the held-out curve, throughput) and the final policy through `export` (out/hf).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from jaxturbo.errors import UserError
from jaxturbo.train.trainer import Exporter, LoopConfig, host_params, save_tokenizer

ALGOS = ("grpo", "ppo")
TASKS = ("arithmetic", "calculator")
ENGINES = ("jax", "engine", "hf", "vllm")


@dataclasses.dataclass(frozen=True)
class RLRunConfig:
    """An RL run.

    algo: "grpo" (group baseline, no critic) or "ppo" (value head, GAE).
    task: "arithmetic" ("a+b=", one completion) or "calculator" (grpo only: "a+b+c=" as a
      multi-turn episode of at most max_turns policy turns; a turn "X+Y=" is answered by a
      calculator tool whose output is context, never trained; any other turn is the answer).
    multi_turn_advantage: calculator: "trajectory" (the episode reward through adv_estimator) or
      "step" (per-turn returns-to-go normalised over the group).
    rollout_engine: "jax" (in-process static sampler), "engine" (the serving engine: paged KV
      cache, continuous batching, a group's samples sharing its prompt's pages), "hf"
      (transformers, in memory), "vllm"
      (untested; model_dir is the HF directory vLLM starts from).
    decode_steps: rollout_engine=engine: decode steps per device launch once every sample
      decodes (1: one per launch; more spreads the host's per-step work over several tokens).
    prompts_per_step, group_size: problems per step and rollouts per problem.
    max_new_tokens, temperature: rollout sampling; max_operand: operands in [0, N].
    chat: prompts through the tokenizer's chat template instead of a raw "a+b=".
    lr, kl_coef: learning rate (constant, no weight decay); beta of the k3 KL to the start policy.
    adv_estimator: grpo's advantage estimator (ppo always uses GAE).
    policy_loss, loss_agg_mode: see `jaxturbo.rl.policy_loss.PolicyLossConfig` (None: the
      policy loss's default aggregation).
    async_rollouts, max_staleness: grpo: rollouts in a background thread, at most N updates old.
    eval_problems, eval_every: held-out problems scored greedily before the first step, every N
      steps and after the last (0 problems: no evaluation).
    save_every, keep, resume: checkpoints every N steps and at the end (0: at the end only;
      None: none), the newest K kept; continue from the newest.
    compute_dtype: the train step's compute dtype (float32 master weights).
    mesh: a mesh spec over the data and fsdp axes (grpo only).
    """

    out_dir: str
    steps: int
    algo: str = "grpo"
    task: str = "arithmetic"
    max_turns: int = 3
    multi_turn_advantage: str = "trajectory"
    rollout_engine: str = "jax"
    model_dir: str | None = None
    decode_steps: int = 1
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    max_operand: int = 20
    chat: bool = False
    lr: float = 1e-6
    kl_coef: float = 0.0
    adv_estimator: str = "grpo"
    policy_loss: str = "vanilla"
    loss_agg_mode: str | None = None
    async_rollouts: bool = False
    max_staleness: int = 1
    eval_problems: int = 64
    eval_every: int = 10
    save_every: int | None = 0
    keep: int = 3
    resume: bool = False
    seed: int = 0
    compute_dtype: str = "float32"
    mesh: str | None = None
    progress: bool = True
    plot: bool = True
    tensorboard: bool = True

    def loop(self) -> LoopConfig:
        return LoopConfig(
            out_dir=self.out_dir,
            steps=self.steps,
            save_every=self.save_every,
            keep=self.keep,
            resume=self.resume,
            eval_every=self.eval_every,
            progress=self.progress,
            plot=self.plot,
            tensorboard=self.tensorboard,
            name=f"rl {self.algo}",
        )

    def validate(self) -> None:
        """Every refusal that needs no model: one UserError naming the bad field."""
        for name, value, valid in (
            ("algo", self.algo, ALGOS),
            ("task", self.task, TASKS),
            ("rollout_engine", self.rollout_engine, ENGINES),
        ):
            if value not in valid:
                raise UserError(f"{name}={value}: choose one of {', '.join(valid)}")
        if self.task == "calculator" and self.algo != "grpo":
            raise UserError(
                f"task=calculator (multi-turn) is implemented for algo=grpo only "
                f"(got algo={self.algo})"
            )
        if self.async_rollouts and self.algo != "grpo":
            raise UserError("async_rollouts=True is implemented for algo=grpo only")
        min_group = 2 if self.algo == "grpo" else 1  # GRPO's baseline is the group
        if self.group_size < min_group:
            raise UserError(f"group_size={self.group_size} must be >= {min_group} for {self.algo}")
        for name, low in (
            ("steps", 1),
            ("prompts_per_step", 1),
            ("max_turns", 1),
            ("max_new_tokens", 1),
            ("eval_every", 0),
            ("eval_problems", 0),
            ("keep", 1),
            ("max_operand", 0),
            ("max_staleness", 0),
            ("decode_steps", 1),
        ):
            if getattr(self, name) < low:
                raise UserError(f"{name}={getattr(self, name)}: must be >= {low}")
        self.loop().validate()
        from jaxturbo.rl.advantages import ADVANTAGE_ESTIMATORS
        from jaxturbo.rl.policy_loss import PolicyLossConfig

        if self.adv_estimator not in ADVANTAGE_ESTIMATORS or self.adv_estimator == "gae":
            raise UserError(
                f"adv_estimator={self.adv_estimator}: choose one of "
                f"{', '.join(k for k in ADVANTAGE_ESTIMATORS if k != 'gae')}"
            )
        try:
            PolicyLossConfig(self.policy_loss, loss_agg_mode=self.loss_agg_mode)
        except ValueError as e:
            raise UserError(str(e)) from None
        from jaxturbo.rl.envs import ArithmeticTask

        # a held-out set that leaves no training problem is refused before the model loads
        ArithmeticTask(
            lambda text: [],
            lambda ids: "",
            max_operand=self.max_operand,
            operands=3 if self.task == "calculator" else 2,
            held_out_size=self.eval_problems,
        )
        if self.mesh:
            from jaxturbo.parallel.mesh import parse_mesh_spec

            sizes = parse_mesh_spec(self.mesh)
            bad = ",".join(f"{a}={n}" for a, n in sizes.items() if a == "sequence" and n > 1)
            if bad:
                raise UserError(
                    f"mesh={self.mesh}: RL supports the data, fsdp and tensor axes (got "
                    f"{bad}); e.g. data=N or data=N,tensor=M"
                )
            if self.algo != "grpo":
                raise UserError(
                    f"mesh={self.mesh} is implemented for algo=grpo only (got algo={self.algo})"
                )
        if self.rollout_engine == "vllm":
            from jaxturbo.rl.rollout import vllm_available

            if not vllm_available():
                raise UserError(
                    "rollout_engine=vllm: vllm is not installed in this environment "
                    "(pip install vllm on a GPU machine); choose jax or hf"
                )
            if not self.model_dir:
                raise UserError(
                    "rollout_engine=vllm needs model_dir, the HF directory vLLM starts from"
                )


def run_meta(
    config: RLRunConfig, model_cfg: Any, learner_cfg: Any, optimizer: Any, train: Any
) -> dict[str, Any]:
    """What a checkpoint must share with the run resuming it, as JSON values (tuples become
    lists, so a saved meta compares equal to a fresh one)."""
    meta = {
        "model": model_cfg.to_hf_dict(),
        "algo": config.algo,
        "task": config.task,
        "chat": config.chat,
        "max_operand": config.max_operand,
        "seed": config.seed,
        "eval_problems": config.eval_problems,  # the held-out set is excluded from training
        "learner": dataclasses.asdict(learner_cfg),
        "optimizer": dataclasses.asdict(optimizer),
        "train": dataclasses.asdict(train),
    }
    if config.task == "calculator":
        meta["max_turns"] = config.max_turns
    return json.loads(json.dumps(meta))


class RolloutStream:
    """A learner's rollouts as the training loop's data source (its position: the learner's
    steps and problem sampler)."""

    def __init__(self, learner: Any):
        self.learner = learner

    def __iter__(self) -> RolloutStream:
        return self

    def __next__(self) -> Any:
        return self.learner.next_rollouts()

    def get_state(self) -> dict[str, Any]:
        return self.learner.data_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.learner.set_data_state(state)


def run_rl(
    config: RLRunConfig,
    model_cfg: Any,
    params: Any,
    tokenizer: Any,
    *,
    export: Exporter | None = None,
    files: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train (see the module docstring); returns the summary written to out_dir/eval.json.

    params: the initial policy (float32); tokenizer: a transformers tokenizer (prompts, tool
    output, the answers' text); files: written to out_dir when training starts (the trainer's
    `files`)."""
    config.validate()
    from jaxturbo.data.chat import encode_prompt
    from jaxturbo.rl.advantages import AdvantageConfig
    from jaxturbo.rl.envs import ArithmeticTask
    from jaxturbo.rl.grpo import GRPOConfig, GRPOLearner, mean_reward
    from jaxturbo.rl.multiturn import CalculatorEnv, MultiTurnTask
    from jaxturbo.rl.policy_loss import PolicyLossConfig
    from jaxturbo.rl.ppo import PPOConfig, PPOLearner
    from jaxturbo.rl.rollout import HFEngine, PagedEngine, VLLMEngine
    from jaxturbo.train.optimizer import OptimizerConfig
    from jaxturbo.train.step import TrainConfig
    from jaxturbo.train.trainer import train

    c = config
    mesh = None
    if c.mesh:
        from jaxturbo.parallel.mesh import make_mesh

        mesh = make_mesh(c.mesh)
    wall0 = time.perf_counter()

    def plain(text: str) -> list[int]:
        return encode_prompt(tokenizer, text, chat=False, special_tokens=False)

    calc = c.task == "calculator"
    if c.chat:

        def encode(text: str) -> list[int]:
            return encode_prompt(tokenizer, text, chat=True)

        template = (
            "What is {a}+{b}+{c}? You may use a calculator: write X+Y= and it replies "
            "with the value. Give the final answer as the number only."
            if calc
            else "What is {a}+{b}? Answer with the number only."
        )
    else:
        encode = plain
        template = "{a}+{b}+{c}=" if calc else "{a}+{b}="
    # the held-out problems are drawn first (their own RNG: every evaluation and every resumed
    # run scores the same prompts) and the training sampler never draws one of them
    problems = ArithmeticTask(
        encode,
        tokenizer.decode,
        max_operand=c.max_operand,
        template=template,
        operands=3 if calc else 2,
        held_out_size=c.eval_problems,
        held_out_seed=10_000 + c.seed,
    )
    stop = tuple(model_cfg.eos_token_id) + tuple(plain("\n")[-1:])
    longest_prompt = len(encode(template.format(**{k: c.max_operand for k in "abc"})))
    completion_tokens = c.max_new_tokens
    task: Any = problems
    if calc:
        # a tool call ends its turn at "="; a reply is at most the turn's digits + sign + "\n"
        stop += tuple(plain("=")[-1:])
        task = MultiTurnTask(
            problems,
            CalculatorEnv(plain, lambda ids: tokenizer.decode(ids, skip_special_tokens=True)),
            max_turns=c.max_turns,
            max_tool_tokens=c.max_new_tokens + 2,
        )
        completion_tokens = task.max_episode_tokens(c.max_new_tokens)
    common = dict(
        prompts_per_step=c.prompts_per_step,
        group_size=c.group_size,
        max_new_tokens=c.max_new_tokens,
        temperature=c.temperature,
        seq_len=longest_prompt + completion_tokens + 8,
        kl_coef=c.kl_coef,
        policy=PolicyLossConfig(c.policy_loss, loss_agg_mode=c.loss_agg_mode),
    )
    if c.rollout_engine == "hf":
        engine = HFEngine(model_cfg, params)
    elif c.rollout_engine == "engine":
        if mesh is not None:
            raise UserError(
                "rollout_engine=engine runs on one device; use rollout_engine=jax with a mesh"
            )
        engine = PagedEngine(
            model_cfg,
            params,
            max_model_len=longest_prompt + completion_tokens,
            max_num_seqs=max(c.prompts_per_step * c.group_size, c.eval_problems, 1),
            decode_steps=c.decode_steps,
        )
    elif c.rollout_engine == "vllm":
        engine = VLLMEngine(model_cfg, params, model_dir=c.model_dir, seed=c.seed)
    else:
        engine = None
    optimizer = OptimizerConfig(
        learning_rate=c.lr, warmup_steps=0, total_steps=c.steps, weight_decay=0.0
    )
    train_cfg = TrainConfig(compute_dtype=c.compute_dtype)
    kw = dict(engine=engine, stop_ids=stop, seed=c.seed, optimizer=optimizer, train=train_cfg)
    if c.algo == "grpo":
        lcfg: Any = GRPOConfig(
            **common,
            advantage=AdvantageConfig(c.adv_estimator),
            rollout_mode="async" if c.async_rollouts else "sync",
            max_staleness=c.max_staleness,
            multi_turn_advantage=c.multi_turn_advantage,
        )
        learner: Any = GRPOLearner(model_cfg, params, task, lcfg, mesh=mesh, **kw)
    else:
        lcfg = PPOConfig(**common)
        learner = PPOLearner(model_cfg, params, task, lcfg, **kw)
    out = Path(c.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, out)
    # fixed prompts: equal shapes, one compiled sampler for all evaluations
    held = task.held_out()

    def evaluate(state: Any, step: int) -> dict[str, float]:
        return {
            "held_out_reward": mean_reward(
                learner.engine, task, held, max_new_tokens=c.max_new_tokens, stop_ids=stop
            )
        }

    def derive(rec: dict[str, Any]) -> None:
        rec["rollout_tokens_per_s"] = rec["rollout_tokens"] / max(rec["rollout_s"], 1e-9)

    def describe(rec: dict[str, Any]) -> dict[str, str]:
        return {
            "reward": f"{rec['reward_mean']:.3f}",
            "kl": f"{rec.get('kl', 0.0):.4f}",
            "kept": f"{int(rec['kept'])}",
            "tok_s": f"{rec['rollout_tokens_per_s']:.0f}",
        }

    try:
        result = train(
            learner.update,
            learner.state,
            RolloutStream(learner),
            c.loop(),
            meta=run_meta(c, model_cfg, lcfg, optimizer, train_cfg),
            evaluate=evaluate if held else None,
            describe=describe,
            derive=derive,
            on_restore=learner.load_state,
            plots={"reward.png": plot_reward},
            files=files,
        )
    finally:
        if c.algo == "grpo":
            learner.close()
    if export is not None:
        policy = result.state.params["policy"] if c.algo == "ppo" else result.state.params
        print(f"model written to {export(host_params(policy), out / 'hf')}", file=sys.stderr)
    wall = time.perf_counter() - wall0
    rollout_tokens = sum(r["rollout_tokens"] for r in result.history)
    tok_s = rollout_tokens / max(sum(r["rollout_s"] for r in result.history), 1e-9)
    curve = [{"step": r["step"], "held_out_reward": r["held_out_reward"]} for r in result.evals]
    summary: dict[str, Any] = {
        "held_out_problems": len(held),
        "steps": c.steps,
        "resumed_from": result.start,
        "seconds": wall,
        "rollout_tokens_per_s": tok_s,
        "curve": curve,
    }
    if curve:
        summary.update(before=curve[0]["held_out_reward"], after=curve[-1]["held_out_reward"])
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    held_txt = (
        f"held-out reward {summary['before']:.3f} (step {curve[0]['step']}) -> "
        f"{summary['after']:.3f} (step {curve[-1]['step']}) on {len(held)} problems; "
        if curve
        else ""
    )
    print(
        f"{held_txt}{c.steps - result.start} steps in {wall:.1f} s wall; mean rollout "
        f"{tok_s:.0f} tok/s; {out}",
        file=sys.stderr,
    )
    return summary


def plot_reward(records: list[dict[str, Any]], png: Path) -> None:
    """Mean rollout reward per training step and the held-out reward curve, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train = [r for r in records if r.get("kind", "train") == "train"]
    held = [r for r in records if r.get("kind") == "eval"]
    if not records:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(
            [r["step"] for r in train],
            [r["reward_mean"] for r in train],
            lw=1,
            label="rollout reward (sampled)",
        )
    if held:
        ax.plot(
            [r["step"] for r in held],
            [r["held_out_reward"] for r in held],
            "o-",
            lw=1.5,
            label="held-out reward (greedy)",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
