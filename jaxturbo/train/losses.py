"""Per-token training losses: next-token cross-entropy, logit distillation, activation MSE.

Every loss is a weighted sum over tokens divided by a normaliser, and is returned as the pair
`Weighted(total, count)` so that gradient accumulation and data parallelism can add numerators
and denominators across micro-batches and devices before dividing (the exact full-batch loss,
not a mean of means).  `.value()` gives the scalar.  A mixture-of-experts model adds its router
loss to the token loss (`add_router_loss`).

Shapes: B batch rows, T tokens per row, V vocabulary, D hidden size.  Targets are already
shifted (targets[b, t] is the token after tokens[b, t]) and `weights[b, t]` is the training
weight of predicting it: 0 for prompt, padding and cross-document positions.

Normalisation (`normalize`), named as in verl:
  "token"     sum_t w_t l_t / sum_t w_t over the whole batch (every trained token counts once);
  "sequence"  mean over sequences of (sum_{t in s} w_t l_t / sum_{t in s} w_t): each sequence
              counts once whatever its length.  A sequence is a row, or a (row, segment id)
              pair in packed rows; sequences with no weighted token are left out.

Vocab-parallel (tensor parallelism, inside `jax.shard_map`): with `tensor_axis` each device
holds logits over its V/P slice of the vocabulary; the log-sum-exp takes the max and the sum of
exponentials over the slices with one pmax and one psum of [B, T] values, and the target's logit
comes from the device holding it (a psum of [B, T]), so the [B, T, V] logits are never gathered.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Normalize = Literal["token", "sequence"]
NORMALIZE_MODES = ("token", "sequence")


class Weighted(NamedTuple):
    """A loss as numerator and denominator; add them across micro-batches, then divide."""

    total: jax.Array  # scalar float32
    count: jax.Array  # scalar float32

    def value(self) -> jax.Array:
        # max(count, 1) only guards an all-masked batch (total is 0 then); counts are >= 1 otherwise
        return self.total / jnp.maximum(self.count, 1.0)

    def __add__(self, other: Weighted) -> Weighted:  # type: ignore[override]
        return Weighted(self.total + other.total, self.count + other.count)


# An MoE model's router metrics the SFT loss reports (`jaxturbo.models.moe.router_losses`;
# "router_loss" is the config's weighted sum of the aux and z losses)
ROUTER_METRICS = ("router_loss", "router_aux_loss", "router_z_loss", "dropped_fraction")


def add_router_loss(
    loss: Weighted, aux: dict[str, jax.Array]
) -> tuple[Weighted, dict[str, jax.Array]]:
    """A mixture-of-experts model's loss: the token loss plus aux["router_loss"] (a scalar over
    the whole batch), as transformers adds it.  Returned as Weighted(total + r * count, count)
    so that value() is the token loss + r and gradient accumulation weighs each micro-batch's
    r by its count; also the router metrics (ROUTER_METRICS) of `aux`."""
    r = aux["router_loss"].astype(jnp.float32)
    return (
        Weighted(loss.total + r * jax.lax.stop_gradient(loss.count), loss.count),
        {k: aux[k] for k in ROUTER_METRICS if k in aux},
    )


def reduce_tokens(
    per_token: jax.Array,
    weights: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    normalize: Normalize = "token",
) -> Weighted:
    """Reduce a per-token loss [B, T] with weights [B, T] (segment_ids [B, T] for packed rows)."""
    per_token = per_token.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    weighted = per_token * weights
    if normalize == "token":
        return Weighted(jnp.sum(weighted), jnp.sum(weights))
    if normalize != "sequence":
        raise ValueError(
            f"unknown loss normalisation {normalize!r}; choose one of {NORMALIZE_MODES}"
        )
    b, t = per_token.shape
    if segment_ids is None:
        seq_loss, seq_w = jnp.sum(weighted, axis=1), jnp.sum(weights, axis=1)
    else:
        # (row, segment) -> one flat id; segment ids are in [0, T] so T + 1 slots per row suffice
        flat = (jnp.arange(b)[:, None] * (t + 1) + jnp.clip(segment_ids, 0, t)).reshape(-1)
        n = b * (t + 1)
        seq_loss = jax.ops.segment_sum(weighted.reshape(-1), flat, num_segments=n)
        seq_w = jax.ops.segment_sum(weights.reshape(-1), flat, num_segments=n)
    has = seq_w > 0
    means = jnp.where(has, seq_loss / jnp.where(has, seq_w, 1.0), 0.0)
    return Weighted(jnp.sum(means), jnp.sum(has.astype(jnp.float32)))


def token_nll(logits: jax.Array, targets: jax.Array, tensor_axis: str | None = None) -> jax.Array:
    """Negative log-likelihood [B, T] of targets [B, T] under logits [B, T, V] (float32).

    tensor_axis (inside shard_map): logits [B, T, V/P] are this device's vocabulary slice
    (device i holds ids [i V/P, (i+1) V/P)); the result is the full-vocabulary NLL, equal on
    every device of the axis (see the module docstring).
    """
    logits = logits.astype(jnp.float32)
    if tensor_axis is None:
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return lse - picked
    local, hit = _local_targets(targets, logits.shape[-1], tensor_axis)
    picked = jnp.take_along_axis(logits, local[..., None], axis=-1)[..., 0]
    picked = jax.lax.psum(jnp.where(hit, picked, 0.0), tensor_axis)
    return vocab_parallel_logsumexp(logits, tensor_axis) - picked


def _local_targets(
    targets: jax.Array, v_local: int, tensor_axis: str
) -> tuple[jax.Array, jax.Array]:
    """Target ids relative to this device's vocabulary slice (clipped into it) and whether the
    slice holds them."""
    local = targets.astype(jnp.int32) - jax.lax.axis_index(tensor_axis) * v_local
    hit = (local >= 0) & (local < v_local)
    return jnp.clip(local, 0, v_local - 1), hit


def vocab_parallel_logsumexp(logits: jax.Array, tensor_axis: str) -> jax.Array:
    """log sum exp over the whole vocabulary of vocab-sharded logits [..., V/P] -> [...].

    The max only shifts the exponentials (no gradient flows through it, so pmax needs none)."""
    m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), tensor_axis)
    se = jax.lax.psum(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1), tensor_axis)
    return m + jnp.log(se)


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    normalize: Normalize = "token",
) -> Weighted:
    """Next-token cross-entropy.  logits [B, T, V], targets/weights/segment_ids [B, T]."""
    return reduce_tokens(
        token_nll(logits, targets), weights, segment_ids=segment_ids, normalize=normalize
    )


# Name of the chunked loss's saved gradients, for remat policies (jaxturbo.train.step): they
# are small next to the activations and recomputing them would rerun the whole LM head
CHUNKED_LOSS_GRADS = "chunked_loss_grads"


def _chunk_logits(h: jax.Array, w: jax.Array) -> jax.Array:
    """One block's logits [B, S, C, V] float32 from hidden [B, S, C, D] and head [V, D] (inputs in
    the compute dtype, float32 accumulation and result: the logsumexp needs float32 anyway).
    The block keeps its rows and sequence pieces as separate (sharded) dimensions: flattened to
    one token dimension, XLA's partitioner gathered the pieces inside the scan."""
    return jnp.einsum("bscd,vd->bscv", h, w, preferred_element_type=jnp.float32)


