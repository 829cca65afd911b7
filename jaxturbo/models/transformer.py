"""The functional decoder: forward(params, cfg, tokens, ...) -> logits, cache.

Parameters are a dict named as in HF checkpoints, with the layers stacked on a leading axis:

    "model.embed_tokens.weight" [V, D]   "model.norm.weight" [D]   "lm_head.weight" [V, D] (untied)
    "layers": {"self_attn.q_proj.weight": [L, H*hd, D], ..., "mlp.down_proj.weight": [L, D, F]}

The same per-device code runs on one device and inside `jax.shard_map` for tensor parallelism:
head and FFN counts are read from the (local) weight shapes, and `tensor_axis` names the mesh
axis whose `psum` follows each row-parallel projection (o_proj, down_proj) and over which the
embedding and LM head are vocab-parallel.

Residual modes (cfg.residual_mode), over the same parameters:
  standard  x += attn(x); x += mlp(x)
  parallel  x += attn(x) + mlp(x)                    (PaLM; one all-reduce per layer)
  ladder    Ladder-Residual (Zhang et al., ICML 2025): each module reads the stream before the
            previous module's output is added, so that output's all-reduce overlaps this
            module's compute; the last two outputs are added before the final norm
  hybrid    standard on the first L-N layers, ladder on the last N (cfg.ladder_layers)

`forward(..., skip_allreduce=True)` leaves the tensor-parallel all-reduces out: the "desync"
speed bound the benchmarks compare the residual modes with (not a model).

Cache: {"k", "v": [L, B, S, K, hd], "lengths": [B] int32}.  A row's valid slots are
[0, lengths[b]); prompts are right-padded, so a decode step writes slot lengths[b].
Or a `PagedCache` (the serving engine's): one flat ragged batch tokens [1, T] with explicit
positions, K/V in pages read through per-sequence page tables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import pallas_kernels
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.layers import (
    GATE_UP_W,
    QKV_B,
    QKV_W,
    linear,
    rms_norm,
    split_qkv,
    swiglu_down,
    swiglu_mlp,
)
from jaxturbo.models.lora import lora_linear
from jaxturbo.models.moe import (
    ROUTER_W,
    MoEOptions,
    add_router_stats,
    moe_implementation,
    moe_mlp,
    psum_router_stats,
    router_losses,
    zero_router_stats,
)
from jaxturbo.models.rope import apply_rope, rope_cos_sin
from pallas_kernels.ragged_paged_attention import ragged_paged_attention, write_kv_pages

Params = dict[str, Any]
Cache = dict[str, jax.Array]
AttnFn = Callable[..., jax.Array]


# ----------------------------------------------------------------------------- cache
def init_cache(
    cfg: ModelConfig,
    batch: int,
    max_len: int,
    dtype: Any = jnp.float32,
    kv_heads: int | None = None,
) -> Cache:
    """Empty KV cache for `batch` rows of up to `max_len` tokens (kv_heads: local count under TP)."""
    k = cfg.num_key_value_heads if kv_heads is None else kv_heads
    shape = (cfg.num_hidden_layers, batch, max_len, k, cfg.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "lengths": jnp.zeros((batch,), jnp.int32),
    }


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: Any = jnp.bfloat16) -> int:
    """Bytes of K and V cached per token over all layers."""
    return (
        2
        * cfg.num_hidden_layers
        * cfg.num_key_value_heads
        * cfg.head_dim
        * jnp.dtype(dtype).itemsize
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedCache:
    """Paged KV cache plus the layout of one flat ragged batch (the serving engine's step).

    k_pages, v_pages: [L, num_pages, page_size, K, hd]; page 0 is the null page.
    slot_mapping: [T] flat slot (page * page_size + row) each new token's K/V is written to.
    page_tables: [S, max_pages] page ids per sequence (0-padded); seq_lens: [S] tokens of each
    sequence after this step; query_start_loc: [S + 1] cumulative new-token counts.
    sliding_window: positions attended, the token's own included (static; None: full).
    """

    k_pages: jax.Array
    v_pages: jax.Array
    slot_mapping: jax.Array
    page_tables: jax.Array
    seq_lens: jax.Array
    query_start_loc: jax.Array
    sliding_window: int | None = dataclasses.field(default=None, metadata=dict(static=True))


def paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    layer: jax.Array,
    cache: PagedCache,
    attn_impl: str,
) -> tuple[jax.Array, PagedCache]:
    """Attention of a flat ragged batch: q [1, T, H, hd], k, v [1, T, K, hd] (unrotated).

    The new K/V are written at slot_mapping before attention reads the pages, so a sequence
    may read pages another sequence of the same step writes (prefix-cache hits).
    Returns [1, T, H, hd] and the cache with this layer's pages updated."""
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    kp, vp = write_kv_pages(cache.k_pages, cache.v_pages, k[0], v[0], cache.slot_mapping, layer)
    out = ragged_paged_attention(
        q[0],
        kp,
        vp,
        cache.page_tables,
        cache.seq_lens,
        cache.query_start_loc,
        layer=layer,
        sliding_window=cache.sliding_window,
        implementation=attn_impl,
    )
    return out[None], dataclasses.replace(cache, k_pages=kp, v_pages=vp)


# ----------------------------------------------------------------------------- embedding / head
def embed(params: Params, tokens: jax.Array, tensor_axis: str | None = None) -> jax.Array:
    """tokens [B, T] -> [B, T, D]; vocab-parallel (masked local lookup + psum) under `tensor_axis`."""
    table = params["model.embed_tokens.weight"]
    if tensor_axis is None:
        return table[tokens]
    v_local = table.shape[0]
    local = tokens - jax.lax.axis_index(tensor_axis) * v_local
    ok = (local >= 0) & (local < v_local)
    x = jnp.where(ok[..., None], table[jnp.clip(local, 0, v_local - 1)], 0)
    return jax.lax.psum(x, tensor_axis)


def lm_head(
    params: Params, cfg: ModelConfig, x: jax.Array, tensor_axis: str | None = None
) -> jax.Array:
    """Final hidden [B, T, D] -> logits [B, T, V] float32 (all-gathered over `tensor_axis`)."""
    w = params["model.embed_tokens.weight"] if cfg.tie_word_embeddings else params["lm_head.weight"]
    # product in the parameters' dtype, then float32 (as HF does): a float32-result GEMV is 4x
    # slower at batch 1 on an H100 (see layers.linear)
    logits = jnp.einsum("btd,vd->btv", x, w).astype(jnp.float32)
    if tensor_axis is not None:
        logits = jax.lax.all_gather(logits, tensor_axis, axis=-1, tiled=True)
    return logits


# ----------------------------------------------------------------------------- attention
def attention_block(
    lp: Params,
    cfg: ModelConfig,
    h: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    layer: jax.Array,
    *,
    segment_ids: jax.Array | None,
    cache: Cache | None,
    attn_impl: str,
    attn_fn: AttnFn | None,
) -> tuple[jax.Array, Cache | None]:
    """Self-attention of one layer on normed input h [B, T, D] (local heads under TP).

    Without a cache: causal attention over the T tokens (packed rows via segment_ids).
    With a cache and T > 1 (prefill): also writes K/V into slots [0, T) of `layer`.
    With a cache and T == 1 (decode): writes slot lengths[b], attends to [0, lengths[b]].
    Returns the o_proj output before any all-reduce, and the updated cache.
    """
    b, t, _ = h.shape
    hd = cfg.head_dim
    decode = cache is not None and t == 1 and not isinstance(cache, PagedCache)
    packed = None  # the fused projection's output, when q, k and v can be read from it in place
    if QKV_W in lp:  # one GEMV for q, k and v (jaxturbo/inference/fused.py)
        q_heads = lp["self_attn.o_proj.weight"].shape[-1] // hd  # local, as every count here
        packed = linear(h, lp[QKV_W])
        if QKV_B in lp:
            packed = packed + lp[QKV_B].astype(packed.dtype)
        packed = packed.reshape(b, t, -1, hd)
        q, k, v = split_qkv(packed, q_heads)
    else:
        q, k, v = (lora_linear(h, lp, f"self_attn.{n}_proj").reshape(b, t, -1, hd) for n in "qkv")
    if cfg.qk_norm:  # Qwen3: RMSNorm over each head's vector before RoPE
        q = rms_norm(q, lp["self_attn.q_norm.weight"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["self_attn.k_norm.weight"], cfg.rms_norm_eps)
        packed = None

    if isinstance(cache, PagedCache):  # the engine's flat ragged batch
        out, cache = paged_attention(q, k, v, cos, sin, layer, cache, attn_impl)
    elif decode:
        # k's rotation and the cache write go into the decode kernel on GPU (four small
        # kernels fewer per layer).  From a fused projection the step reads k and v at their
        # head offsets in its output: slicing them out would cost a copy each.
        src = (
            (k[:, 0], v[:, 0], 0, 0)
            if packed is None
            else (packed[:, 0], packed[:, 0], q.shape[2], q.shape[2] + k.shape[2])
        )
        out, kc, vc = pallas_kernels.decode_attention_append(
            apply_rope(q, cos, sin)[:, 0],
            src[0],
            src[1],
            cache["k"],
            cache["v"],
            cache["lengths"],
            layer=layer,
            rope=(cos[:, 0], sin[:, 0]),
            implementation=attn_impl,
            k_head_offset=src[2],
            v_head_offset=src[3],
        )
        out = out[:, None]
        cache = {**cache, "k": kc, "v": vc}
    else:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            start = (layer, 0, 0, 0, 0)
            cache = {
                **cache,
                "k": jax.lax.dynamic_update_slice(
                    cache["k"], k[None].astype(cache["k"].dtype), start
                ),
                "v": jax.lax.dynamic_update_slice(
                    cache["v"], v[None].astype(cache["v"].dtype), start
                ),
            }
        if attn_fn is not None:
            out = attn_fn(q, k, v, segment_ids=segment_ids)
        else:
            out = pallas_kernels.attention(
                q, k, v, causal=True, segment_ids=segment_ids, implementation=attn_impl
            )
    return lora_linear(out.reshape(b, t, -1), lp, "self_attn.o_proj"), cache


def mlp_block(
    lp: Params, h: jax.Array, cfg: ModelConfig | None = None, moe_impl: str = "auto"
) -> jax.Array:
    """SwiGLU MLP of one layer on normed input h [B, T, D], before any all-reduce; a sparse
    layer (router weight present) is the mixture of experts of `cfg.moe` (`models.moe`)."""
    if ROUTER_W in lp:
        return moe_mlp(lp, cfg.moe, h, implementation=moe_impl)[0]
    if GATE_UP_W in lp:  # one GEMV for gate and up (jaxturbo/inference/fused.py)
        gate_up = linear(h, lp[GATE_UP_W])
        gate, up = jnp.split(gate_up, 2, axis=-1)
        return swiglu_down(gate, up, lp["mlp.down_proj.weight"])
    return swiglu_mlp(
        h, lp["mlp.gate_proj.weight"], lp["mlp.up_proj.weight"], lp["mlp.down_proj.weight"]
    )


# ----------------------------------------------------------------------------- layers
def _layer_slice(layers: Params, i: Any) -> Params:
    return jax.tree.map(lambda a: a[i], layers)


def _run_layers(
    step: Callable,
    carry: Any,
    layers: Params,
    start: int,
    stop: int,
    unroll: bool,
    remat: tuple[Any] | None = None,
) -> Any:
    """Apply step(carry, layer_params, layer_index) over layers [start, stop).

    remat: (policy,) checkpoints every layer with that `jax.checkpoint` policy (None inside the
    tuple: save nothing), so the backward keeps one layer's residuals instead of all of them."""
    if stop <= start:
        return carry
    if remat is not None:
        step = jax.checkpoint(step, policy=remat[0])
    if unroll:
        for i in range(start, stop):
            carry = step(carry, _layer_slice(layers, i), jnp.int32(i))
        return carry
    n = jax.tree.leaves(layers)[0].shape[0]
    sub = layers if (start, stop) == (0, n) else jax.tree.map(lambda a: a[start:stop], layers)

    def body(c, xs):
        lp, i = xs
        return step(c, lp, i), None

    carry, _ = jax.lax.scan(body, carry, (sub, jnp.arange(start, stop, dtype=jnp.int32)))
    return carry


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: Cache | None = None,
    lengths: jax.Array | None = None,
    tensor_axis: str | None = None,
    attn_impl: str = "auto",
    attn_fn: AttnFn | None = None,
    unroll: bool = False,
    layer_remat: tuple[Any] | None = None,
    return_hidden: bool = False,
    skip_allreduce: bool = False,
    moe_impl: str | None = None,
    return_aux: bool = False,
    router_mask: jax.Array | None = None,
    moe_options: MoEOptions | None = None,
) -> tuple[jax.Array, Cache | None] | tuple[jax.Array, Cache | None, dict[str, jax.Array]]:
    """Run the decoder.

    Args:
      tokens: [B, T] int32.
      positions: [B, T] RoPE positions (default: 0..T-1, or cache lengths when decoding).
      segment_ids: [B, T] packed-sequence ids; tokens attend only within their segment
        (padding gets its own id, e.g. 0).
      cache: KV cache from `init_cache`.  T > 1 is a prefill (requires `lengths` [B], the
        valid tokens per right-padded row); T == 1 is one decode step.  Or a `PagedCache`:
        tokens [1, T] are a flat ragged batch of many sequences' new tokens, `positions`
        required (returned with its pages updated).
      tensor_axis: mesh axis of tensor parallelism when called inside shard_map.
      attn_fn: replaces the attention op (e.g. sequence-parallel attention) when no cache.
      unroll: Python loop over layers instead of lax.scan (lets XLA schedule across layers).
      layer_remat: (policy,) to rematerialise each layer in the backward (see `_run_layers`).
      return_hidden: return the final normed hidden state [B, T, D] instead of logits.
      skip_allreduce: leave out the per-layer tensor-parallel all-reduces ("desync"): wrong
        values, the speed bound that benchmarks compare the residual modes with.
      moe_impl: grouped-GEMM backend of mixture-of-experts layers (default: attn_impl where it
        names one, else "auto"; `models.moe.moe_implementation`).
      return_aux: also return the router losses (`models.moe.router_losses`: "router_aux_loss",
        "router_z_loss", "tokens_per_expert", and "router_loss", their sum weighted by the
        config's coefficients; zeros for a dense model).
      router_mask: [B, T] tokens the router losses count (default all; e.g. 0 on padding).
      moe_options: the sparse layers' dispatch (expert parallelism), capacity and token axes
        (`models.moe.MoEOptions`; default: dropless on this device's tokens).
    Returns:
      logits [B, T, V] float32 (or hidden), the updated cache (None without one), and with
      return_aux the dict of router losses.
    """
    b, t = tokens.shape
    paged = isinstance(cache, PagedCache)
    if positions is None:
        if paged:
            raise ValueError("a PagedCache needs explicit positions [1, T]")
        if cache is not None and t == 1:
            positions = cache["lengths"][:, None]
        else:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if cache is not None and t > 1 and lengths is None and not paged:
        raise ValueError("prefill with a cache needs `lengths` (valid tokens per row)")
    cos, sin = rope_cos_sin(cfg, positions)
    x = embed(params, tokens, tensor_axis)

    # every residual mode sums the layers' partial outputs over the tensor axis; a benchmark's
    # desync variant leaves the sums out
    reduce_ax = None if skip_allreduce else tensor_axis

    def reduce(y: jax.Array) -> jax.Array:
        return y if reduce_ax is None else jax.lax.psum(y, reduce_ax)

    eps = cfg.rms_norm_eps
    kw = dict(segment_ids=segment_ids, attn_impl=attn_impl, attn_fn=attn_fn)

    def attn(c_cache, lp, i, xin):
        return attention_block(
            lp,
            cfg,
            rms_norm(xin, lp["input_layernorm.weight"], eps),
            cos,
            sin,
            i,
            cache=c_cache,
            **kw,
        )

    gmm_impl = moe_implementation(moe_impl, attn_impl)
    moe_opts = moe_options or MoEOptions()
    moe_decode = cache is not None  # inference: few tokens may take the GEMV dispatch

    def mlp(lp, xin, s):
        """The MLP's output, and the router statistics `s` summed over layers (None: unused)."""
        h = rms_norm(xin, lp["post_attention_layernorm.weight"], eps)
        if ROUTER_W not in lp:
            return mlp_block(lp, h), s
        y, stats = moe_mlp(
            lp,
            cfg.moe,
            h,
            implementation=gmm_impl,
            token_mask=router_mask,
            decode=moe_decode,
            dispatch=moe_opts.dispatch,
            capacity_factor=moe_opts.capacity_factor,
        )
        return y, None if s is None else add_router_stats(s, stats)

    def standard_step(carry, lp, i):
        x, pa, pm, c, s = carry
        a, c = attn(c, lp, i, x)
        x = x + reduce(a)
        m, s = mlp(lp, x, s)
        return x + reduce(m), pa, pm, c, s

    def parallel_step(carry, lp, i):
        x, pa, pm, c, s = carry
        a, c = attn(c, lp, i, x)
        m, s = mlp(lp, x, s)
        return x + reduce(a + m), pa, pm, c, s

    def ladder_step(carry, lp, i):
        x, pa, pm, c, s = carry
        x = x + pa  # previous attention's all-reduce is needed only now
        a, c = attn(c, lp, i, x)
        # Each barrier orders an all-reduce after the previous one and hands the next module a
        # new x, produced only once this module's compute is done.  Without them XLA's
        # all-reduce combiner merges each module's all-reduce with the next, independent one,
        # and its multi-output fusion merges two consecutive modules' input norms, so a module
        # waits for the all-reduce it was meant to hide (docs/findings.md, Ladder-Residual).
        if reduce_ax is not None:
            a, pm, x = jax.lax.optimization_barrier((a, pm, x))
        x = x + pm  # previous MLP's all-reduce, overlapped by attention
        a = reduce(a)
        m, s = mlp(lp, x, s)
        if reduce_ax is not None:
            m, a, x = jax.lax.optimization_barrier((m, a, x))
        m = reduce(m)
        return x, a, m, c, s

    zeros = jnp.zeros_like(x)
    track_router = cfg.moe is not None and return_aux  # router statistics ride in the carry
    carry = (
        x,
        zeros,
        zeros,
        cache,
        zero_router_stats(cfg.moe.num_experts) if track_router else None,
    )
    L = cfg.num_hidden_layers
    layers = params["layers"]
    mode = cfg.residual_mode
    if mode == "parallel":
        carry = _run_layers(parallel_step, carry, layers, 0, L, unroll, layer_remat)
    elif mode in ("ladder", "hybrid"):
        n_ladder = L if mode == "ladder" else cfg.ladder_layers
        carry = _run_layers(standard_step, carry, layers, 0, L - n_ladder, unroll, layer_remat)
        carry = _run_layers(ladder_step, carry, layers, L - n_ladder, L, unroll, layer_remat)
    else:
        carry = _run_layers(standard_step, carry, layers, 0, L, unroll, layer_remat)
    x, pa, pm, cache, stats = carry
    x = x + pa + pm  # ladder: the last two outputs join before the final norm
    x = rms_norm(x, params["model.norm.weight"], eps)

    if cache is not None and not paged:
        new_len = cache["lengths"] + 1 if t == 1 else lengths.astype(jnp.int32)
        cache = {**cache, "lengths": new_len}
    out = x if return_hidden else lm_head(params, cfg, x, tensor_axis)
    if not return_aux:
        return out, cache
    if stats is None:  # a dense model: no router, no loss
        zero = jnp.zeros((), jnp.float32)
        aux = {"router_aux_loss": zero, "router_z_loss": zero, "router_loss": zero}
    else:
        aux = router_losses(psum_router_stats(stats, moe_opts.token_axes))
        aux["router_loss"] = (
            cfg.moe.router_aux_loss_coef * aux["router_aux_loss"]
            + cfg.moe.router_z_loss_coef * aux["router_z_loss"]
        )
    return out, cache, aux
