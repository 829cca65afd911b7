"""The serving engine: continuous batching over a paged KV cache, one model step at a time.

    engine = Engine(params, cfg, tokenizer, EngineConfig(max_num_seqs=64, num_pages=2048))
    rid = engine.add_request("Hello", RequestParams(max_tokens=32, temperature=0.7, seed=1))
    while engine.has_unfinished():
        for out in engine.step():           # streamed: new tokens and text per request
            print(out.request_id, out.new_text, out.finish_reason)
    results = engine.generate(["a", "b"], RequestParams(max_tokens=8))   # to completion

`step()` runs the scheduler (`scheduler.Scheduler`: which requests compute which tokens), the
model runner (`model_runner.ModelRunner`: one padded, compiled device step) and the output
side (detokenization, stop strings).  With `async_scheduling` (the default) the host schedules
and launches step N+1 before it reads step N's tokens: decode inputs the host has not read yet
are taken on device from the previous step's samples, so the device never waits for the host's
scheduling; a request that a stop token (or stop string) ends is computed in one more step
whose token is dropped.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxturbo.errors import UserError
from jaxturbo.inference.engine.config import EngineConfig
from jaxturbo.inference.engine.detokenizer import IncrementalDetokenizer
from jaxturbo.inference.engine.kv_cache_manager import KVCacheManager
from jaxturbo.inference.engine.model_runner import (
    ModelRunner,
    SampledTokens,
    StepHandle,
    default_compilation_cache_dir,
    enable_compilation_cache,
)
from jaxturbo.inference.engine.params import SEED_MODULUS, RequestParams
from jaxturbo.inference.engine.request import FinishReason, Request
from jaxturbo.inference.engine.scheduler import Scheduler, SchedulerOutput
from jaxturbo.models.dispatch import AnyConfig
from jaxturbo.models.transformer import Params

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one sample of a request (streamed deltas).

    request_id / index: the request and which of its n samples.  new_token_ids: the tokens
    generated this step (one; up to `EngineConfig.decode_steps` in a multi-step decode).  new_text: the text that became final this step ("" without a
    tokenizer; a stop string is cut from the text, the token that completed it is reported).
    logprobs: the logprob of each new token (when asked for); top_logprobs: per new token, the
    (token id, logprob) of the most likely alternatives.  finish_reason: "stop", "length" or
    None while the sample runs.
    """

    request_id: str
    index: int
    new_token_ids: tuple[int, ...]
    new_text: str
    finish_reason: str | None
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class Sample:
    """One finished sample of `Engine.generate`."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float] | None = None
    top_logprobs: list[tuple[tuple[int, float], ...]] | None = None


@dataclasses.dataclass
class Completion:
    """A request's result from `Engine.generate`: its prompt and its n samples."""

    request_id: str
    prompt_token_ids: list[int]
    samples: list[Sample]

    @property
    def token_ids(self) -> list[int]:
        """The first sample's tokens (the only one when n == 1)."""
        return self.samples[0].token_ids

    @property
    def text(self) -> str:
        return self.samples[0].text


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """Queue sizes, KV pool occupancy, prefix-cache effect and cumulative counters.

    prompt_tokens: prompt tokens of every sample added; prefill_tokens_computed: prompt
    positions the model computed (recomputation after preemption included): the prefix
    cache's saving is the difference.  prefix_hit_rate: tokens found in the prefix cache over
    tokens looked up at admission (resumed requests counted again)."""

    num_running: int
    num_waiting: int
    kv_pages_used: int
    kv_pages_free: int
    kv_pages_total: int
    page_size: int
    capacity_tokens: int
    prefix_hit_rate: float
    prefix_saved_tokens: int
    prompt_tokens: int
    prefill_tokens_computed: int
    num_preemptions: int
    num_steps: int
    total_scheduled_tokens: int


@dataclasses.dataclass
class _Child:
    """Engine-side state of one sample (one scheduler request)."""

    parent: str
    index: int
    params: RequestParams
    num_prompt: int
    detok: IncrementalDetokenizer | None
    finished: bool = False


