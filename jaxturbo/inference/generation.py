"""Batched generation: one jitted prefill, then an on-device decode loop (`lax.while_loop`).

Prompts of different lengths are right-padded to a bucketed length; each row keeps its own
length in the KV cache, so a decode step writes and attends per row.  The loop stops on the
device once every row has produced a stop token (tested every `STOP_CHECK_EVERY` steps) or
`max_new_tokens`; tokens reach the host through an ordered
`io_callback` only when streaming is asked for.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxturbo.errors import UserError
from jaxturbo.inference.sampling import SamplingParams, sample
from jaxturbo.models.dispatch import AnyConfig, model_functions
from jaxturbo.models.transformer import Cache, Params, lm_head


@dataclasses.dataclass
class GenerationResult:
    """tokens/logprobs [B, max_new_tokens] (after a row's stop: pad_id / 0); num_tokens [B]
    counts generated tokens including the stop token."""

    tokens: np.ndarray
    logprobs: np.ndarray
    num_tokens: np.ndarray

    def sequences(self) -> list[list[int]]:
        return [list(map(int, t[:n])) for t, n in zip(self.tokens, self.num_tokens)]


def bucket(n: int, multiple: int = 64) -> int:
    """Round n up to a multiple, so prompts of similar length share one compilation."""
    return max(multiple, -(-n // multiple) * multiple)


def prefill(
    fwd: Callable,
    params: Params,
    cfg: AnyConfig,
    tokens: jax.Array,
    lengths: jax.Array,
    cache: Cache,
    attn_impl: str,
) -> tuple[jax.Array, Cache]:
    """Cached prefill of right-padded prompts tokens [B, T] -> (logits [B, V] float32 at each
    row's last prompt token, cache).  The LM head runs on those B rows only: over all B x T
    positions it is a [B, T, V] float32 tensor (3 GB for 16 x 1024 tokens of a 49K vocabulary,
    20 GB per GPU for 64 x 1024 of Llama-3's 128K at TP 8) and a fifth of a small model's
    prefill FLOPs, for logits nobody reads.  fwd: the config's forward (`models.model_functions`)
    or a wrapper with its signature (e.g. tensor-parallel), which returns the final normed
    hidden state with return_hidden."""
    b, t = tokens.shape
    seg = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.int32)  # padding: segment 0
    hidden, cache = fwd(
        params,
        cfg,
        tokens,
        segment_ids=seg,
        cache=cache,
        lengths=lengths,
        attn_impl=attn_impl,
        return_hidden=True,
    )
    last = hidden[jnp.arange(b), lengths - 1]
    return lm_head(params, cfg, last[:, None])[:, 0], cache


@functools.partial(
    jax.jit,
    static_argnames=(
        "cfg",
        "max_new_tokens",
        "sampling",
        "stream",
        "attn_impl",
        "cache_dtype",
        "model_fn",
        "kv_heads",
    ),
)
def generate_arrays(
    params: Params,
    tokens: jax.Array,
    lengths: jax.Array,
    key: jax.Array,
    stop_ids: jax.Array,
    *,
    cfg: AnyConfig,
    max_new_tokens: int,
    sampling: SamplingParams,
    stream: Callable | None,
    attn_impl: str,
    cache_dtype: str,
    model_fn: Callable | None = None,
    kv_heads: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    # model_fn: a hashable stand-in for the forward with its signature (e.g. tensor-parallel
    # `jaxturbo.parallel.tensor.TensorParallel`); kv_heads: the cache's (global) KV head count.
    fns = model_functions(cfg)  # GQA or MLA, chosen while tracing
    fwd = fns.forward if model_fn is None else model_fn
    b, p = tokens.shape
    heads = {} if kv_heads is None else {"kv_heads": kv_heads}
    cache = fns.init_cache(cfg, b, p + max_new_tokens, jnp.dtype(cache_dtype), **heads)
    last, cache = prefill(fwd, params, cfg, tokens, lengths, cache, attn_impl)
    key, sub = jax.random.split(key)
    tok, logp = sample(last, sub, sampling)

    out_tok = jnp.zeros((b, max_new_tokens), jnp.int32)
    out_logp = jnp.zeros((b, max_new_tokens), jnp.float32)
    done = jnp.zeros((b,), bool)
    count = jnp.zeros((b,), jnp.int32)

    def body(state):
        step, tok, logp, cache, out_tok, out_logp, done, count, key = state
        live = ~done
        out_tok = out_tok.at[:, step].set(jnp.where(live, tok, 0))
        out_logp = out_logp.at[:, step].set(jnp.where(live, logp, 0.0))
        count = count + live.astype(jnp.int32)
        if stream is not None:
            io_callback(stream, None, tok, live, ordered=True)
        done = done | jnp.isin(tok, stop_ids)
        logits, cache = fwd(params, cfg, tok[:, None], cache=cache, attn_impl=attn_impl)
        key, sub = jax.random.split(key)
        tok, logp = sample(logits[:, 0], sub, sampling)
        return step + 1, tok, logp, cache, out_tok, out_logp, done, count, key

    # The stop test runs every `k` steps: a GPU while loop whose trip count XLA cannot know
    # copies its predicate to the host and waits for it on every iteration, so the device's
    # queue drains once per step (under tensor parallelism each GPU's host thread then
    # relaunches on its own; a TP-2 profiler trace (docs/findings.md) showed the GPUs out of step
    # at every all-reduce).  The inner loops' trip counts are static, so they run without a
    # host round trip; steps after every row stopped are masked no-ops.
    k = min(STOP_CHECK_EVERY, max_new_tokens)
    full, rest = max_new_tokens - max_new_tokens % k, max_new_tokens % k

    def steps(n):
        return lambda state: jax.lax.fori_loop(0, n, lambda _, st: body(st), state)

    def cond(state):
        step, _, _, _, _, _, done, _, _ = state
        return (step < full) & ~jnp.all(done)

    state = (jnp.int32(0), tok, logp, cache, out_tok, out_logp, done, count, key)
    state = jax.lax.while_loop(cond, steps(k), state)
    if rest:  # the last max_new_tokens % k steps, unless every row has stopped
        state = jax.lax.cond(jnp.all(state[6]), lambda st: st, steps(rest), state)
    return state[4], state[5], state[7]


STOP_CHECK_EVERY = 16  # decode steps between host-visible stop tests, at most


def generate(
    params: Params,
    cfg: AnyConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    sampling: SamplingParams = SamplingParams(),
    stop_ids: Sequence[int] | None = None,
    seed: int = 0,
    stream: Callable[[np.ndarray, np.ndarray], None] | None = None,
    attn_impl: str = "auto",
    bucket_multiple: int = 64,
    model_fn: Callable | None = None,
    kv_heads: int | None = None,
    batch_sharding: jax.sharding.NamedSharding | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> GenerationResult:
    """Generate continuations for a batch of token-id prompts of any lengths.

    cfg: a `ModelConfig` (GQA, KV cache) or an `MLAConfig` (latent cache, absorbed decode);
    `jaxturbo.models.model_functions` picks the forward and the cache.

    Args:
      prompts: B lists of token ids (each non-empty).
      stop_ids: tokens that end a row (included in its output); None (the default): the
        model's end-of-sequence ids (`cfg.eos_token_id`); () runs every row to max_new_tokens.
      stream: called on the host once per step with (tokens [B], live [B]) while the loop runs.
      mesh: run the model tensor-parallel over this mesh's `tensor` (and `data`) axes, params
        placed by `jaxturbo.parallel.tensor.shard_params` or `jaxturbo.inference.fused.shard_fused`;
        the cache [L, B, S, max(K, tp), hd] stays sharded over its head axis.
      model_fn: hashable replacement for the forward with its signature (tensor parallel:
        `jaxturbo.parallel.tensor.TensorParallel(mesh)`, params from `shard_params`).
      kv_heads: KV heads of the cache when they differ from the config's (replicated under TP).
      batch_sharding: a NamedSharding whose spec splits the prompt rows (e.g. over a mesh's batch
        axes, params replicated there): the prompts are placed with it and jit propagates the
        split through the loop; B must divide by the axes' size.
    """
    if mesh is not None:
        from jaxturbo.parallel import tensor

        tensor.check_mesh(cfg, mesh, len(prompts))
        model_fn = tensor.TensorParallel(mesh)
        kv_heads = tensor.cache_kv_heads(cfg, tensor.tensor_size(mesh))
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt must contain at least one token")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 1")
    lens = np.array([len(p) for p in prompts], np.int32)
    width = bucket(int(lens.max()), bucket_multiple)
    if width + max_new_tokens > cfg.max_position_embeddings:
        width = int(lens.max())
    if int(lens.max()) + max_new_tokens > cfg.max_position_embeddings:
        raise UserError(
            f"prompt of {int(lens.max())} tokens + {max_new_tokens} new tokens exceeds the model's "
            f"context of {cfg.max_position_embeddings}"
        )
    toks = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        toks[i, : len(p)] = p
    if stop_ids is None:
        stop_ids = cfg.eos_token_id
    stops = np.array(sorted(set(stop_ids)) or [-1], np.int32)
    dtype = jax.tree.leaves(params)[0].dtype
    if batch_sharding is None:
        toks_d, lens_d = jnp.asarray(toks), jnp.asarray(lens)
    else:
        rows = jax.sharding.PartitionSpec(batch_sharding.spec[0] if batch_sharding.spec else None)
        toks_d = jax.device_put(toks, batch_sharding)
        lens_d = jax.device_put(lens, jax.sharding.NamedSharding(batch_sharding.mesh, rows))
    out, logp, n = generate_arrays(
        params,
        toks_d,
        lens_d,
        jax.random.key(seed),
        jnp.asarray(stops),
        cfg=cfg,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stream=stream,
        attn_impl=attn_impl,
        cache_dtype=jnp.dtype(dtype).name,
        model_fn=model_fn,
        kv_heads=kv_heads,
    )
    return GenerationResult(np.asarray(out), np.asarray(logp), np.asarray(n))
