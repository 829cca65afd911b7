"""Per-token training losses: next-token cross-entropy, logit distillation, activation MSE.

Every loss is a weighted sum over tokens divided by a normaliser, and is returned as the pair
`Weighted(total, count)` so that gradient accumulation and data parallelism can add numerators
and denominators across micro-batches and devices before dividing (the exact full-batch loss,
not a mean of means).  `.value()` gives the scalar.

Shapes: B batch rows, T tokens per row, V vocabulary, D hidden size.  Targets are already
shifted (targets[b, t] is the token after tokens[b, t]) and `weights[b, t]` is the training
weight of predicting it: 0 for prompt, padding and cross-document positions.

Normalisation (`normalize`), named as in verl:
  "token"     sum_t w_t l_t / sum_t w_t over the whole batch (every trained token counts once);
  "sequence"  mean over sequences of (sum_{t in s} w_t l_t / sum_{t in s} w_t): each sequence
              counts once whatever its length.  A sequence is a row, or a (row, segment id)
              pair in packed rows; sequences with no weighted token are left out.
"""

from __future__ import annotations

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

    def __add__(self, other: "Weighted") -> "Weighted":  # type: ignore[override]
        return Weighted(self.total + other.total, self.count + other.count)


def reduce_tokens(per_token: jax.Array, weights: jax.Array, *,
                  segment_ids: jax.Array | None = None,
                  normalize: Normalize = "token") -> Weighted:
    """Reduce a per-token loss [B, T] with weights [B, T] (segment_ids [B, T] for packed rows)."""
    per_token = per_token.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    weighted = per_token * weights
    if normalize == "token":
        return Weighted(jnp.sum(weighted), jnp.sum(weights))
    if normalize != "sequence":
        raise ValueError(f"unknown loss normalisation {normalize!r}; choose one of {NORMALIZE_MODES}")
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


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Negative log-likelihood [B, T] of targets [B, T] under logits [B, T, V] (float32)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - picked


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array, *,
                  segment_ids: jax.Array | None = None,
                  normalize: Normalize = "token") -> Weighted:
    """Next-token cross-entropy.  logits [B, T, V], targets/weights/segment_ids [B, T]."""
    return reduce_tokens(token_nll(logits, targets), weights, segment_ids=segment_ids,
                         normalize=normalize)


# Name of the chunked loss's saved gradients, for remat policies (jaxturbo.train.step): they
# are small next to the activations and recomputing them would rerun the whole LM head
CHUNKED_LOSS_GRADS = "chunked_loss_grads"


def _chunk_logits(h: jax.Array, w: jax.Array) -> jax.Array:
    """One block's logits [B, S, C, V] float32 from hidden [B, S, C, D] and head [V, D] (inputs in
    the compute dtype, float32 accumulation and result: the logsumexp needs float32 anyway).
    The block keeps its rows and sequence pieces as separate (sharded) dimensions: flattened to
    one token dimension, XLA's partitioner gathered the pieces inside the scan."""
    return jnp.einsum("bscd,vd->bscv", h, w, preferred_element_type=jnp.float32)


