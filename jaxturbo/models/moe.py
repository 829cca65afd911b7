"""Mixture-of-experts MLP (Qwen3-MoE, Qwen2-MoE): top-k softmax router, dropless dispatch
into grouped GEMMs, and the router losses of training.

Parameters of a sparse layer, in params["layers"] with the layer axis first.  The expert
stacks are HF's per-expert tensors stacked on an expert axis: HF's
`model.layers.{i}.mlp.experts.{j}.gate_proj.weight` is
`layers["mlp.experts.gate_proj.weight"][i, j]` (`jaxturbo.bridge.hf` maps the names;
transformers' in-memory fused `mlp.experts.gate_up_proj` [E, 2F, D] is gate rows, then up rows):

    mlp.gate.weight                       [L, E, D]     router
    mlp.experts.gate_proj.weight          [L, E, F, D]  F = moe_intermediate_size
    mlp.experts.up_proj.weight            [L, E, F, D]
    mlp.experts.down_proj.weight          [L, E, D, F]
    Qwen2-MoE's shared expert (Fs = shared_expert_intermediate_size):
    mlp.shared_expert.gate_proj.weight    [L, Fs, D]    (up_proj the same, down_proj [L, D, Fs])
    mlp.shared_expert_gate.weight         [L, 1, D]

One layer on normed input h [B, T, D], N = B*T tokens, k = num_experts_per_tok:
  route     logits = h W_r^T [N, E]; p = softmax(logits) in float32; the k largest p per token
            (renormalised to sum 1 when norm_topk_prob) weight the chosen experts.
  dispatch  `sorted_dispatch`: the N*k (token, choice) pairs sorted by expert, each projection
            one grouped GEMM over the sorted rows (`pallas_kernels.grouped_matmul.gmm`), the
            rows weighted and put back in token order, the k rows of a token summed.
            `gmv_dispatch` (few tokens, decode): one GEMV per pair through its expert's weight,
            no sort; only the routed experts' weights are read.
A dispatch is `fn(x [N, D], weights [N, k], experts [N, k], w: ExpertWeights, impl,
capacity=None) -> [N, D]`; the expert-parallel one (`jaxturbo.parallel.expert`: all-to-all of the
sorted rows over the `expert` mesh axis, `w` the local experts) replaces it through
`moe_mlp(..., dispatch=)` or `forward(..., moe_options=MoEOptions(...))`.  Every count (E, F) is
read from the weight shapes, so expert weights split on F (tensor parallel) run the same code.

Capacity (`MoEOptions.capacity_factor`, off by default: dropless): each expert takes at most
C = ceil(factor * N * k / E) of a device's N*k (token, choice) pairs, the first C in token order;
a dropped pair adds nothing (the token keeps its residual and its other choices).  The dropped
fraction is reported with the router losses ("dropped_fraction").  With factor >= E / k nothing
can drop (C >= N, and a token picks an expert at most once).

LoRA on the experts (`jaxturbo.models.lora`): with adapters `{stack}.lora_A.weight` [E, r, in]
and `{stack}.lora_B.weight` [E, out, r] (B already scaled by alpha / r) beside a stack, each
projection adds gmm(gmm(xs, A), B) of the same sorted rows: two more grouped GEMMs of rank r.

Router losses (`router_losses`): the load-balancing loss as transformers computes it
(`load_balancing_loss_func`: E * sum_e f_e P_e, with f_e the fraction of (token, choice) pairs
sent to expert e and P_e its mean router probability, both over all sparse layers' tokens
together) and the ST-MoE z-loss, mean over tokens and layers of logsumexp(logits)^2.  Each layer
gives `RouterStats` (sums) that the layer loop adds up; the losses divide at the end.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxturbo.models.config import MoEConfig
from jaxturbo.models.layers import linear, swiglu_mlp
from jaxturbo.models.lora import adapter_names
from pallas_kernels.grouped_matmul import IMPLEMENTATIONS as GMM_IMPLEMENTATIONS
from pallas_kernels.grouped_matmul import gmm, gmv

Params = dict[str, Any]

ROUTER_W = "mlp.gate.weight"
EXPERT_GATE_W = "mlp.experts.gate_proj.weight"
EXPERT_UP_W = "mlp.experts.up_proj.weight"
EXPERT_DOWN_W = "mlp.experts.down_proj.weight"
SHARED_GATE_W = "mlp.shared_expert.gate_proj.weight"
SHARED_UP_W = "mlp.shared_expert.up_proj.weight"
SHARED_DOWN_W = "mlp.shared_expert.down_proj.weight"
SHARED_EXPERT_GATE_W = "mlp.shared_expert_gate.weight"
EXPERT_STACKS = (EXPERT_GATE_W, EXPERT_UP_W, EXPERT_DOWN_W)

# At most this many (token, choice) rows take the GEMV path when decoding (a decode step of up
# to 8 tokens at top-8): each row reads its expert's weights instead of padding a GEMM tile.
GMV_MAX_ROWS = 64


class ExpertLoRA(NamedTuple):
    """LoRA adapters of one layer's expert stacks (`jaxturbo.models.lora`), B scaled by alpha / r:
    gate_a, up_a [E, r, D]; gate_b, up_b [E, F, r]; down_a [E, r, F]; down_b [E, D, r].  A
    projection without adapters has None for both."""

    gate_a: jax.Array | None
    gate_b: jax.Array | None
    up_a: jax.Array | None
    up_b: jax.Array | None
    down_a: jax.Array | None
    down_b: jax.Array | None


class ExpertWeights(NamedTuple):
    """One layer's expert stacks, HF orientation: gate, up [E, F, D], down [E, D, F]; `lora`
    their adapters (None: none)."""

    gate: jax.Array
    up: jax.Array
    down: jax.Array
    lora: ExpertLoRA | None = None


class RouterStats(NamedTuple):
    """Sums over the (masked) tokens of one or more layers; `router_losses` normalises them.

    counts [E]: (token, choice) pairs routed to each expert (no gradient);
    probs [E]: router probabilities; z: logsumexp(logits)^2; rows: tokens (times layers);
    dropped / pairs: (token, choice) pairs over capacity / dispatched (every token, masked or
    not: capacity counts them all)."""

    counts: jax.Array
    probs: jax.Array
    z: jax.Array
    rows: jax.Array
    dropped: jax.Array
    pairs: jax.Array


Dispatch = Callable[..., jax.Array]


class MoEOptions(NamedTuple):
    """How `forward` runs its sparse layers (None everywhere: `sorted_dispatch`, dropless, one
    device).

    dispatch: replaces `sorted_dispatch` (the expert-parallel one of `jaxturbo.parallel.expert`).
    capacity_factor: None for dropless; else the per-expert capacity factor (module docstring).
    token_axes: inside shard_map, the mesh axes the tokens are split over: the router statistics
        are summed over them, so every device computes the losses of the whole batch."""

    dispatch: Dispatch | None = None
    capacity_factor: float | None = None
    token_axes: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- routing
def route(
    x: jax.Array, router: jax.Array, top_k: int, norm_topk_prob: bool
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Top-k softmax routing of x [N, D] by router [E, D].

    Returns logits [N, E] (x's dtype), weights [N, k] (x's dtype), experts [N, k] int32 (by
    decreasing probability) and probs [N, E] float32, as transformers' Qwen-MoE router."""
    logits = linear(x, router)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return logits, top.astype(x.dtype), experts.astype(jnp.int32), probs


