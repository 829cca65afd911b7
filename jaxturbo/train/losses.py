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


def _chunk_logits(h: jax.Array, w: jax.Array) -> jax.Array:
    """One chunk's logits [C, V] float32 from hidden [C, D] and head [V, D] (inputs in the compute
    dtype, float32 accumulation and result: the logsumexp needs float32 anyway)."""
    return jnp.einsum("cd,vd->cv", h, w, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _blocked_nll(h: jax.Array, w: jax.Array, y: jax.Array) -> jax.Array:
    """NLL [N, C] of targets y [N, C] given hidden h [N, C, D] and LM head w [V, D]."""
    return _blocked_nll_fwd(h, w, y)[0]


def _blocked_nll_fwd(h, w, y):
    def body(_, xs):
        hc, yc = xs
        z = _chunk_logits(hc, w)
        lse = jax.nn.logsumexp(z, axis=-1)
        picked = jnp.take_along_axis(z, yc[:, None], axis=-1)[:, 0]
        return None, (lse - picked, lse)

    _, (nll, lse) = jax.lax.scan(body, None, (h, y))
    # only the per-token logsumexp [N, C] is kept: the backward recomputes each chunk's logits
    return nll, (h, w, y, lse)


def _blocked_nll_bwd(res, g):
    h, w, y, lse = res

    def body(dw, xs):
        hc, yc, lc, gc = xs
        z = _chunk_logits(hc, w)
        # d nll / d z = softmax(z) - onehot(y); the one-hot as an iota compare so that XLA
        # fuses it into the elementwise pass instead of materialising a [C, V] array
        hit = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1) == yc[:, None]
        dz = (jnp.exp(z - lc[:, None]) - hit.astype(jnp.float32)) * gc[:, None]
        # the matmul inputs go back to the compute dtype, as autodiff of the unchunked head does
        dz = dz.astype(h.dtype)
        dh = jnp.einsum("cv,vd->cd", dz, w, preferred_element_type=jnp.float32).astype(h.dtype)
        # the head's gradient is a sum over chunks: accumulate it in float32 so that many
        # bf16 partial sums do not lose bits the one-matmul path keeps
        dw = dw + jnp.einsum("cv,cd->vd", dz, hc, preferred_element_type=jnp.float32)
        return dw, dh

    dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), (h, y, lse, g))
    return dh, dw.astype(w.dtype), None


_blocked_nll.defvjp(_blocked_nll_fwd, _blocked_nll_bwd)


def chunked_token_nll(hidden: jax.Array, head: jax.Array, targets: jax.Array, *,
                      chunk_tokens: int) -> jax.Array:
    """`token_nll(hidden @ head.T, targets)` without the full [B, T, V] logits.

    hidden [B, T, D] final normed hidden states, head [V, D] LM-head (or tied embedding) weight,
    targets [B, T] -> NLL [B, T] float32.  The B*T tokens are cut into blocks of `chunk_tokens`
    (the last one zero-padded; padded tokens get a zero cotangent, so they add nothing to the
    gradients) and a scan computes one block's logits [chunk, V] at a time.  The forward keeps
    only each token's logsumexp; the backward recomputes the block's logits, so peak memory is a
    few [chunk, V] float32 buffers instead of [B, T, V] logits and their gradient, at the cost of
    one extra LM-head matmul.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    b, t, d = hidden.shape
    n = b * t
    c = min(chunk_tokens, n)
    blocks = -(-n // c)
    pad = blocks * c - n
    h = hidden.reshape(n, d)
    y = targets.reshape(n).astype(jnp.int32)
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        y = jnp.pad(y, (0, pad))
    nll = _blocked_nll(h.reshape(blocks, c, d), head.astype(hidden.dtype), y.reshape(blocks, c))
    return nll.reshape(-1)[:n].reshape(b, t)


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                          weights: jax.Array, *, chunk_tokens: int,
                          segment_ids: jax.Array | None = None,
                          normalize: Normalize = "token") -> Weighted:
    """`cross_entropy` from hidden [B, T, D] and head [V, D] in token blocks (chunked_token_nll);
    targets/weights/segment_ids [B, T], same weights and normalisations."""
    return reduce_tokens(chunked_token_nll(hidden, head, targets, chunk_tokens=chunk_tokens),
                         weights, segment_ids=segment_ids, normalize=normalize)


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