def _block_nll(
    hc: jax.Array, w: jax.Array, yc: jax.Array, tensor_axis: str | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Logits [B, S, C, V], NLL and logsumexp [B, S, C] of one block, and the targets' index in
    the (local) vocabulary [B, S, C] (-1 where another device holds it); targets yc [B, S, C].
    With `tensor_axis`, w and the logits are this device's vocabulary slice [V/P, ...]."""
    z = _chunk_logits(hc, w)
    if tensor_axis is None:
        lse = jax.nn.logsumexp(z, axis=-1)
        return z, lse - jnp.take_along_axis(z, yc[..., None], axis=-1)[..., 0], lse, yc
    local, hit = _local_targets(yc, z.shape[-1], tensor_axis)
    picked = jax.lax.psum(
        jnp.where(hit, jnp.take_along_axis(z, local[..., None], axis=-1)[..., 0], 0.0), tensor_axis
    )
    lse = vocab_parallel_logsumexp(z, tensor_axis)
    return z, lse - picked, lse, jnp.where(hit, local, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _weighted_nll_sum(
    h: jax.Array, w: jax.Array, y: jax.Array, coef: jax.Array, tensor_axis: str | None
) -> jax.Array:
    """sum(coef * nll) (float32 scalar) over blocks: h [N, B, S, C, D], w [V, D] (vocab slice
    [V/P, D] with `tensor_axis`), y/coef [N, B, S, C]."""

    def body(acc, xs):
        hc, yc, cc = xs
        return acc + jnp.sum(cc * _block_nll(hc, w, yc, tensor_axis)[1]), None

    return jax.lax.scan(body, jnp.float32(0), (h, y, coef))[0]


def _weighted_nll_sum_fwd(h, w, y, coef, tensor_axis):
    # The loss is a scalar and coef is data, so the gradient w.r.t. h and w is known up to the
    # scalar cotangent already in the forward pass: compute it here, block by block, while the
    # block's logits are live.  The backward then only scales it, and no LM-head matmul is rerun
    # (a recompute-in-backward scheme would cost one extra [tokens, V, D] matmul, ~7% of a
    # Llama-3.2-1B step).
    def body(carry, xs):
        acc, dw = carry
        hc, yc, cc = xs
        z, nll, lse, yl = _block_nll(hc, w, yc, tensor_axis)
        # d nll / d z = softmax(z) - onehot(y); the one-hot as an iota compare so that XLA
        # fuses it into the elementwise pass instead of materialising a [B, S, C, V] array
        hit = jax.lax.broadcasted_iota(jnp.int32, z.shape, 3) == yl[..., None]
        dz = (jnp.exp(z - lse[..., None]) - hit.astype(jnp.float32)) * cc[..., None]
        # the matmul inputs go back to the compute dtype, as autodiff of the unchunked head does
        dz = dz.astype(h.dtype)
        dh = jnp.einsum("bscv,vd->bscd", dz, w, preferred_element_type=jnp.float32).astype(h.dtype)
        # the head's gradient sums over blocks: accumulate in float32 so that many low-precision
        # partial sums do not lose bits the one-matmul path keeps
        dw = dw + jnp.einsum("bscv,bscd->vd", dz, hc, preferred_element_type=jnp.float32)
        return (acc + jnp.sum(cc * nll), dw), dh

    (total, dw), dh = jax.lax.scan(
        body, (jnp.float32(0), jnp.zeros(w.shape, jnp.float32)), (h, y, coef)
    )
    res = (
        checkpoint_name(dh, CHUNKED_LOSS_GRADS),
        checkpoint_name(dw.astype(w.dtype), CHUNKED_LOSS_GRADS),
    )
    return total, res


def _weighted_nll_sum_bwd(tensor_axis, res, g):
    dh, dw = res
    if tensor_axis is not None:
        # inside shard_map (check_vma off) a value equal on every device of the axis carries
        # per-device cotangents that sum to its true one (shard_map divides an output's
        # cotangent over the axis, psum's transpose sums again): the loss's true cotangent is
        # their sum.  dw is this device's exact slice; dh its vocabulary slice's share of the
        # hidden state's gradient, which the backward sums like any partial cotangent.
        g = jax.lax.psum(g, tensor_axis)
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), None, None


_weighted_nll_sum.defvjp(_weighted_nll_sum_fwd, _weighted_nll_sum_bwd)


def chunked_cross_entropy(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    chunk_tokens: int,
    segment_ids: jax.Array | None = None,
    normalize: Normalize = "token",
    seq_shards: int = 1,
) -> Weighted:
    """`cross_entropy(hidden @ head.T, ...)` without ever holding the [B, T, V] logits.

    hidden [B, T, D] final normed hidden states (compute dtype), head [V, D] LM-head (or tied
    embedding) weight, targets/weights/segment_ids [B, T]; same weights and normalisations.

    The sequence is cut into blocks of C = chunk_tokens // B positions of every row (about
    chunk_tokens tokens; the last block zero-padded with zero weight) and a scan computes one
    block's logits [B*C, V] (float32 accumulation) at a time, so peak memory holds a few such
    float32 buffers.  Blocking along the sequence keeps the batch rows in every block, so a
    batch sharded over devices stays sharded (each device does its own rows).

    seq_shards S (sequence parallelism: the token dimension split into S contiguous pieces over
    devices): each row is viewed as [S, T/S] and a block takes C = chunk_tokens // (B S)
    positions of every piece of every row (each piece padded on its own), so the scan runs over
    positions inside the pieces and every block keeps both the row and the sequence split: each
    device computes its own tokens' logits, no hidden state is gathered (T must divide by S).
    The loss is a sum over tokens, so the block order does not change it.  Because
    `reduce_tokens`' total is linear in the per-token losses, total = sum_t coef_t * nll_t with
    coef_t = d total / d nll_t depending on the weights and segments only; that lets the
    forward produce the gradients too (see _weighted_nll_sum_fwd).  Gradients flow to hidden
    and head; weights are data.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    b, t, _ = hidden.shape
    s = seq_shards
    if s < 1 or t % s:
        raise ValueError(f"seq_shards={seq_shards} must be >= 1 and divide the {t} tokens per row")
    coef, count, block = chunk_plan(weights, segment_ids, normalize, chunk_tokens, s)
    return Weighted(blocked_nll_sum(hidden, head, targets, coef, block=block, seq_shards=s), count)


def chunk_plan(
    weights: jax.Array,
    segment_ids: jax.Array | None,
    normalize: Normalize,
    chunk_tokens: int,
    seq_shards: int = 1,
) -> tuple[jax.Array, jax.Array, int]:
    """What a chunked loss over weights [B, T] needs: the per-token coefficients [B, T], their
    count (`loss_coefficients`) and the positions per block, chunk_tokens // (B x seq_shards)
    (every block keeps all rows and all sequence pieces; at least 1)."""
    coef, count = loss_coefficients(weights, segment_ids=segment_ids, normalize=normalize)
    return coef, count, max(1, chunk_tokens // (weights.shape[0] * seq_shards))


def loss_coefficients(
    weights: jax.Array, *, segment_ids: jax.Array | None = None, normalize: Normalize = "token"
) -> tuple[jax.Array, jax.Array]:
    """(coef [B, T], count): `reduce_tokens(nll, weights, ...)` is Weighted(sum(coef * nll),
    count) for every per-token loss nll, since its total is linear in nll (coef = d total /
    d nll, a function of the weights and segments only)."""
    weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
    zeros = jnp.zeros(weights.shape, jnp.float32)

    def total_of(per_token: jax.Array) -> jax.Array:
        return reduce_tokens(per_token, weights, segment_ids=segment_ids, normalize=normalize).total

    coef = jax.grad(total_of)(zeros)  # exact: total_of is linear in per_token
    count = reduce_tokens(zeros, weights, segment_ids=segment_ids, normalize=normalize).count
    return coef, count


def blocked_nll_sum(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    coef: jax.Array,
    *,
    block: int,
    seq_shards: int = 1,
    tensor_axis: str | None = None,
) -> jax.Array:
    """sum(coef * nll) (float32 scalar) of the LM head's next-token NLL, `block` positions of
    every row (of every sequence piece) at a time: the core of `chunked_cross_entropy`.

    hidden [B, T, D], targets/coef [B, T], head [V, D]; with `tensor_axis` (inside shard_map)
    head is this device's vocabulary slice [V/P, D] and the NLL is vocab-parallel (module
    docstring): each device computes its slice's logits and gradients, the result and the
    hidden state's gradient are those of the full vocabulary.
    """
    b, t, _ = hidden.shape
    s = seq_shards
    tl = t // s  # positions per piece
    c = max(1, min(block, tl))
    blocks = -(-tl // c)
    pad = blocks * c - tl

    def pieces(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [B, S, T/S + pad, ...]
        x = x.reshape(b, s, tl, *x.shape[2:])
        if pad:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 3))
        return x

    h, y, cf = pieces(hidden), pieces(targets.astype(jnp.int32)), pieces(coef)

    def blocked(x: jax.Array) -> jax.Array:  # [B, S, T', ...] -> [blocks, B, S, C, ...]
        return jnp.moveaxis(x.reshape(b, s, blocks, c, *x.shape[3:]), 2, 0)

    return _weighted_nll_sum(
        blocked(h), head.astype(hidden.dtype), blocked(y), blocked(cf), tensor_axis
    )


def kl_per_token(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float = 1.0,
    direction: str = "forward",
) -> jax.Array:
    """Per-token KL [B, T] between temperature-softened distributions over V.

    forward: KL(teacher || student) (mean-seeking, the usual distillation loss, Hinton et al.
    2015); reverse: KL(student || teacher) (mode-seeking, as in MiniLLM).  Multiplied by
    temperature**2 so gradient magnitudes do not shrink as the temperature grows.
    """
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    if direction == "forward":
        kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    elif direction == "reverse":
        kl = jnp.sum(jnp.exp(s) * (s - t), axis=-1)
    else:
        raise ValueError(f"unknown KL direction {direction!r}; choose 'forward' or 'reverse'")
    return kl * temperature**2


def distill_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    weights: jax.Array,
    *,
    temperature: float = 1.0,
    direction: str = "forward",
    segment_ids: jax.Array | None = None,
    normalize: Normalize = "token",
) -> Weighted:
    """Logit distillation: weighted KL per token.  Logits [B, T, V], weights [B, T].

    The teacher's logits get no gradient.
    """
    kl = kl_per_token(
        student_logits,
        jax.lax.stop_gradient(teacher_logits),
        temperature=temperature,
        direction=direction,
    )
    return reduce_tokens(kl, weights, segment_ids=segment_ids, normalize=normalize)


def activation_mse(
    student: jax.Array,
    teacher: jax.Array,
    weights: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    normalize: Normalize = "token",
) -> Weighted:
    """Activation distillation: mean over D of the squared difference, per token, weighted.

    student/teacher [B, T, D] hidden states (teacher gets no gradient); weights [B, T].
    """
    diff = student.astype(jnp.float32) - jax.lax.stop_gradient(teacher).astype(jnp.float32)
    return reduce_tokens(
        jnp.mean(diff * diff, axis=-1), weights, segment_ids=segment_ids, normalize=normalize
    )
