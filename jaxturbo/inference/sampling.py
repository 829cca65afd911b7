"""Token sampling: greedy, temperature, top-k, top-p (nucleus) and min-p, with the chosen
token's logprob.

`sample` draws with one static `SamplingParams` for the whole batch (the static generate loop);
`sample_rows` with per-row parameters and a per-row random stream (the serving engine), through
the same filters (`filter_logits`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is drawn.  temperature 0 means greedy (argmax).

    top_k: keep the k most likely tokens (0: off).  top_p: keep the smallest set of tokens whose
    probability reaches p (1.0: off; Holtzman et al. 2020).  Static under jit: a new value
    compiles a new decode loop.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        from jaxturbo.errors import UserError

        if self.temperature < 0:
            raise UserError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise UserError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filtered_logits(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """Temperature-scaled logits [B, V] with tokens outside top-k / top-p set to -inf."""
    return filter_logits(
        logits.astype(jnp.float32) / sp.temperature, top_k=sp.top_k, top_p=sp.top_p
    )


Knob = int | float | jax.Array


def _is_off(value: Knob, off: float) -> bool:
    """Whether a knob is a Python number equal to its "off" value (then its work is skipped)."""
    return isinstance(value, (int, float)) and value == off


def filter_logits(x: jax.Array, top_k: Knob = 0, top_p: Knob = 1.0, min_p: Knob = 0.0) -> jax.Array:
    """Temperature-scaled logits x [B, V] with the tokens outside min-p, top-k and top-p set to
    -inf (applied in that order; the most likely token is always kept).

    Each knob is a Python number, the same for every row (its off value: 0, 1.0, 0.0 skips
    its work), or an array [B] of per-row values (the off value turns it off for that row).
    min_p: keep tokens whose probability is at least min_p times the top token's.
    top_k: keep the k most likely.  top_p: keep the smallest set whose mass reaches p.
    """
    if not _is_off(min_p, 0.0):
        # p_i >= min_p * p_max  <=>  x_i >= max(x) + log(min_p)   (log 0 = -inf keeps all)
        floor = jnp.max(x, axis=-1, keepdims=True) + jnp.log(_per_row(min_p, jnp.float32))
        x = jnp.where(x >= floor, x, -jnp.inf)
    if _is_off(top_k, 0) and _is_off(top_p, 1.0):
        return x
    sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
    keep = jnp.ones_like(sorted_x, dtype=bool)
    rank = jnp.arange(x.shape[-1])
    if isinstance(top_k, int):
        if top_k > 0:
            keep &= rank < top_k
    else:
        k = _per_row(top_k, jnp.int32)
        keep &= (rank < k) | (k <= 0)
    if not _is_off(top_p, 1.0):
        probs = jax.nn.softmax(jnp.where(keep, sorted_x, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        if isinstance(top_p, float):
            keep &= before < top_p  # the top token is always kept
        else:
            p = _per_row(top_p, jnp.float32)
            keep &= (before < p) | (p >= 1.0)  # rounding must not cut an off row's tail
    # threshold = smallest kept logit; ties at the threshold are kept
    thresh = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x >= thresh, x, -jnp.inf)


def _per_row(value: Knob, dtype) -> jax.Array:
    """A knob as a column [B, 1] (per-row array) or a scalar, in dtype."""
    a = jnp.asarray(value, dtype)
    return a[:, None] if a.ndim == 1 else a


def sample(logits: jax.Array, key: jax.Array, sp: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row from logits [B, V].

    Returns tokens [B] int32 and their logprobs [B] float32 under the temperature-scaled,
    unfiltered distribution (what policy-gradient methods use; log_softmax(logits) if greedy).
    """
    if sp.greedy:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    else:
        tok = jax.random.categorical(key, filtered_logits(logits, sp), axis=-1).astype(jnp.int32)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32) / sp.temperature, axis=-1)
    return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


def row_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """One PRNG key per row: fold_in(key(seed), position), seeds [B] uint32, positions [B] int32.

    Keyed by the request's seed and the position of the token being sampled, never by the
    row's place in the batch: a request draws the same tokens alone or in any batch."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)


def sample_rows(
    logits: jax.Array,
    temperature: jax.Array,
    seeds: jax.Array,
    positions: jax.Array,
    *,
    top_k: Knob = 0,
    top_p: Knob = 1.0,
    min_p: Knob = 0.0,
    num_top_logprobs: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Draw one token per row of logits [B, V] with per-row parameters.

    temperature [B] (0: greedy, argmax of the raw logits); seeds [B] uint32 and positions [B]
    int32 key each row's random stream (`row_keys`); top_k / top_p / min_p: per-row arrays [B]
    or static numbers (`filter_logits`: a static off value skips the sort).
    num_top_logprobs: N (static) alternatives to report.
    Returns tokens [B] int32, their logprobs [B] float32, and the N most likely tokens [B, N]
    int32 with their logprobs [B, N]; logprobs are under the temperature-scaled, unfiltered
    distribution (log_softmax(logits) for greedy rows), as `sample` reports them.
    """
    lf = logits.astype(jnp.float32)
    greedy = temperature <= 0.0
    x = lf / jnp.where(greedy, 1.0, temperature)[:, None]
    drawn = jax.vmap(jax.random.categorical)(
        row_keys(seeds, positions), filter_logits(x, top_k, top_p, min_p)
    )
    tok = jnp.where(greedy, jnp.argmax(lf, axis=-1), drawn).astype(jnp.int32)
    logp = jax.nn.log_softmax(x, axis=-1)
    tok_logp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    if num_top_logprobs:
        top_logp, top_ids = jax.lax.top_k(logp, num_top_logprobs)
    else:
        top_logp = jnp.zeros((lf.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((lf.shape[0], 0), jnp.int32)
    return tok, tok_logp, top_ids.astype(jnp.int32), top_logp