def router_stats(
    logits: jax.Array, probs: jax.Array, experts: jax.Array, token_mask: jax.Array | None = None
) -> RouterStats:
    """One layer's RouterStats from logits/probs [N, E] and experts [N, k]; token_mask [N]
    (1 for tokens that count, as transformers' attention_mask; default all)."""
    n, e = probs.shape
    m = (
        jnp.ones((n,), jnp.float32)
        if token_mask is None
        else token_mask.reshape(n).astype(jnp.float32)
    )
    k = experts.shape[-1]
    counts = jnp.zeros((e,), jnp.float32).at[experts.reshape(-1)].add(jnp.repeat(m, k))
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    z = jnp.zeros((), jnp.float32)
    return RouterStats(
        counts=jax.lax.stop_gradient(counts),
        probs=jnp.sum(probs * m[:, None], axis=0),
        z=jnp.sum(lse * lse * m),
        rows=jnp.sum(m),
        dropped=z,
        pairs=jnp.float32(n * k),
    )


def add_router_stats(a: RouterStats | None, b: RouterStats) -> RouterStats:
    """Running sum over layers (None: the first layer)."""
    return b if a is None else RouterStats(*(x + y for x, y in zip(a, b)))


def zero_router_stats(num_experts: int) -> RouterStats:
    """The sum over no layers (the layer loop's initial carry)."""
    z = jnp.zeros((), jnp.float32)
    return RouterStats(
        jnp.zeros((num_experts,), jnp.float32), jnp.zeros((num_experts,), jnp.float32), z, z, z, z
    )


