"""A synchronous PPO learner with a critic: GAE advantages from a value head on the policy trunk.

    learner = PPOLearner(model_cfg, params, task, PPOConfig(...))
    metrics = learner.step()

Each step (PPO, Schulman et al. 2017, as applied to language models by Ziegler et al. 2019 and
Ouyang et al. 2022), one policy/value update per batch:
  1. rollouts from the engine (`collect_rollouts`), outcome reward on each response's last token;
  2. with kl_coef > 0, the per-token reward gets -beta * k1(pi_old, ref) (KL in the reward, the
     classic RLHF form; GRPO puts it in the loss instead);
  3. old values V(s_t) from the critic at each completion token's prefix; GAE (gamma, lam) gives
     advantages (whitened) and returns;
  4. loss = clipped policy loss + vf_coef * clipped value loss (`jaxturbo.rl.policy_loss`).
The critic is one linear head [D] on the policy's final hidden state (a shared trunk: no second
model in memory; verl and OpenRLHF use a separate critic model, not done here).
Parameters: {"policy": model params, "value_head": {"weight": [D]}}.
As GRPOLearner, a step is `next_rollouts()` (step 1, the rollout stream) and `update(state,
rollouts)` (steps 2-4, which need the current critic), the form the shared training loop
drives (`jaxturbo.rl.run`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxturbo.inference.sampling import SamplingParams
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.transformer import Params, forward, lm_head
from jaxturbo.rl.advantages import gae
from jaxturbo.rl.batch import pack_rollouts, response_arrays
from jaxturbo.rl.envs import Task
from jaxturbo.rl.kl import kl_k1
from jaxturbo.rl.logprobs import cut_completions, logprobs_from_logits, padded_sequences
from jaxturbo.rl.policy_loss import PolicyLossConfig, policy_loss, value_loss
from jaxturbo.rl.rollout import JaxEngine, RolloutEngine, collect_rollouts
from jaxturbo.train.losses import Weighted
from jaxturbo.train.optimizer import OptimizerConfig, make_optimizer
from jaxturbo.train.step import Batch, LossFn, TrainConfig, init_state, make_train_step


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO settings.

    prompts_per_step, group_size (rollouts per prompt; PPO needs no group, 1 is fine),
    max_new_tokens, temperature, seq_len: as in GRPOConfig.
    gamma, lam: GAE's discount and lambda (Schulman et al. 2016); 1, .95 are common for LMs.
    vf_coef: weight of the value loss (PPO eq. 9's c1); cliprange_value: the value clip.
    kl_coef: beta of the per-token KL-to-reference penalty in the reward (0: off).
    """

    prompts_per_step: int = 8
    group_size: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    seq_len: int = 512
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.5
    cliprange_value: float | None = 0.5
    kl_coef: float = 0.0
    policy: PolicyLossConfig = PolicyLossConfig()


def init_value_head(cfg: ModelConfig) -> Params:
    """A zero value head: V = 0 everywhere at the start, so early advantages are plain returns."""
    return {"weight": jnp.zeros((cfg.hidden_size,), jnp.float32)}