class Engine:
    """Continuous-batching generation over a paged KV cache (see the module docstring).

    params, cfg: the model (ModelConfig or MLAConfig); params are placed by the engine
    (tensor-parallel over `mesh`'s `tensor` axis when a mesh is given; other axes must be 1).
    config.sliding_window is the model's attention window when every layer has one (the model
    config has no such field: set it here for Mistral / Qwen2-style windowed models).
    tokenizer: anything with encode(text) -> ids and decode(ids, skip_special_tokens=...)
    (needed for text prompts, text outputs and stop strings).  config: `EngineConfig`.
    kv_dtype: the pages' dtype (default: the parameters').  attn_impl: ragged paged attention
    implementation ("auto": the platform's kernel).  max_top_logprobs: most alternatives a
    request may ask for (every step computes that many; static).  sort_variants: compile the
    top-k / top-p sampler too (False: requests may not use them; halves the compiled steps).
    warmup: compile every step shape now (a progress bar); otherwise each shape compiles on
    first use.  compilation_cache_dir: XLA's persistent cache ("default": under jaxturbo's
    cache root; None: leave JAX's setting alone).  async_scheduling: overlap the host's
    scheduling with the device's step (module docstring; the attribute may be changed while
    the engine is idle).  dispatch_thread: launch steps from a background thread so that the
    host's bookkeeping overlaps the launch (`ModelRunner`; `engine.runner.dispatch_thread`
    may be changed while the engine is idle).  seed: draws the seeds of requests that give none.
    """

    def __init__(
        self,
        params: Params,
        cfg: AnyConfig,
        tokenizer: Any = None,
        config: EngineConfig | None = None,
        mesh: Any = None,
        *,
        kv_dtype: Any = None,
        attn_impl: str = "auto",
        max_top_logprobs: int = 0,
        sort_variants: bool = True,
        warmup: bool = True,
        compilation_cache_dir: Any = "default",
        async_scheduling: bool = True,
        dispatch_thread: bool = True,
        seed: int = 0,
    ) -> None:
        config = config or EngineConfig()
        if compilation_cache_dir == "default":
            compilation_cache_dir = default_compilation_cache_dir()
        if compilation_cache_dir is not None:
            enable_compilation_cache(compilation_cache_dir)
        max_ctx = cfg.max_position_embeddings
        if config.max_model_len > max_ctx:
            raise UserError(
                f"max_model_len={config.max_model_len} exceeds the model's context of "
                f"{max_ctx} tokens; lower EngineConfig.max_model_len"
            )
        self.cfg, self.config, self.tokenizer = cfg, config, tokenizer
        self.runner = ModelRunner(
            params,
            cfg,
            config,
            mesh=mesh,
            kv_dtype=kv_dtype,
            attn_impl=attn_impl,
            max_top_logprobs=max_top_logprobs,
            sort_variants=sort_variants,
            dispatch_thread=dispatch_thread,
        )
        self.scheduler = Scheduler(
            config, KVCacheManager.from_config(config, self.runner.num_pages)
        )
        self.async_scheduling = async_scheduling
        eos = set(cfg.eos_token_id)
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_token_ids = frozenset(eos)
        self._rng = np.random.default_rng(seed)
        self._ids = itertools.count()
        self._children: dict[str, _Child] = {}  # scheduler request id -> sample state
        self._parents: dict[str, list[str]] = {}  # request id -> its samples' ids
        self._inflight: StepHandle | None = None  # launched, tokens not read (async)
        self._prompt_tokens = 0
        self._prefill_computed = 0
        if warmup:
            self.runner.warmup()

    # -- requests -----------------------------------------------------------------------------
    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError(
                    "a text prompt needs a tokenizer: Engine(params, cfg, tokenizer) "
                    "or pass token ids"
                )
            return list(self.tokenizer.encode(prompt))
        return [int(t) for t in prompt]

    def add_request(
        self, prompt: Prompt, params: RequestParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a prompt (text or token ids) for `params.n` samples; returns its request id
        (its samples' outputs carry it with their index)."""
        return self._add(prompt, params or RequestParams(), request_id)[0]

    def _add(
        self, prompt: Prompt, params: RequestParams, request_id: str | None
    ) -> tuple[str, list[int]]:
        ids = self._encode(prompt)
        rid = f"req-{next(self._ids)}" if request_id is None else str(request_id)
        if rid in self._parents:
            raise UserError(f"request id {rid!r} is already in use by an unfinished request")
        if params.stop and self.tokenizer is None:
            raise UserError(
                f"stop={list(params.stop)} needs a tokenizer (stop strings are "
                "matched on the text); use stop_token_ids without one"
            )
        if params.top_logprobs > self.runner.num_top:
            raise UserError(
                f"top_logprobs={params.top_logprobs} exceeds the engine's "
                f"max_top_logprobs={self.runner.num_top}; create the engine with "
                f"Engine(..., max_top_logprobs={params.top_logprobs})"
            )
        if params.needs_sort and not self.runner.sort_variants:
            raise UserError(
                f"top_k={params.top_k} / top_p={params.top_p} need the sort variants: "
                "create the engine with Engine(..., sort_variants=True)"
            )
        seed = int(self._rng.integers(SEED_MODULUS)) if params.seed is None else params.seed
        children = [rid] if params.n == 1 else [f"{rid}#{i}" for i in range(params.n)]
        added: list[str] = []
        try:
            for i, cid in enumerate(children):
                req = Request(
                    cid,
                    ids,
                    params.max_tokens,
                    stop_token_ids=params.stop_token_ids,
                    eos_token_ids=self.eos_token_ids,
                    ignore_eos=params.ignore_eos,
                    priority=params.priority,
                    sampling=params.row(seed, i),
                )
                self.scheduler.add_request(req)
                added.append(cid)
                detok = (
                    IncrementalDetokenizer(self.tokenizer, ids, params.stop)
                    if self.tokenizer is not None
                    else None
                )
                self._children[cid] = _Child(rid, i, params, len(ids), detok)
        except Exception:
            for cid in added:  # all samples or none
                self.scheduler.abort_request(cid)
                self._children.pop(cid, None)
            raise
        self._parents[rid] = children
        self._prompt_tokens += len(ids) * params.n
        return rid, ids

    def abort(self, request_id: str) -> bool:
        """Abort every sample of a request; their pages are freed at once.  False if no
        unfinished request has this id."""
        children = self._parents.pop(request_id, None)
        if children is None:
            return False
        for cid in children:
            self.scheduler.abort_request(cid)
            self._children.pop(cid, None)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._parents) or self._inflight is not None

    # -- steps --------------------------------------------------------------------------------
    def _launch(self, out: SchedulerOutput) -> StepHandle:
        for sr in out.scheduled:  # prompt positions computed (recomputation included)
            child = self._children.get(sr.request_id)
            if child is not None:
                prompt_end = min(sr.seq_len, child.num_prompt)
                self._prefill_computed += max(0, prompt_end - sr.start_position)
        return self.runner.execute(out)

    def step(self) -> list[RequestOutput]:
        """Run one model step; returns the outputs it produced (possibly none)."""
        if not self.async_scheduling:
            out = self.scheduler.schedule()
            if out.is_empty:
                return []
            sampled = self._launch(out).fetch()
            return self._emit(self.scheduler.update_from_output(sampled.as_dict()), sampled)
        if self._inflight is None:
            out = self.scheduler.schedule()
            if out.is_empty:
                return []
            self._inflight = self._launch(out)
            self.scheduler.commit_step()
        # schedule and launch the next step while the device computes the one in flight
        nxt = self.scheduler.schedule()
        handle = None if nxt.is_empty else self._launch(nxt)
        sampled = self._inflight.fetch()
        outputs = self._emit(self.scheduler.resolve_tokens(sampled.as_dict()), sampled)
        self._inflight = handle
        if handle is not None:
            self.scheduler.commit_step()
        return outputs

    def _emit(self, results, sampled: SampledTokens) -> list[RequestOutput]:
        """Engine outputs of the scheduler's: detokenize, apply stop strings, attach logprobs."""
        row = {rid: i for i, rid in enumerate(sampled.request_ids)}
        outs = []
        for r in results:
            child = self._children.get(r.request_id)
            if child is None or child.finished:
                continue
            reason = r.finish_reason
            tokens: tuple[int, ...] = r.new_token_ids
            text = ""
            if child.detok is not None:
                text, kept = self._detokenize(child.detok, tokens, reason is not None)
                if child.detok.stopped:
                    if reason is None:
                        self.scheduler.finish_request(r.request_id, FinishReason.STOP)
                    if reason is None or kept < len(tokens):
                        reason = FinishReason.STOP
                    tokens = tokens[:kept]
            p, i, k = child.params, row[r.request_id], len(tokens)
            logprobs = None
            if p.logprobs or p.top_logprobs:
                logprobs = tuple(map(float, sampled.logprobs[i, :k]))
            top = None
            if p.top_logprobs:
                n = p.top_logprobs
                top = tuple(
                    tuple(zip(map(int, ids[:n]), map(float, lps[:n])))
                    for ids, lps in zip(sampled.top_ids[i, :k], sampled.top_logprobs[i, :k])
                )
            if reason is not None:
                child.finished = True
                self._retire(r.request_id)
            outs.append(
                RequestOutput(
                    child.parent,
                    child.index,
                    tokens,
                    text,
                    None if reason is None else reason.value,
                    logprobs,
                    top,
                )
            )
        return outs

    @staticmethod
    def _detokenize(
        detok: IncrementalDetokenizer, tokens: tuple[int, ...], final: bool
    ) -> tuple[str, int]:
        """The text the tokens make final and how many of them count: with stop strings, the
        tokens of a multi-step decode go in one at a time, and those after the one completing
        a stop string are dropped."""
        if not detok.stop or len(tokens) == 1:
            return detok.push(tokens, final=final), len(tokens)
        text = ""
        for j, t in enumerate(tokens):
            text += detok.push((t,), final=final and j == len(tokens) - 1)
            if detok.stopped:
                return text, j + 1
        return text, len(tokens)

    def _retire(self, cid: str) -> None:
        child = self._children.pop(cid)
        siblings = self._parents.get(child.parent)
        if siblings is not None and all(c not in self._children for c in siblings):
            del self._parents[child.parent]

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: RequestParams | Sequence[RequestParams] | None = None,
    ) -> list[Completion]:
        """Run prompts (text or token ids) to completion; one `Completion` per prompt, in
        order.  params: one for all prompts or one per prompt.  The engine must hold no other
        unfinished request (their streamed outputs would be lost)."""
        if self.has_unfinished():
            raise UserError(
                "generate() needs an idle engine: step() the requests added with "
                "add_request() to completion (or abort them) first"
            )
        if params is None or isinstance(params, RequestParams):
            params = [params or RequestParams()] * len(prompts)
        if len(params) != len(prompts):
            raise UserError(
                f"{len(params)} RequestParams for {len(prompts)} prompts; give one, "
                "or one per prompt"
            )
        rids, results = [], {}
        for prompt, p in zip(prompts, params):
            rid, ids = self._add(prompt, p, None)
            rids.append(rid)
            results[rid] = Completion(
                rid,
                ids,
                [
                    Sample(
                        i,
                        [],
                        "",
                        None,
                        [] if p.logprobs or p.top_logprobs else None,
                        [] if p.top_logprobs else None,
                    )
                    for i in range(p.n)
                ],
            )
        while self.has_unfinished():
            for o in self.step():
                s = results[o.request_id].samples[o.index]
                s.token_ids.extend(o.new_token_ids)
                s.text += o.new_text
                if o.logprobs is not None:
                    s.logprobs.extend(o.logprobs)
                if o.top_logprobs is not None:
                    s.top_logprobs.extend(o.top_logprobs)
                if o.finish_reason is not None:
                    s.finish_reason = o.finish_reason
        return [results[r] for r in rids]

    # -- weights and statistics ----------------------------------------------------------------
    def update_weights(self, params: Params) -> None:
        """Swap in new weights (same shapes, dtypes; placed like the current ones) without
        recompiling; the prefix cache is reset (its K/V came from the old weights).  Requests
        in flight continue with the new weights."""
        self.runner.update_params(params)
        self.scheduler.kv.reset_prefix_cache()

    def set_decode_steps(self, steps: int, progress: bool = True) -> None:
        """Change `EngineConfig.decode_steps` while the engine is idle (e.g. to compare a
        workload with and without multi-step decodes); compiles the new step shapes now."""
        if self.has_unfinished():
            raise UserError("set_decode_steps() needs an idle engine (no unfinished request)")
        config = dataclasses.replace(self.config, decode_steps=steps)  # validates steps
        self.config = self.scheduler.config = self.runner.config = config
        self.runner.warmup(progress)

    def set_prefix_caching(self, enabled: bool) -> None:
        """Turn prefix caching on or off while the engine is idle (e.g. to compare a workload
        with and without it); the cache starts empty either way."""
        if self.has_unfinished():
            raise UserError("set_prefix_caching() needs an idle engine (no unfinished request)")
        self.scheduler.kv.enable_prefix_caching = enabled
        self.scheduler.kv.reset_prefix_cache()

    def stats(self) -> EngineStats:
        s = self.scheduler.stats()
        kv = s.kv
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_pages_used=kv.pages_used,
            kv_pages_free=kv.pages_free,
            kv_pages_total=kv.num_pages,
            page_size=kv.page_size,
            capacity_tokens=kv.capacity_tokens,
            prefix_hit_rate=kv.hit_rate,
            prefix_saved_tokens=kv.saved_prefill_tokens,
            prompt_tokens=self._prompt_tokens,
            prefill_tokens_computed=self._prefill_computed,
            num_preemptions=s.num_preemptions,
            num_steps=s.num_steps,
            total_scheduled_tokens=s.total_scheduled_tokens,
        )
