"""Rollout engines: one protocol over the in-process JAX sampler and a PyTorch (transformers) one.

    engine.update_weights(params)                    # after every optimizer step
    out = engine.generate(prompts, sampling, max_new_tokens=64, stop_ids=eos)
    out.completions[i], out.logprobs[i]              # tokens and log pi_old of each

Logprobs are those of the temperature-scaled, unfiltered distribution (top-k/top-p only choose
which token is drawn), the convention of `jaxturbo.inference.sampling.sample`; greedy sampling
scores under temperature 1.  `score` gives the same numbers for tokens that are already known,
which is how engines are checked against the trainer's policy.

Engines ("rollout_engine"):
  jax  `jaxturbo.inference.generation` in this process.  Weight sync is a device_put into the
       sampler's dtype and layout (pass `shardings` for a sub-mesh; the trainer's float32
       FSDP layout is resharded there, on device).  With `mesh` (a data/fsdp training mesh)
       the sampler's params are replicated on it and the prompt rows split over its batch
       axes (data x fsdp; padded to a multiple by repeating the last prompt).  The sampler's
       random bits are sharding-invariant (threefry_partitionable), so a mesh samples the
       same tokens as one device.
  engine  the serving engine (`jaxturbo.inference.Engine`) in this process: continuous
       batching over a paged KV cache; the samples of a GRPO group are one request with n
       samples, so they share the prompt's pages (computed once).  Weight sync is the engine's
       `update_weights` (no recompilation).
  hf   transformers on CPU (or any torch device), fed in memory through the HF bridge's name map
       (`jaxturbo.bridge.hf.hf_from_params`) with `load_state_dict`: no files are written.  It
       proves the PyTorch-serving path end to end; it is not fast.
  vllm a running `vllm.LLM`; weights go in memory through the same name map into its model's
       `load_weights`.  UNTESTED: vLLM cannot be installed where this was written; the code
       follows vLLM's documented offline API and has never run.  Sampling temperatures other
       than 1 (and greedy) are refused: vLLM reports logprobs of the unscaled distribution.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxturbo.errors import UserError
from jaxturbo.inference.generation import generate
from jaxturbo.inference.sampling import SamplingParams
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.transformer import Params
from jaxturbo.rl.logprobs import (
    cut_completions,
    logprobs_from_logits,
    padded_sequences,
    token_logprobs,
)


@dataclasses.dataclass
class RolloutOutput:
    """completions: generated token ids per prompt (stop token included).  logprobs: float32 per
    generated token.  truncated: hit max_new_tokens without a stop token."""

    completions: list[list[int]]
    logprobs: list[np.ndarray]
    truncated: list[bool]


class RolloutEngine(Protocol):
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        seed: int = 0,
    ) -> RolloutOutput: ...

    def score(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
    ) -> list[np.ndarray]: ...

    def update_weights(self, params: Params) -> None: ...


def _score_temperature(sampling: SamplingParams) -> float:
    return 1.0 if sampling.greedy else sampling.temperature


class JaxEngine:
    """The on-device sampler.  dtype: the sampler's parameter dtype (e.g. bfloat16 for speed)."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        *,
        dtype: Any = jnp.float32,
        shardings: Any = None,
        attn_impl: str = "auto",
        mesh: Any = None,
    ):
        self.cfg, self.dtype, self.attn_impl = cfg, dtype, attn_impl
        self.batch_sharding, self._rows_multiple = None, 1
        if mesh is not None:
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            from jaxturbo.train.sharding import BATCH_AXES

            if shardings is None:
                shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
            self.batch_sharding = NamedSharding(mesh, P(BATCH_AXES, None))
            self._rows_multiple = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
        self.shardings = shardings
        self.params: Params = {}
        self.update_weights(params)

    def update_weights(self, params: Params) -> None:
        p = jax.tree.map(lambda x: jnp.asarray(x, self.dtype), params)
        self.params = p if self.shardings is None else jax.device_put(p, self.shardings)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        seed: int = 0,
    ) -> RolloutOutput:
        n = len(prompts)
        pad = -n % self._rows_multiple
        if pad:  # rows split evenly over the batch axes; the padding rows are dropped below
            prompts = list(prompts) + [prompts[-1]] * pad
        res = generate(
            self.params,
            self.cfg,
            prompts,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_ids=stop_ids,
            seed=seed,
            attn_impl=self.attn_impl,
            batch_sharding=self.batch_sharding,
        )
        res = type(res)(res.tokens[:n], res.logprobs[:n], res.num_tokens[:n])
        comps = res.sequences()
        stops = set(stop_ids)
        return RolloutOutput(
            comps,
            [np.asarray(lp[:n], np.float32) for lp, n in zip(res.logprobs, res.num_tokens)],
            [len(c) == max_new_tokens and c[-1] not in stops for c in comps],
        )

    def score(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
    ) -> list[np.ndarray]:
        rows = {k: jnp.asarray(v) for k, v in padded_sequences(prompts, completions).items()}
        lp = token_logprobs(
            self.params, self.cfg, rows, temperature=temperature, attn_impl=self.attn_impl
        )
        return cut_completions(np.asarray(lp), prompts, completions)


