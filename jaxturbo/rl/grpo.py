"""A synchronous GRPO learner: sample groups, score, build packed rows, one policy update, sync.

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
Not here yet: PPO with a critic, asynchronous rollouts, several updates per batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxturbo.generate.sampling import SamplingParams
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.transformer import Params, forward
from jaxturbo.rl.advantages import AdvantageConfig
from jaxturbo.rl.aggregation import aggregate
from jaxturbo.rl.batch import build_batch
from jaxturbo.rl.envs import Task
from jaxturbo.rl.kl import kl_penalty
from jaxturbo.rl.logprobs import logprobs_from_logits, token_logprobs
from jaxturbo.rl.policy_loss import PolicyLossConfig, entropy_bonus, policy_loss
from jaxturbo.rl.rollout import JaxEngine, RolloutEngine, collect_rollouts
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
    policy / advantage: see PolicyLossConfig and AdvantageConfig.
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
    policy: PolicyLossConfig = PolicyLossConfig()
    advantage: AdvantageConfig = AdvantageConfig("grpo")


def grpo_loss(model_cfg: ModelConfig, cfg: GRPOConfig, attn_impl: str = "auto") -> LossFn:
    """loss(params, batch) for `make_train_step`: clipped policy loss + beta KL - entropy bonus.

    batch: the packed rows of `jaxturbo.rl.batch` (+ ref_logprobs [B, T] when kl_coef > 0, and
    optionally is_weights [B, T], see `truncated_is_weights`).
    The three terms share one mask and aggregation, hence one denominator.
    """
    mode, norm = cfg.policy.loss_agg_mode, cfg.policy.norm_length

    def loss(params: Params, batch: Batch) -> tuple[Weighted, dict[str, jax.Array]]:
        logits, _ = forward(params, model_cfg, batch["tokens"], positions=batch["positions"],
                            segment_ids=batch["segment_ids"], attn_impl=attn_impl)
        logp = logprobs_from_logits(logits, batch["targets"], cfg.temperature)
        seg, mask = batch["segment_ids"], batch["weights"]
        pg, aux = policy_loss(logp, batch["old_logprobs"], batch["advantages"], mask,
                              cfg.policy, segment_ids=seg, is_weights=batch.get("is_weights"))
        total = pg.total
        aux = {**aux, "pg_loss": pg.value()}
        if cfg.kl_coef > 0:
            kl = aggregate(kl_penalty(logp, batch["ref_logprobs"], cfg.kl_loss_type), mask, mode,
                           segment_ids=seg, norm_length=norm)
            total = total + cfg.kl_coef * kl.total
            aux["kl"] = kl.value()
        if cfg.entropy_coeff > 0:
            ent = entropy_bonus(logits / cfg.temperature, mask, mode, segment_ids=seg,
                                norm_length=norm)
            total = total - cfg.entropy_coeff * ent.total
            aux["entropy"] = ent.value()
        return Weighted(total, pg.count), aux
    return loss


class GRPOLearner:
    """Synchronous GRPO on one host (see module docstring).  params: the initial policy."""

    def __init__(self, model_cfg: ModelConfig, params: Params, task: Task, cfg: GRPOConfig, *,
                 optimizer: OptimizerConfig = OptimizerConfig(warmup_steps=0),
                 train: TrainConfig = TrainConfig(compute_dtype="float32"),
                 engine: RolloutEngine | None = None, stop_ids: tuple[int, ...] = (),
                 seed: int = 0):
        if cfg.group_size < 2 and cfg.advantage.adv_estimator in ("grpo", "rloo"):
            raise ValueError(f"group_size={cfg.group_size}: {cfg.advantage.adv_estimator} needs "
                             ">= 2 rollouts per prompt for its baseline")
        self.model_cfg, self.task, self.cfg, self.stop_ids = model_cfg, task, cfg, stop_ids
        opt = make_optimizer(optimizer)
        self.state = init_state(params, opt, seed=seed)
        self.train_step = make_train_step(model_cfg, train, opt,
                                          loss_fn=grpo_loss(model_cfg, cfg, train.attn_impl),
                                          donate=False)
        self.engine = engine or JaxEngine(model_cfg, self.state.params)
        self.ref_params = self.state.params if cfg.kl_coef > 0 else None
        self._ref_logprobs = jax.jit(functools.partial(token_logprobs, cfg=model_cfg,
                                                       temperature=cfg.temperature))
        self.rng = np.random.default_rng(seed)
        self.steps = 0
        self.grad_accum = train.grad_accum

    def _rows(self, longest: int) -> int:
        # a fixed row count keeps one compiled train step: with every rollout <= `longest`
        # inputs, first-fit needs at most ceil(N / per_row) rows
        n = self.cfg.prompts_per_step * self.cfg.group_size
        per_row = max(1, self.cfg.seq_len // longest)
        return -(-n // per_row)

    def step(self) -> dict[str, float]:
        """One rollout batch and one optimizer step; returns float metrics."""
        cfg = self.cfg
        rollouts, metrics = collect_rollouts(
            self.engine, self.task, cfg.prompts_per_step, cfg.group_size,
            SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p),
            max_new_tokens=cfg.max_new_tokens, rng=self.rng, stop_ids=self.stop_ids,
            seed=self.steps)
        longest = max(len(r.prompt) for r in rollouts) + cfg.max_new_tokens - 1
        batch, stats = build_batch(rollouts, cfg.advantage, seq_len=cfg.seq_len,
                                   min_rows=self._rows(longest), rows_multiple=self.grad_accum,
                                   dynamic_filter=cfg.dynamic_filter)
        metrics.update(stats)
        if batch:
            b = {k: jnp.asarray(v) for k, v in batch.items()}
            if self.ref_params is not None:
                b["ref_logprobs"] = self._ref_logprobs(self.ref_params, batch=b)
            self.state, m = self.train_step(self.state, b)
            metrics.update({k: float(v) for k, v in m.items()})
            self.engine.update_weights(self.state.params)
        self.steps += 1
        return metrics


def mean_reward(engine: RolloutEngine, task: Task, problems: list[Any], *,
                max_new_tokens: int, stop_ids: tuple[int, ...] = (),
                sampling: SamplingParams = SamplingParams()) -> float:
    """Mean reward of the engine's policy on fixed problems (greedy by default): held-out eval."""
    out = engine.generate([p.prompt for p in problems], sampling, max_new_tokens=max_new_tokens,
                          stop_ids=stop_ids)
    return float(np.mean([task.reward(p, c) for p, c in zip(problems, out.completions)]))
