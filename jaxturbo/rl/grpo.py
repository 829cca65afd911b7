"""A GRPO learner: sample groups, score, build packed rows, one policy update, push weights.

    learner = GRPOLearner(model_cfg, params, task, GRPOConfig(...), engine=JaxEngine(...))
    for _ in range(steps):
        metrics = learner.step()

Each step (GRPO, Shao et al. 2024, Alg. 1 with one policy update per batch):
  1. `prompts_per_step` problems, each repeated `group_size` times;
  2. the rollout engine samples completions and their behaviour logprobs (log pi_old);
  3. rewards -> advantages (`advantage.adv_estimator`, default group-normalised) -> packed rows,
     dropping groups with equal rewards (dynamic sampling);
  4. with kl_coef > 0, reference logprobs from the frozen initial policy (KL penalty in the
     loss, as GRPO does, rather than in the reward);
  5. one optimizer step on the clipped policy loss (`jaxturbo.rl.policy_loss`);
  6. the new weights are pushed to the engine.
Asynchronous mode (`rollout_mode="async"`): a background thread produces the rollouts of step
t + 1 (up to t + max_staleness) with the weights the engine holds while step t trains; a
bounded queue holds them.  The stale behaviour policy is corrected as in decoupled PPO (Hilton
et al. 2022): the trainer recomputes the proximal logprobs with its current weights (the ratio's
denominator) and weights each token by the truncated importance ratio min(pi_prox /
pi_behaviour, tis_cap) (`truncated_is_weights`).  With zero staleness the loss equals sync
mode's (the weights are 1 up to rounding).  Overlap is real only where generation and training
do not queue on the same device (a sub-mesh, or the hf engine on CPU).
Meshes (`mesh=make_mesh("data=2,fsdp=2")`): the train state is laid out as `jaxturbo sft
--mesh` lays it out (`init_state`/`make_train_step` with the mesh: params and moments over fsdp,
packed rows over data x fsdp, `sharding.put_batch`); rows are packed per shard
(`build_batch(num_shards=data*fsdp)`, LPT-balanced).  The default JaxEngine replicates the
policy on the same mesh and splits the rollout rows over data x fsdp; the weight sync after
each update is a device_put (all-gather) from the FSDP layout, never through the host.
tensor/sequence axes > 1 are refused (`check_rl_mesh`).
Multi-turn tasks (`jaxturbo.rl.multiturn.MultiTurnTask`, e.g. the calculator): step 2 plays
group_size episodes per problem with `collect_episodes` (policy turns and tool replies in one
context, through the same engine); the episode reward (sum of per-turn rewards) is the outcome.
Advantages: `multi_turn_advantage="trajectory"` (default) puts the episode reward through
`advantage.adv_estimator` (GRPO: group-normalised, equal to `multi_turn_advantages(level=
"trajectory")`); "step" uses `multi_turn_advantages(level="step")` (per-turn returns-to-go,
normalised over the group's turns).  The whole trajectory is one packed rollout whose weights
are 1 on policy tokens only, so prompts and tool output never train; the behaviour logprobs of
the policy tokens sit at the same target positions for the ratio.
The step splits into a data side and an update, which is how the shared training loop
(`jaxturbo.train.trainer`, used by `jaxturbo.rl.run`) drives it: `next_rollouts()` (steps 1-3,
the rollout stream, whose position is `data_state()`) and `update(state, rollouts)` (steps
4-6); `step()` is one of each.
Not here yet: several updates per batch.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxturbo.errors import UserError
from jaxturbo.inference.sampling import SamplingParams
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.transformer import Params, forward
from jaxturbo.rl.advantages import AdvantageConfig, check_group_size, multi_turn_advantages
from jaxturbo.rl.aggregation import aggregate
from jaxturbo.rl.batch import build_batch
from jaxturbo.rl.envs import Task
from jaxturbo.rl.kl import kl_penalty
from jaxturbo.rl.logprobs import logprobs_from_logits, token_logprobs
from jaxturbo.rl.multiturn import MultiTurnTask, collect_episodes, run_episodes, step_arrays
from jaxturbo.rl.policy_loss import (
    PolicyLossConfig,
    entropy_bonus,
    policy_loss,
    truncated_is_weights,
)
from jaxturbo.rl.rollout import JaxEngine, RolloutEngine, collect_rollouts
from jaxturbo.train import sharding as shd
from jaxturbo.train.losses import Weighted
from jaxturbo.train.optimizer import OptimizerConfig, make_optimizer
from jaxturbo.train.step import Batch, LossFn, TrainConfig, init_state, make_train_step


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO settings (names after verl's where it has one).

    prompts_per_step: problems per step; group_size: rollouts per problem (GRPO's G; the group
      is the baseline, so >= 2).
    max_new_tokens / temperature / top_p: rollout sampling (temperature 1 samples the policy
      itself; the loss scores tokens at the same temperature).
    seq_len: packed row length (>= longest prompt + max_new_tokens - 1).
    kl_coef: beta of the k-estimator KL to the initial policy in the loss (GRPO eq. 3; 0: off,
      as DAPO and Dr. GRPO do).  kl_loss_type: "k1", "k2" or "k3" (`jaxturbo.rl.kl`).
    entropy_coeff: weight of the entropy bonus subtracted from the loss.
    dynamic_filter: drop groups whose rewards are all equal (DAPO).
    rollout_mode: "sync" (generate, then train) or "async" (see module docstring).
    max_staleness: async only: how many optimizer steps behind the rollouts may be (0: none,
      which reproduces sync mode through the async machinery).
    tis_cap: async only: cap of the truncated importance weights.
    policy / advantage: see PolicyLossConfig and AdvantageConfig.
    multi_turn_advantage: multi-turn tasks only: "trajectory" (the episode reward through
      `advantage`) or "step" (`multi_turn_advantages(level="step")`, gamma advantage.gamma).
    """

    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seq_len: int = 512
    kl_coef: float = 0.0
    kl_loss_type: str = "k3"
    entropy_coeff: float = 0.0
    dynamic_filter: bool = True
    rollout_mode: str = "sync"
    max_staleness: int = 1
    tis_cap: float = 2.0
    policy: PolicyLossConfig = PolicyLossConfig()
    advantage: AdvantageConfig = AdvantageConfig("grpo")
    multi_turn_advantage: str = "trajectory"