def policy_and_values(
    params: Params, model_cfg: ModelConfig, batch: Batch, attn_impl: str = "auto"
) -> tuple[jax.Array, jax.Array]:
    """Logits [B, T, V] and values [B, T] (float32) of PPO params on packed/padded rows."""
    hidden, _ = forward(
        params["policy"],
        model_cfg,
        batch["tokens"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        attn_impl=attn_impl,
        return_hidden=True,
    )
    values = jnp.einsum(
        "btd,d->bt", hidden.astype(jnp.float32), params["value_head"]["weight"].astype(jnp.float32)
    )
    return lm_head(params["policy"], model_cfg, hidden), values


def ppo_loss(model_cfg: ModelConfig, cfg: PPOConfig, attn_impl: str = "auto") -> LossFn:
    """loss(params, batch): clipped policy loss + vf_coef * clipped value loss, one denominator.

    batch: packed rows (`jaxturbo.rl.batch`) with old_values and returns [B, T].
    """

    def loss(params: Params, batch: Batch) -> tuple[Weighted, dict[str, jax.Array]]:
        logits, values = policy_and_values(params, model_cfg, batch, attn_impl)
        logp = logprobs_from_logits(logits, batch["targets"], cfg.temperature)
        seg, mask = batch["segment_ids"], batch["weights"]
        pg, aux = policy_loss(
            logp, batch["old_logprobs"], batch["advantages"], mask, cfg.policy, segment_ids=seg
        )
        vl, vaux = value_loss(
            values,
            batch["old_values"],
            batch["returns"],
            mask,
            cliprange_value=cfg.cliprange_value,
            mode=cfg.policy.loss_agg_mode,
            segment_ids=seg,
        )
        return (
            Weighted(pg.total + cfg.vf_coef * vl.total, pg.count),
            {**aux, **vaux, "pg_loss": pg.value(), "vf_loss": vl.value()},
        )

    return loss


class PPOLearner:
    """Synchronous PPO on one host (see module docstring).  params: the initial policy."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        params: Params,
        task: Task,
        cfg: PPOConfig,
        *,
        optimizer: OptimizerConfig = OptimizerConfig(warmup_steps=0),
        train: TrainConfig = TrainConfig(compute_dtype="float32"),
        engine: RolloutEngine | None = None,
        stop_ids: tuple[int, ...] = (),
        seed: int = 0,
    ):
        from jaxturbo.rl.multiturn import MultiTurnTask

        if isinstance(task, MultiTurnTask):
            raise ValueError("PPOLearner is single-turn; multi-turn tasks train with GRPOLearner")
        self.model_cfg, self.task, self.cfg, self.stop_ids = model_cfg, task, cfg, stop_ids
        opt = make_optimizer(optimizer)
        full = {"policy": params, "value_head": init_value_head(model_cfg)}
        self.state = init_state(full, opt, seed=seed)
        self.train_step = make_train_step(
            model_cfg, train, opt, donate=False, loss_fn=ppo_loss(model_cfg, cfg, train.attn_impl)
        )
        self.engine = engine or JaxEngine(model_cfg, self.state.params["policy"])
        self.ref_params = self.state.params["policy"] if cfg.kl_coef > 0 else None
        self._score = jax.jit(lambda p, rows: policy_and_values(p, model_cfg, rows))
        self.rng = np.random.default_rng(seed)
        self.steps = 0

    def data_state(self) -> dict[str, Any]:
        """The rollout stream's position, JSON-able: steps taken, the problem sampler's RNG."""
        return {"steps": self.steps, "numpy_rng": self.rng.bit_generator.state}

    def set_data_state(self, host: dict[str, Any]) -> None:
        """Continue the rollout stream from `data_state()`'s output."""
        self.steps = int(host["steps"])
        self.rng.bit_generator.state = host["numpy_rng"]

    def load_state(self, state: Any) -> None:
        """Make `state` (a restored TrainState) the policy and critic, the engine's too."""
        self.state = state
        self.engine.update_weights(state.params["policy"])

    def checkpoint_state(self) -> tuple[Any, dict[str, Any]]:
        """(TrainState, `data_state()`) to save."""
        return self.state, self.data_state()

    def restore(self, state: Any, host: dict[str, Any]) -> None:
        """Continue from `checkpoint_state()`'s output: policy, value head, optimizer, RNGs."""
        self.set_data_state(host)
        self.load_state(state)

    def next_rollouts(self) -> tuple[list, dict[str, float]]:
        """The next rollouts of the stream (scored by the task) and their metrics."""
        cfg = self.cfg
        return collect_rollouts(
            self.engine,
            self.task,
            cfg.prompts_per_step,
            cfg.group_size,
            SamplingParams(temperature=cfg.temperature),
            max_new_tokens=cfg.max_new_tokens,
            rng=self.rng,
            stop_ids=self.stop_ids,
            seed=self.steps,
        )

    def update(self, state: Any, rollouts: tuple[list, dict[str, float]]) -> tuple[Any, dict]:
        """Values from `state`'s critic, GAE, packed rows and one optimizer step; the new policy
        goes to the engine.  Returns (new state, float metrics)."""
        cfg = self.cfg
        rollouts, metrics = rollouts
        metrics = dict(metrics)
        prompts = [r.prompt for r in rollouts]
        comps = [r.completion for r in rollouts]
        rows = {k: jnp.asarray(v) for k, v in padded_sequences(prompts, comps).items()}
        _, values = self._score(state.params, rows)
        arr = response_arrays(rollouts)
        mask, rewards = arr["mask"], arr["token_rewards"]
        old_values = _completion_aligned(np.asarray(values), prompts, comps, mask.shape[1])
        if self.ref_params is not None:
            logits, _ = self._score({**state.params, "policy": self.ref_params}, rows)
            ref = logprobs_from_logits(logits, rows["targets"], cfg.temperature)
            ref_lp = _completion_aligned(np.asarray(ref), prompts, comps, mask.shape[1])
            old_lp = np.zeros_like(ref_lp)  # behaviour logprobs from the engine, same layout
            for i, r in enumerate(rollouts):
                old_lp[i, : len(r.logprobs)] = r.logprobs
            kl = np.asarray(kl_k1(jnp.asarray(old_lp), jnp.asarray(ref_lp))) * mask
            rewards = rewards - cfg.kl_coef * kl
            metrics["kl"] = float(kl.sum() / max(mask.sum(), 1))
        adv, ret = gae(
            jnp.asarray(rewards),
            jnp.asarray(old_values),
            jnp.asarray(mask),
            gamma=cfg.gamma,
            lam=cfg.lam,
            whiten=True,
        )
        n = len(rollouts)
        longest = max(len(p) for p in prompts) + cfg.max_new_tokens - 1
        min_rows = -(-n // max(1, cfg.seq_len // longest))
        batch = pack_rollouts(
            rollouts,
            np.asarray(adv),
            seq_len=cfg.seq_len,
            min_rows=min_rows,
            extras={"old_values": old_values, "returns": np.asarray(ret)},
        )
        metrics.update(reward_mean=float(np.mean([r.reward for r in rollouts])), kept=float(n))
        state, m = self.train_step(state, {k: jnp.asarray(v) for k, v in batch.items()})
        metrics.update({k: float(v) for k, v in m.items()})
        self.engine.update_weights(state.params["policy"])
        self.state = state
        self.steps += 1
        return state, metrics

    def step(self) -> dict[str, float]:
        """One rollout batch and one optimizer step; returns float metrics."""
        _, metrics = self.update(self.state, self.next_rollouts())
        return metrics


def _completion_aligned(per_target: np.ndarray, prompts, completions, width: int) -> np.ndarray:
    """Per-target rows [N, L - 1] -> completion-aligned [N, width] (zero-padded)."""
    out = np.zeros((len(prompts), width), np.float32)
    for i, v in enumerate(cut_completions(per_target, prompts, completions)):
        out[i, : len(v)] = v
    return out