def _block_nll(hc: jax.Array, w: jax.Array, yc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits [B, S, C, V], NLL and logsumexp [B, S, C] of one block; targets yc [B, S, C]."""
    z = _chunk_logits(hc, w)
    lse = jax.nn.logsumexp(z, axis=-1)
    return z, lse - jnp.take_along_axis(z, yc[..., None], axis=-1)[..., 0], lse


@jax.custom_vjp
def _weighted_nll_sum(h: jax.Array, w: jax.Array, y: jax.Array, coef: jax.Array) -> jax.Array:
    """sum(coef * nll) (float32 scalar) over blocks: h [N, B, S, C, D], w [V, D],
    y/coef [N, B, S, C]."""
    def body(acc, xs):
        hc, yc, cc = xs
        return acc + jnp.sum(cc * _block_nll(hc, w, yc)[1]), None

    return jax.lax.scan(body, jnp.float32(0), (h, y, coef))[0]


def _weighted_nll_sum_fwd(h, w, y, coef):
    # The loss is a scalar and coef is data, so the gradient w.r.t. h and w is known up to the
    # scalar cotangent already in the forward pass: compute it here, block by block, while the
    # block's logits are live.  The backward then only scales it, and no LM-head matmul is rerun
    # (a recompute-in-backward scheme would cost one extra [tokens, V, D] matmul, ~7% of a
    # Llama-3.2-1B step).
    def body(carry, xs):
        acc, dw = carry
        hc, yc, cc = xs
        z, nll, lse = _block_nll(hc, w, yc)
        # d nll / d z = softmax(z) - onehot(y); the one-hot as an iota compare so that XLA
        # fuses it into the elementwise pass instead of materialising a [B, S, C, V] array
        hit = jax.lax.broadcasted_iota(jnp.int32, z.shape, 3) == yc[..., None]
        dz = (jnp.exp(z - lse[..., None]) - hit.astype(jnp.float32)) * cc[..., None]
        # the matmul inputs go back to the compute dtype, as autodiff of the unchunked head does
        dz = dz.astype(h.dtype)
        dh = jnp.einsum("bscv,vd->bscd", dz, w,
                        preferred_element_type=jnp.float32).astype(h.dtype)
        # the head's gradient sums over blocks: accumulate in float32 so that many low-precision
        # partial sums do not lose bits the one-matmul path keeps
        dw = dw + jnp.einsum("bscv,bscd->vd", dz, hc, preferred_element_type=jnp.float32)
        return (acc + jnp.sum(cc * nll), dw), dh

    (total, dw), dh = jax.lax.scan(body, (jnp.float32(0), jnp.zeros(w.shape, jnp.float32)),
                                   (h, y, coef))
    res = (checkpoint_name(dh, CHUNKED_LOSS_GRADS),
           checkpoint_name(dw.astype(w.dtype), CHUNKED_LOSS_GRADS))
    return total, res


def _weighted_nll_sum_bwd(res, g):
    dh, dw = res
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), None, None


_weighted_nll_sum.defvjp(_weighted_nll_sum_fwd, _weighted_nll_sum_bwd)


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                          weights: jax.Array, *, chunk_tokens: int,
                          segment_ids: jax.Array | None = None,
                          normalize: Normalize = "token", seq_shards: int = 1) -> Weighted:
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
    The loss is a sum over tokens, so the block order does not change it.  Because `reduce_tokens`' total is
    linear in the per-token losses, total = sum_t coef_t * nll_t with coef_t = d total / d nll_t
    depending on the weights and segments only; that lets the forward produce the gradients too
    (see _weighted_nll_sum_fwd).  Gradients flow to hidden and head; weights are data.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
    zeros = jnp.zeros(weights.shape, jnp.float32)

    def total_of(per_token: jax.Array) -> jax.Array:
        return reduce_tokens(per_token, weights, segment_ids=segment_ids, normalize=normalize).total

    coef = jax.grad(total_of)(zeros)  # exact: total_of is linear in per_token
    count = reduce_tokens(zeros, weights, segment_ids=segment_ids, normalize=normalize).count
    b, t, d = hidden.shape
    s = seq_shards
    if s < 1 or t % s:
        raise ValueError(f"seq_shards={seq_shards} must be >= 1 and divide the {t} tokens per row")
    tl = t // s                                       # positions per piece
    c = max(1, min(chunk_tokens // (b * s), tl))
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

    total = _weighted_nll_sum(blocked(h), head.astype(hidden.dtype), blocked(y), blocked(cf))
    return Weighted(total, count)


def kl_per_token(student_logits: jax.Array, teacher_logits: jax.Array, *,
                 temperature: float = 1.0, direction: str = "forward") -> jax.Array:
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
    return kl * temperature ** 2


def distill_kl(student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array, *,
               temperature: float = 1.0, direction: str = "forward",
               segment_ids: jax.Array | None = None, normalize: Normalize = "token") -> Weighted:
    """Logit distillation: weighted KL per token.  Logits [B, T, V], weights [B, T].

    The teacher's logits get no gradient.
    """
    kl = kl_per_token(student_logits, jax.lax.stop_gradient(teacher_logits),
                      temperature=temperature, direction=direction)
    return reduce_tokens(kl, weights, segment_ids=segment_ids, normalize=normalize)


def activation_mse(student: jax.Array, teacher: jax.Array, weights: jax.Array, *,
                   segment_ids: jax.Array | None = None,
                   normalize: Normalize = "token") -> Weighted:
    """Activation distillation: mean over D of the squared difference, per token, weighted.

    student/teacher [B, T, D] hidden states (teacher gets no gradient); weights [B, T].
    """
    diff = student.astype(jnp.float32) - jax.lax.stop_gradient(teacher).astype(jnp.float32)
    return reduce_tokens(jnp.mean(diff * diff, axis=-1), weights, segment_ids=segment_ids,
                         normalize=normalize)