def psum_router_stats(stats: RouterStats, axes: tuple[str, ...]) -> RouterStats:
    """Inside shard_map: the sums over every device of `axes` (those splitting the tokens)."""
    return stats if not axes else RouterStats(*(jax.lax.psum(x, axes) for x in stats))


def router_losses(stats: RouterStats) -> dict[str, jax.Array]:
    """{"router_aux_loss", "router_z_loss"} (float32 scalars, unscaled), "tokens_per_expert" [E]
    (fraction of tokens routed to each expert; sums to k) and "dropped_fraction" (of the
    (token, choice) pairs, by the capacity; 0 when dropless)."""
    rows = jnp.maximum(stats.rows, 1.0)
    frac, mean_p = stats.counts / rows, stats.probs / rows
    return {
        "router_aux_loss": stats.counts.shape[0] * jnp.sum(frac * mean_p),
        "router_z_loss": stats.z / rows,
        "tokens_per_expert": frac,
        "dropped_fraction": stats.dropped / jnp.maximum(stats.pairs, 1.0),
    }


# ----------------------------------------------------------------------------- capacity
def expert_capacity(pairs: int, num_experts: int, factor: float | None) -> int | None:
    """Pairs each expert takes of a device's `pairs` (token, choice) pairs: ceil(factor * pairs /
    num_experts), at least 1; None (dropless) when factor is None."""
    if factor is None:
        return None
    if not factor > 0:
        raise ValueError(f"capacity factor {factor} must be > 0 (None: dropless)")
    return max(1, math.ceil(factor * pairs / num_experts))