def grpo_loss(model_cfg: ModelConfig, cfg: GRPOConfig, attn_impl: str = "auto") -> LossFn:
    """loss(params, batch) for `make_train_step`: clipped policy loss + beta KL - entropy bonus.

    batch: the packed rows of `jaxturbo.rl.batch` (+ ref_logprobs [B, T] when kl_coef > 0, and
    optionally is_weights [B, T], see `truncated_is_weights`).
    The three terms share one mask and aggregation, hence one denominator.
    """
    mode, norm = cfg.policy.loss_agg_mode, cfg.policy.norm_length

    def loss(params: Params, batch: Batch) -> tuple[Weighted, dict[str, jax.Array]]:
        logits, _ = forward(
            params,
            model_cfg,
            batch["tokens"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            attn_impl=attn_impl,
        )
        logp = logprobs_from_logits(logits, batch["targets"], cfg.temperature)
        seg, mask = batch["segment_ids"], batch["weights"]
        pg, aux = policy_loss(
            logp,
            batch["old_logprobs"],
            batch["advantages"],
            mask,
            cfg.policy,
            segment_ids=seg,
            is_weights=batch.get("is_weights"),
        )
        total = pg.total
        aux = {**aux, "pg_loss": pg.value()}
        if cfg.kl_coef > 0:
            kl = aggregate(
                kl_penalty(logp, batch["ref_logprobs"], cfg.kl_loss_type),
                mask,
                mode,
                segment_ids=seg,
                norm_length=norm,
            )
            total = total + cfg.kl_coef * kl.total
            aux["kl"] = kl.value()
        if cfg.entropy_coeff > 0:
            ent = entropy_bonus(
                logits / cfg.temperature, mask, mode, segment_ids=seg, norm_length=norm
            )
            total = total - cfg.entropy_coeff * ent.total
            aux["entropy"] = ent.value()
        return Weighted(total, pg.count), aux

    return loss


@functools.lru_cache(maxsize=8)
def _train_step(
    model_cfg: ModelConfig, cfg: GRPOConfig, optimizer: OptimizerConfig, train: TrainConfig
):
    return make_train_step(
        model_cfg,
        train,
        make_optimizer(optimizer),
        donate=False,
        loss_fn=grpo_loss(model_cfg, cfg, train.attn_impl),
    )


def check_rl_mesh(mesh: Any) -> int:
    """RL learners shard over data, fsdp and tensor (not sequence: rollouts are short): a
    UserError naming that otherwise.  Returns the number of row shards (data * fsdp)."""
    bad = {a: mesh.shape.get(a, 1) for a in ("sequence",) if mesh.shape.get(a, 1) > 1}
    if bad:
        desc = ",".join(f"{a}={n}" for a, n in bad.items())
        raise UserError(
            f"RL learners support the data, fsdp and tensor mesh axes (got {desc}); "
            f"use e.g. data={mesh.devices.size} or data=1,fsdp={mesh.devices.size}"
        )
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


@functools.lru_cache(maxsize=8)
def _logprobs_fn(model_cfg: ModelConfig, temperature: float):
    return jax.jit(functools.partial(token_logprobs, cfg=model_cfg, temperature=temperature))


class GRPOLearner:
    """Synchronous GRPO on one host (see module docstring).  params: the initial policy."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        params: Params,
        task: Task,
        cfg: GRPOConfig,
        *,
        optimizer: OptimizerConfig = OptimizerConfig(warmup_steps=0),
        train: TrainConfig = TrainConfig(compute_dtype="float32"),
        engine: RolloutEngine | None = None,
        stop_ids: tuple[int, ...] = (),
        seed: int = 0,
        mesh: Any = None,
    ):
        check_group_size(cfg.advantage.adv_estimator, cfg.group_size)
        self.model_cfg, self.task, self.cfg, self.stop_ids = model_cfg, task, cfg, stop_ids
        self.mesh = mesh
        self.num_shards = 1 if mesh is None else check_rl_mesh(mesh)
        self.state = init_state(params, make_optimizer(optimizer), mesh=mesh, seed=seed)
        # the rollout settings do not change the loss: learners that differ only there share
        # one compiled step
        loss_cfg = dataclasses.replace(
            cfg,
            rollout_mode="sync",
            max_staleness=0,
            tis_cap=1.0,
            prompts_per_step=0,
            group_size=0,
            dynamic_filter=False,
            multi_turn_advantage="trajectory",
        )
        if mesh is None:
            self.train_step = _train_step(model_cfg, loss_cfg, optimizer, train)
        else:  # the shardings come from the params' shapes: not an lru_cache key
            self.train_step = make_train_step(
                model_cfg,
                train,
                make_optimizer(optimizer),
                donate=False,
                mesh=mesh,
                params=self.state.params,
                loss_fn=grpo_loss(model_cfg, loss_cfg, train.attn_impl),
            )
        self.engine = engine or JaxEngine(model_cfg, self.state.params, mesh=mesh)
        self.ref_params = self.state.params if cfg.kl_coef > 0 else None
        self._ref_logprobs = _logprobs_fn(model_cfg, cfg.temperature)
        self.rng = np.random.default_rng(seed)
        self._rng_lock = threading.Lock()
        self._rng_at: dict[int, dict[str, Any]] = {}  # batch index -> RNG state it started from
        self.steps = 0
        self.grad_accum = train.grad_accum
        if cfg.rollout_mode not in ("sync", "async"):
            raise ValueError(f"rollout_mode {cfg.rollout_mode!r}; choose 'sync' or 'async'")
        if cfg.max_staleness < 0:
            raise ValueError(f"max_staleness={cfg.max_staleness} must be >= 0")
        if cfg.multi_turn_advantage not in ("trajectory", "step"):
            raise ValueError(
                f"multi_turn_advantage {cfg.multi_turn_advantage!r}; choose 'trajectory' or 'step'"
            )
        # async: the rollout thread starts on the first step, so that `restore` can set the
        # step count and sampler state it continues from
        self._producer: _Producer | None = None

    def data_state(self) -> dict[str, Any]:
        """The rollout stream's position, JSON-able: steps taken and the problem sampler's RNG
        state that batch `steps` starts from (in async mode the rollout thread may already
        have drawn the next batches' problems)."""
        with self._rng_lock:
            rng_state = self._rng_at.get(self.steps, self.rng.bit_generator.state)
            self._rng_at = {i: v for i, v in self._rng_at.items() if i >= self.steps}
        return {"steps": self.steps, "numpy_rng": rng_state}

    def set_data_state(self, host: dict[str, Any]) -> None:
        """Continue the rollout stream from `data_state()`'s output (before the first rollouts
        only)."""
        if self._producer is not None:
            raise RuntimeError("set_data_state() after the async rollout thread started")
        self.steps = int(host["steps"])
        self.rng.bit_generator.state = host["numpy_rng"]

    def load_state(self, state: Any) -> None:
        """Make `state` (a restored TrainState) the policy: the learner's and the engine's."""
        self.state = state
        self.engine.update_weights(state.params)

    def checkpoint_state(self) -> tuple[Any, dict[str, Any]]:
        """(TrainState, `data_state()`) to save."""
        return self.state, self.data_state()

    def restore(self, state: Any, host: dict[str, Any]) -> None:
        """Continue from `checkpoint_state()`'s output (before the first `step` only)."""
        self.set_data_state(host)
        self.load_state(state)

    def _collect(self, index: int) -> tuple[list, dict[str, float]]:
        """Rollouts (single-turn tasks) or `Episode`s (a `MultiTurnTask`) of batch `index`."""
        cfg = self.cfg
        with self._rng_lock:  # remembered for checkpoint_state (see there)
            self._rng_at[index] = self.rng.bit_generator.state
        collect = collect_episodes if isinstance(self.task, MultiTurnTask) else collect_rollouts
        return collect(
            self.engine,
            self.task,
            cfg.prompts_per_step,
            cfg.group_size,
            SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p),
            max_new_tokens=cfg.max_new_tokens,
            rng=self.rng,
            stop_ids=self.stop_ids,
            seed=index,
        )

    def close(self) -> None:
        """Stop the async rollout thread (a no-op in sync mode)."""
        if self._producer is not None:
            self._producer.stop()

    def _rows(self, longest: int) -> int:
        # a fixed row count keeps one compiled train step: with every rollout <= `longest`
        # inputs, first-fit needs at most ceil(N / per_row) rows
        # per shard (`pack_rollouts`' min_rows); a shard LPT gave more rollouts than its share
        # may need more rows (one more compilation)
        n = -(-self.cfg.prompts_per_step * self.cfg.group_size // self.num_shards)
        per_row = max(1, self.cfg.seq_len // longest)
        return -(-n // per_row)

    def _episodes(self, items: list) -> tuple[list, Any, int]:
        """(rollouts, build_batch's advantage_fn, the longest rollout's inputs bound for the
        row count) of a collected batch: single-turn rollouts pass through; episodes become
        their trajectories (policy_mask 0 on tool output)."""
        cfg = self.cfg
        if not isinstance(self.task, MultiTurnTask):
            return items, None, max(len(r.prompt) for r in items) + cfg.max_new_tokens - 1
        rollouts = [e.rollout for e in items]
        bound = (
            max(len(r.prompt) for r in rollouts)
            - 1
            + self.task.max_episode_tokens(cfg.max_new_tokens)
        )
        longest = max(bound, max(len(r.prompt) + len(r.completion) - 1 for r in rollouts))
        if cfg.multi_turn_advantage == "trajectory":
            return rollouts, None, longest  # the episode reward through cfg.advantage

        def step_level(kept: list[int]) -> np.ndarray:
            arr = step_arrays([items[i] for i in kept])
            adv = cfg.advantage
            return np.asarray(
                multi_turn_advantages(
                    arr["step_rewards"],
                    arr["step_mask"],
                    arr["turn_ids"],
                    arr["group_ids"],
                    level="step",
                    gamma=adv.gamma,
                    scale_by_std=adv.norm_adv_by_std_in_grpo,
                    eps=adv.epsilon,
                )
            )

        return rollouts, step_level, longest

    def next_rollouts(self) -> tuple[Batch, dict[str, float]]:
        """The next batch of the rollout stream: sampled (or taken from the async thread),
        scored, advantages, packed rows ({} when every group was filtered out), with the
        rollout metrics."""
        cfg = self.cfg
        if cfg.rollout_mode == "async" and self._producer is None:
            self._producer = _Producer(self._collect, cfg.max_staleness, start=self.steps)
        if self._producer is None:
            rollouts, metrics = self._collect(self.steps)
        else:
            produced_at, rollouts, metrics = self._producer.get()
            metrics["staleness"] = float(self.steps - produced_at)
        rollouts, adv_fn, longest = self._episodes(rollouts)
        batch, stats = build_batch(
            rollouts,
            cfg.advantage,
            seq_len=cfg.seq_len,
            min_rows=self._rows(longest),
            rows_multiple=self.grad_accum,
            dynamic_filter=cfg.dynamic_filter,
            num_shards=self.num_shards,
            advantage_fn=adv_fn,
        )
        metrics.update(stats)
        return batch, metrics

    def update(self, state: Any, rollouts: tuple[Batch, dict[str, float]]) -> tuple[Any, dict]:
        """One optimizer step of `state` (a TrainState) on `next_rollouts()`'s output; the new
        weights go to the engine.  Returns (new state, float metrics: the rollout metrics and
        the step's)."""
        cfg = self.cfg
        batch, metrics = rollouts
        metrics = dict(metrics)
        if batch:
            b = shd.put_batch(batch, self.mesh)
            if self.ref_params is not None:
                b["ref_logprobs"] = self._ref_logprobs(self.ref_params, batch=b)
            if self._producer is not None:
                prox = self._ref_logprobs(state.params, batch=b)
                b["is_weights"] = truncated_is_weights(prox, b["old_logprobs"], cfg.tis_cap)
                b["old_logprobs"] = prox
                m_w = b["weights"]
                metrics["is_weight_mean"] = float(
                    jnp.sum(b["is_weights"] * m_w) / jnp.maximum(jnp.sum(m_w), 1.0)
                )
            state, m = self.train_step(state, b)
            metrics.update({k: float(v) for k, v in m.items()})
            self.engine.update_weights(state.params)
        self.state = state
        self.steps += 1
        if self._producer is not None:
            self._producer.finished(self.steps)
        return state, metrics

    def step(self) -> dict[str, float]:
        """One rollout batch and one optimizer step; returns float metrics."""
        _, metrics = self.update(self.state, self.next_rollouts())
        return metrics


class _Producer:
    """Background rollout thread: batch i starts once the learner has finished step
    i - max_staleness, so it is generated with weights at most max_staleness updates old."""

    def __init__(self, collect, max_staleness: int, start: int = 0):
        self._collect, self._k, self._start = collect, max_staleness, start
        self._queue: queue.Queue = queue.Queue(maxsize=max_staleness + 1)
        self._cond = threading.Condition()
        self._finished = start  # a resumed learner has taken `start` steps already
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="rollouts")
        self._thread.start()

    def _run(self) -> None:
        i = self._start
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._finished >= i - self._k)
                if self._stop:
                    return
                produced_at = self._finished  # updates the engine's weights have seen
            try:
                rollouts, metrics = self._collect(i)
            except BaseException as e:  # hand the error to the learner's thread
                self._queue.put(e)
                return
            self._queue.put((produced_at, rollouts, metrics))
            i += 1

    def get(self) -> tuple[int, list, dict[str, float]]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def finished(self, steps: int) -> None:
        with self._cond:
            self._finished = steps
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()


def mean_reward(
    engine: RolloutEngine,
    task: Task,
    problems: list[Any],
    *,
    max_new_tokens: int,
    stop_ids: tuple[int, ...] = (),
    sampling: SamplingParams = SamplingParams(),
) -> float:
    """Mean reward of the engine's policy on fixed problems (greedy by default): held-out eval
    on `task.held_out()`, which the task's training sampler never draws.
    A `MultiTurnTask`'s problems are played as episodes (the episode reward)."""
    if isinstance(task, MultiTurnTask):
        eps = run_episodes(
            engine,
            task,
            problems,
            sampling,
            max_turns=task.max_turns,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
        )
        return float(np.mean([e.rollout.reward for e in eps]))
    out = engine.generate(
        [p.prompt for p in problems], sampling, max_new_tokens=max_new_tokens, stop_ids=stop_ids
    )
    return float(np.mean([task.reward(p, c) for p, c in zip(problems, out.completions)]))
