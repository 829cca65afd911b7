"""Per-token KL estimators between the policy and a reference policy, from sampled tokens only.

For a token y sampled from the policy pi, with logr = log ref(y) - log pi(y) (Schulman 2020,
"Approximating KL Divergence", http://joschu.net/blog/kl-approx.html):
  k1  -logr                    unbiased for KL(pi || ref), high variance, can be negative
  k2  0.5 * logr**2            biased, low variance, always >= 0
  k3  exp(logr) - 1 - logr     unbiased, low variance, always >= 0 (GRPO's estimator)
Registry keys also take verl's names: "kl" = k1, "mse" = k2, "low_var_kl" = k3.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

KLFn = Callable[[jax.Array, jax.Array], jax.Array]


def kl_k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """k1 = log pi - log ref, per token.  logp/ref_logp [B, T] -> [B, T]."""
    return logp.astype(jnp.float32) - ref_logp.astype(jnp.float32)


def kl_k2(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """k2 = (log pi - log ref)**2 / 2, per token.  [B, T] -> [B, T]."""
    d = kl_k1(logp, ref_logp)
    return 0.5 * d * d


def kl_k3(logp: jax.Array, ref_logp: jax.Array, clamp: float = 10.0) -> jax.Array:
    """k3 = ref/pi - 1 - log(ref/pi), per token.  [B, T] -> [B, T].

    log(ref/pi) is clamped to [-clamp, clamp] first: one token with a huge ratio would otherwise
    overflow exp and swamp the batch.
    """
    logr = jnp.clip(-kl_k1(logp, ref_logp), -clamp, clamp)
    return jnp.exp(logr) - 1.0 - logr


KL_ESTIMATORS: dict[str, KLFn] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "kl": kl_k1,
    "mse": kl_k2,
    "low_var_kl": kl_k3,
}


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k3") -> jax.Array:
    """Per-token KL estimate [B, T] by registry name (see KL_ESTIMATORS)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; choose one of {tuple(KL_ESTIMATORS)}"
        )
    return KL_ESTIMATORS[estimator](logp, ref_logp)