def sort_pairs(
    experts: jax.Array, num_experts: int, capacity: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """The (token, choice) pairs of experts [N, k] grouped by expert, token order inside a group.

    Returns order [N*k] (pair indices n*k + j: the kept pairs of expert 0, of expert 1, ...,
    then the pairs over capacity) and group_sizes [E] int32 (kept pairs per expert).  With
    `capacity`, an expert keeps its first `capacity` pairs (dropless: all)."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    if capacity is None:
        return order, sizes
    starts = jnp.cumsum(sizes) - sizes
    sorted_ids = flat[order]
    rank = jnp.arange(flat.shape[0], dtype=jnp.int32) - starts[sorted_ids]
    key = jnp.where(rank < capacity, sorted_ids, num_experts)  # dropped pairs go last
    return order[jnp.argsort(key, stable=True)], jnp.minimum(sizes, capacity)


def dropped_pairs(experts: jax.Array, num_experts: int, capacity: int | None) -> jax.Array:
    """float32 count of the pairs of experts [N, k] over `capacity` (0 when dropless)."""
    if capacity is None:
        return jnp.zeros((), jnp.float32)
    sizes = jnp.bincount(experts.reshape(-1), length=num_experts)
    return jnp.sum(jnp.maximum(sizes - capacity, 0)).astype(jnp.float32)


# ----------------------------------------------------------------------------- experts
def expert_swiglu(
    xs: jax.Array, group_sizes: jax.Array, w: ExpertWeights, implementation: str = "auto"
) -> jax.Array:
    """SwiGLU of each expert on its rows: xs [M, D] sorted by expert, group_sizes [E] -> [M, D]
    (rows past sum(group_sizes) give zeros).  Three grouped GEMMs on HF-oriented weights, and
    with `w.lora` two rank-r grouped GEMMs more per adapted projection (frozen weights: their
    gradient is never needed, only the adapters')."""

    def mm(a: jax.Array, rhs: jax.Array) -> jax.Array:
        return gmm(a, rhs, group_sizes, transpose_rhs=True, implementation=implementation)

    lora = w.lora or ExpertLoRA(None, None, None, None, None, None)

    def proj(a: jax.Array, rhs: jax.Array, la: jax.Array | None, lb: jax.Array | None):
        y = mm(a, rhs)
        return y if la is None else y + mm(mm(a, la), lb)

    hidden = jax.nn.silu(proj(xs, w.gate, lora.gate_a, lora.gate_b)) * proj(
        xs, w.up, lora.up_a, lora.up_b
    )
    return proj(hidden, w.down, lora.down_a, lora.down_b)


def inverse_permutation(order: jax.Array) -> jax.Array:
    """inv [M] with inv[order[i]] = i, for a permutation order [M] of 0..M-1."""
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


# The gathers that move rows between token order and expert order get their gradients as
# gathers too.  Autodiff would scatter-add (the transpose of a gather), which the GPU runs with
# atomics over rows it cannot know to be distinct; both index maps here are permutations (with
# each token repeated k times), so the transpose is a gather by the inverse permutation.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_pairs(x: jax.Array, order: jax.Array, inv: jax.Array, k: int) -> jax.Array:
    """The (token, choice) pairs' input rows in sorted order: x [N, D], order [N*k] (pair
    indices n*k + j), inv = inverse_permutation(order) -> [N*k, D] with row i = x[order[i] // k].
    Its gradient sums each token's k rows, gathered back by inv, in float32."""
    return x[order // k]


def _gather_pairs_fwd(x, order, inv, k):
    return x[order // k], (order, inv)


def _gather_pairs_bwd(k, res, g):
    order, inv = res
    n = inv.shape[0] // k
    dx = g[inv].reshape(n, k, -1).astype(jnp.float32).sum(axis=1).astype(g.dtype)
    return dx, None, None


gather_pairs.defvjp(_gather_pairs_fwd, _gather_pairs_bwd)


@jax.custom_vjp
def unsort_pairs(ys: jax.Array, order: jax.Array, inv: jax.Array) -> jax.Array:
    """ys [M, D] in sorted order (row i: pair order[i]) -> pair order: ys[inv].  Its gradient
    is the gather by order."""
    return ys[inv]


def _unsort_pairs_fwd(ys, order, inv):
    return ys[inv], (order, inv)


def _unsort_pairs_bwd(res, g):
    order, _ = res
    return g[order], None, None


unsort_pairs.defvjp(_unsort_pairs_fwd, _unsort_pairs_bwd)


def combine(
    ys: jax.Array,
    order: jax.Array,
    weights: jax.Array,
    dtype: jnp.dtype,
    inv: jax.Array | None = None,
) -> jax.Array:
    """The expert outputs of the sorted pairs ys [N*k, D] (pair order[i] in row i; zeros for
    dropped pairs) put back in pair order, scaled by their router weights [N, k] and summed over
    the k choices (in float32) -> [N, D] in `dtype`.  inv: inverse_permutation(order), if the
    caller has it."""
    n, k = weights.shape
    inv = inverse_permutation(order) if inv is None else inv
    ys = unsort_pairs(ys, order, inv) * weights.reshape(-1)[:, None].astype(ys.dtype)
    return ys.reshape(n, k, -1).astype(jnp.float32).sum(axis=1).astype(dtype)


def sorted_dispatch(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    w: ExpertWeights,
    implementation: str = "auto",
    capacity: int | None = None,
) -> jax.Array:
    """Dispatch and combine on one device: x [N, D], weights/experts [N, k] -> [N, D].

    The N*k (token, choice) pairs are sorted by expert (stable, `sort_pairs`), gathered, run
    through `expert_swiglu`, scaled by their weights, gathered back into token order and summed
    over the k choices (in float32).  capacity: pairs kept per expert (None: dropless)."""
    k = experts.shape[1]
    order, sizes = sort_pairs(experts, w.gate.shape[0], capacity)
    inv = inverse_permutation(order)
    ys = expert_swiglu(gather_pairs(x, order, inv, k), sizes, w, implementation)
    return combine(ys, order, weights, x.dtype, inv)


def gmv_dispatch(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    w: ExpertWeights,
    implementation: str = "auto",
    capacity: int | None = None,
) -> jax.Array:
    """Dispatch for few tokens (decode): each (token, choice) row through its expert with
    `grouped_matmul.gmv` (no sort; only routed experts' weights are read).  Same contract as
    `sorted_dispatch` without capacity or adapters (inference of merged weights); forward only
    on the kernel backends."""
    if capacity is not None or w.lora is not None:
        raise ValueError(
            "gmv_dispatch runs dropless on merged weights (capacity=None, no LoRA "
            "adapters); use sorted_dispatch"
        )
    n, k = experts.shape
    ids = experts.reshape(-1)
    xs = jnp.repeat(x, k, axis=0)  # row n*k + j: token n, choice j

    def mv(a: jax.Array, rhs: jax.Array) -> jax.Array:
        return gmv(a, rhs, ids, transpose_rhs=True, implementation=implementation)

    ys = mv(jax.nn.silu(mv(xs, w.gate)) * mv(xs, w.up), w.down)
    ys = ys * weights.reshape(-1)[:, None].astype(ys.dtype)
    return ys.reshape(n, k, -1).astype(jnp.float32).sum(axis=1).astype(x.dtype)


def moe_implementation(moe_impl: str | None, attn_impl: str) -> str:
    """The grouped-GEMM backend: `moe_impl` if given, else attention's choice where it names a
    grouped-GEMM backend too ("xla", "pallas_triton", ...), else "auto"."""
    if moe_impl is not None:
        return moe_impl
    return attn_impl if attn_impl in GMM_IMPLEMENTATIONS else "auto"


def expert_weights(lp: Params) -> ExpertWeights:
    """The layer's expert stacks, with their LoRA adapters where `lp` holds them."""
    stacks = (EXPERT_GATE_W, EXPERT_UP_W, EXPERT_DOWN_W)
    ab = [lp.get(n) for s in stacks for n in adapter_names(s)]
    return ExpertWeights(
        *(lp[s] for s in stacks), lora=None if all(a is None for a in ab) else ExpertLoRA(*ab)
    )


def moe_mlp(
    lp: Params,
    moe: MoEConfig,
    h: jax.Array,
    *,
    implementation: str = "auto",
    token_mask: jax.Array | None = None,
    dispatch: Dispatch | None = None,
    decode: bool = False,
    capacity_factor: float | None = None,
) -> tuple[jax.Array, RouterStats]:
    """The sparse MLP of one layer on normed input h [B, T, D] -> ([B, T, D], RouterStats).

    lp: the layer's parameters (names above, LoRA adapters included).  dispatch: default
    `sorted_dispatch`, or `gmv_dispatch` when `decode` (inference: the GEMV kernels have no
    backward) and there are at most GMV_MAX_ROWS (token, choice) rows.  token_mask [B, T]: which
    tokens the router statistics count (the output covers every token).  capacity_factor: see
    the module docstring (None: dropless); the capacity is of this call's B*T*k pairs."""
    b, t, d = h.shape
    x = h.reshape(b * t, d)
    k, e = moe.num_experts_per_tok, lp[ROUTER_W].shape[0]
    logits, weights, experts, probs = route(x, lp[ROUTER_W], k, moe.norm_topk_prob)
    w = expert_weights(lp)
    capacity = expert_capacity(b * t * k, e, capacity_factor)
    if dispatch is None:
        dispatch = (
            gmv_dispatch
            if decode and capacity is None and w.lora is None and b * t * k <= GMV_MAX_ROWS
            else sorted_dispatch
        )
    y = dispatch(x, weights, experts, w, implementation, capacity=capacity)
    if SHARED_EXPERT_GATE_W in lp:  # Qwen2-MoE: every token also through the gated shared expert
        shared = swiglu_mlp(x, lp[SHARED_GATE_W], lp[SHARED_UP_W], lp[SHARED_DOWN_W])
        y = y + jax.nn.sigmoid(linear(x, lp[SHARED_EXPERT_GATE_W])) * shared
    stats = router_stats(logits, probs, experts, token_mask)
    stats = stats._replace(dropped=dropped_pairs(experts, e, capacity))
    return y.reshape(b, t, d), stats


# ----------------------------------------------------------------------------- layout
def moe_layer_shapes(moe: MoEConfig, hidden: int) -> dict[str, tuple[int, ...]]:
    """Per-layer MLP parameter names of a sparse layer and their shapes (no layer axis)."""
    e, f, d = moe.num_experts, moe.moe_intermediate_size, hidden
    out = {
        ROUTER_W: (e, d),
        EXPERT_GATE_W: (e, f, d),
        EXPERT_UP_W: (e, f, d),
        EXPERT_DOWN_W: (e, d, f),
    }
    fs = moe.shared_expert_intermediate_size
    if fs:
        out.update(
            {
                SHARED_GATE_W: (fs, d),
                SHARED_UP_W: (fs, d),
                SHARED_DOWN_W: (d, fs),
                SHARED_EXPERT_GATE_W: (1, d),
            }
        )
    return out