class PagedEngine:
    """The serving engine as a rollout engine (see the module docstring).

    max_num_seqs: most samples decoding at once (a step's rollouts: prompts x group size);
    max_model_len: prompt + completion tokens of one sample.  The page pool holds every
    sample's full length at once, so rollouts are never preempted.  dtype: the engine's
    parameter dtype.  decode_steps: decode steps per device launch once every sample
    decodes (`EngineConfig.decode_steps`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        *,
        max_num_seqs: int,
        max_model_len: int,
        dtype: Any = jnp.float32,
        attn_impl: str = "auto",
        page_size: int = 16,
        decode_steps: int = 1,
    ):
        from jaxturbo.inference.engine.config import EngineConfig
        from jaxturbo.inference.engine.engine import Engine

        self.cfg, self.dtype, self.attn_impl = cfg, dtype, attn_impl
        max_model_len = min(-(-max_model_len // page_size) * page_size, cfg.max_position_embeddings)
        pages = max_num_seqs * -(-max_model_len // page_size) + 1  # + the reserved null page
        # a batch's prompts prefill in few launches: a launch costs the model's small GEMMs
        # whatever its tokens (a SmolLM2-shape GRPO batch: 129.6 ms with its prefill in 11
        # launches of 256 tokens, 106.5 ms in one; experiments/rl/results/rollout_engines_h200.md)
        budget = max(256, 2 * max_model_len, max_num_seqs, min(2048, max_num_seqs * max_model_len))
        decode = 1 << (max_num_seqs - 1).bit_length()  # every sample's decode token
        # two programs: rollouts start together (prefill chunks) and then all decode, so the
        # finer buckets of a server would only add compilation
        self.config = EngineConfig(
            page_size=page_size,
            num_pages=pages,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            max_num_batched_tokens=max(budget, decode),
            token_buckets=tuple(sorted({decode, max(budget, decode)})),
            seq_buckets=(max_num_seqs,),
            decode_steps=decode_steps,
        )
        self.params = self._cast(params)
        self.engine = Engine(
            self.params, cfg, None, self.config, attn_impl=attn_impl, compilation_cache_dir=None
        )

    def _cast(self, params: Params) -> Params:
        return jax.tree.map(lambda x: jnp.asarray(x, self.dtype), params)

    def update_weights(self, params: Params) -> None:
        self.params = self._cast(params)
        self.engine.update_weights(self.params)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        seed: int = 0,
    ) -> RolloutOutput:
        from jaxturbo.inference.engine.params import RequestParams

        # runs of one prompt (a GRPO group) -> one request with n samples
        runs: list[tuple[list[int], int]] = []
        for p in prompts:
            if runs and runs[-1][0] == list(p):
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((list(p), 1))
        params = [
            RequestParams(
                max_tokens=max_new_tokens,
                temperature=0.0 if sampling.greedy else sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                seed=(seed * 1_000_003 + i) % 2**32,
                stop_token_ids=tuple(stop_ids),
                n=n,
                logprobs=True,
                ignore_eos=True,
            )  # stops: stop_ids only
            for i, (_, n) in enumerate(runs)
        ]
        done = self.engine.generate([p for p, _ in runs], params)
        samples = [s for c in done for s in c.samples]
        return RolloutOutput(
            [list(s.token_ids) for s in samples],
            [np.asarray(s.logprobs, np.float32) for s in samples],
            [s.finish_reason == "length" for s in samples],
        )

    # scoring is the static sampler's: one padded forward of the same weights
    score = JaxEngine.score


class HFEngine:
    """transformers AutoModelForCausalLM built from the config, weights loaded in memory."""

    def __init__(self, cfg: ModelConfig, params: Params | None = None, *, device: str = "cpu"):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        self.cfg, self.device = cfg, device
        # async learners update weights from another thread than the one generating
        self._lock = threading.RLock()
        d = cfg.to_hf_dict()
        hc = AutoConfig.for_model(d.pop("model_type"), **d)
        with torch.device(device):
            self.model = AutoModelForCausalLM.from_config(hc, dtype=torch.float32).eval()
        if params is not None:
            self.update_weights(params)

    def update_weights(self, params: Params) -> None:
        import torch

        from jaxturbo.bridge.hf import hf_from_params

        tensors = {
            k: torch.from_numpy(np.array(v, np.float32))  # a writable copy
            for k, v in hf_from_params(params, self.cfg).items()
        }
        with self._lock:
            missing, unexpected = self.model.load_state_dict(tensors, strict=False)
            if self.cfg.tie_word_embeddings:
                self.model.tie_weights()
        # a tied model's lm_head is the embedding, so the bridge does not emit it
        missing = [
            m for m in missing if not (m == "lm_head.weight" and self.cfg.tie_word_embeddings)
        ]
        if missing or unexpected:
            raise UserError(
                f"HF rollout engine: weights do not match the transformers model "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )

    def score(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
    ) -> list[np.ndarray]:
        import torch

        rows = padded_sequences(prompts, completions)
        with self._lock, torch.no_grad():
            ids = torch.from_numpy(rows["tokens"]).long().to(self.device)
            att = torch.from_numpy(rows["segment_ids"] > 0).long().to(self.device)
            att[:, 0] = 1  # a 1-token prompt with an empty completion still has a valid row start
            logits = self.model(input_ids=ids, attention_mask=att).logits.float().cpu().numpy()
        lp = np.asarray(
            logprobs_from_logits(jnp.asarray(logits), jnp.asarray(rows["targets"]), temperature)
        )
        return cut_completions(lp, prompts, completions)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        seed: int = 0,
    ) -> RolloutOutput:
        import torch

        torch.manual_seed(seed)
        stops = set(stop_ids)
        comps: list[list[int]] = []
        with self._lock, torch.no_grad():
            for p in prompts:  # one prompt at a time: no padding semantics to reconcile
                kw: dict[str, Any] = dict(
                    max_new_tokens=max_new_tokens,
                    do_sample=not sampling.greedy,
                    eos_token_id=sorted(stops) or None,
                    pad_token_id=0,
                )
                if not sampling.greedy:
                    # top_k passed even when 0: None would fall back to generation_config's 50
                    kw.update(
                        temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p
                    )
                out = self.model.generate(torch.tensor([list(p)], device=self.device), **kw)
                c = out[0, len(p) :].tolist()
                cut = next((i + 1 for i, t in enumerate(c) if t in stops), len(c))
                comps.append(c[:cut])
        logprobs = self.score(prompts, comps, temperature=_score_temperature(sampling))
        return RolloutOutput(
            comps, logprobs, [len(c) == max_new_tokens and c[-1] not in stops for c in comps]
        )


def vllm_available() -> bool:
    """Whether `import vllm` can work here (checked without importing it: it is heavy)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMEngine:
    """A `vllm.LLM` started from an HF directory of the same architecture, weights replaced in
    memory by `update_weights` (UNTESTED, see the module docstring).

    model_dir: an HF directory (config and tokenizer; its weights are overwritten at once when
      `params` is given).  llm_kwargs: passed to `vllm.LLM` (e.g. gpu_memory_utilization).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params | None = None,
        *,
        model_dir: str,
        dtype: str = "float32",
        seed: int = 0,
        **llm_kwargs: Any,
    ):
        if not vllm_available():
            raise UserError(
                "rollout_engine=vllm: vllm is not installed in this environment "
                "(pip install vllm on a GPU machine); choose jax or hf"
            )
        import vllm  # lazily: vLLM is optional and slow to import

        self.cfg = cfg
        self._vllm = vllm
        # token ids in, token ids out: the tokenizer is never needed
        llm_kwargs.setdefault("skip_tokenizer_init", True)
        self.llm = vllm.LLM(model=str(model_dir), dtype=dtype, seed=seed, **llm_kwargs)
        if params is not None:
            self.update_weights(params)

    def update_weights(self, params: Params) -> None:
        import torch

        from jaxturbo.bridge.hf import hf_from_params

        weights = [
            (k, torch.from_numpy(np.array(v, np.float32)))
            for k, v in hf_from_params(params, self.cfg).items()
        ]

        def load(model: Any) -> None:
            model.load_weights(weights=weights)

        if hasattr(self.llm, "apply_model"):  # newer vLLM: runs the function in each worker
            self.llm.apply_model(load)
        else:  # older in-process engine
            load(self.llm.llm_engine.model_executor.driver_worker.model_runner.model)
        if hasattr(self.llm, "reset_prefix_cache"):  # cached KV blocks came from the old weights
            self.llm.reset_prefix_cache()

    def _params(
        self, sampling: SamplingParams, max_new_tokens: int, stop_ids: Sequence[int], seed: int
    ) -> Any:
        if not sampling.greedy and sampling.temperature != 1.0:
            raise UserError(
                f"vllm engine: temperature {sampling.temperature} is not supported "
                "(its logprobs are of the unscaled distribution); use 1.0 or greedy"
            )
        return self._vllm.SamplingParams(
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p,
            top_k=sampling.top_k if (sampling.top_k and not sampling.greedy) else -1,
            max_tokens=max_new_tokens,
            stop_token_ids=list(stop_ids),
            ignore_eos=True,
            logprobs=0,
            seed=seed,
        )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        seed: int = 0,
    ) -> RolloutOutput:
        # one seed per request: a group repeats its prompt, and equal seeds would give equal
        # samples
        reqs = [{"prompt_token_ids": list(p)} for p in prompts]
        sps = [
            self._params(sampling, max_new_tokens, stop_ids, seed * len(prompts) + i)
            for i in range(len(prompts))
        ]
        outs = self.llm.generate(reqs, sps, use_tqdm=False)
        stops = set(stop_ids)
        comps, lps = [], []
        for o in outs:
            c = o.outputs[0]
            comps.append(list(c.token_ids))
            lps.append(
                np.array([d[t].logprob for t, d in zip(c.token_ids, c.logprobs)], np.float32)
            )
        return RolloutOutput(
            comps, lps, [len(c) == max_new_tokens and c[-1] not in stops for c in comps]
        )

    def score(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
    ) -> list[np.ndarray]:
        if temperature != 1.0:
            raise UserError(
                f"vllm engine: score at temperature {temperature} is not supported; use 1.0"
            )
        reqs = [{"prompt_token_ids": list(p) + list(c)} for p, c in zip(prompts, completions)]
        sp = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0)
        out = []
        for o, p, c in zip(self.llm.generate(reqs, sp, use_tqdm=False), prompts, completions):
            per = o.prompt_logprobs[len(p) :]  # entry j scores token j given tokens < j
            out.append(np.array([d[t].logprob for t, d in zip(c, per)], np.float32))
        return out


ROLLOUT_ENGINES = {"jax": JaxEngine, "engine": PagedEngine, "hf": HFEngine, "vllm": VLLMEngine}


def collect_rollouts(
    engine: RolloutEngine,
    task: Any,
    n_prompts: int,
    group_size: int,
    sampling: SamplingParams,
    *,
    max_new_tokens: int,
    rng: np.random.Generator,
    stop_ids: Sequence[int] = (),
    seed: int = 0,
) -> tuple[list[Any], dict[str, float]]:
    """Sample n_prompts problems from `task` (`jaxturbo.rl.envs.Task`), group_size rollouts each,
    scored by the task's reward.  Returns `jaxturbo.rl.batch.Rollout`s and timing metrics
    (rollout_s, rollout_tokens, response_len)."""
    import time

    from jaxturbo.rl.batch import Rollout, repeat_prompts

    problems = task.sample(n_prompts, rng)
    prompts, groups = repeat_prompts([p.prompt for p in problems], group_size)
    t0 = time.perf_counter()
    out = engine.generate(
        prompts, sampling, max_new_tokens=max_new_tokens, stop_ids=stop_ids, seed=seed
    )
    rollout_s = time.perf_counter() - t0
    rollouts = [
        Rollout(p, c, lp, task.reward(problems[g], c), int(g), truncated=t)
        for p, c, lp, g, t in zip(prompts, out.completions, out.logprobs, groups, out.truncated)
    ]
    n_tok = sum(len(c) for c in out.completions)
    return rollouts, {
        "rollout_s": rollout_s,
        "rollout_tokens": float(n_tok),
        "response_len": n_tok / max(len(prompts), 1),
    }
