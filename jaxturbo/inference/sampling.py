"""Token sampling: greedy, temperature, top-k and top-p (nucleus), with the chosen token's logprob."""

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
    x = logits.astype(jnp.float32) / sp.temperature
    if sp.top_k == 0 and sp.top_p >= 1.0:
        return x
    sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
    keep = jnp.ones_like(sorted_x, dtype=bool)
    if sp.top_k > 0:
        keep &= jnp.arange(x.shape[-1]) < sp.top_k
    if sp.top_p < 1.0:
        probs = jax.nn.softmax(jnp.where(keep, sorted_x, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        keep &= before < sp.top_p                     # the top token is always kept
    # threshold = smallest kept logit; ties at the threshold are kept
    thresh = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x >= thresh, x, -jnp.inf)


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
