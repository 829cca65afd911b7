"""The call descriptions every decode backend takes: `DecodeCall` (GQA decode, with the token a
decode step appends, `NewToken`) and `MLADecodeCall` (MLA latent decode)."""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True, eq=False)
class NewToken:
    """The token a decode step writes into the cache before attending.

    k, v [B, >= K, D]: its key heads are k[:, k_head_offset:k_head_offset + K] (values
    likewise), K the cache's head count, so both may be one fused q/k/v projection's output,
    read in place; the key is rotated by rope = (cos, sin), each [B, D] float32, when given."""

    k: jax.Array
    v: jax.Array
    rope: tuple[jax.Array, jax.Array] | None = None
    k_head_offset: int = 0
    v_head_offset: int = 0

    def check(self, kv_heads: int) -> None:
        for name, arr, off in (
            ("k_new", self.k, self.k_head_offset),
            ("v_new", self.v, self.v_head_offset),
        ):
            if off == 0 and arr.shape[1] != kv_heads:  # without an offset: exactly K heads
                raise ValueError(f"{name} has {arr.shape[1]} heads but the cache {kv_heads}")
            if not 0 <= off <= arr.shape[1] - kv_heads:
                raise ValueError(
                    f"{name} has {arr.shape[1]} heads: no {kv_heads} heads at offset {off}"
                )

    def heads(self, kv_heads: int) -> tuple[jax.Array, jax.Array]:
        """The new key and value, [B, K, D] each (slices of k and v)."""
        return (
            self.k[:, self.k_head_offset : self.k_head_offset + kv_heads],
            self.v[:, self.v_head_offset : self.v_head_offset + kv_heads],
        )


@dataclasses.dataclass(frozen=True, eq=False)
class DecodeCall:
    """One decode step's attention: q [B, H, D] (rotated) over caches [B, S, K, D] (or layer
    `layer` of [L, B, S, K, D], read in place), lengths [B] valid slots; with `new`, the step's
    token is first written at slot lengths[b] and attended too (then lengths counts the slots
    before it).  scale (default D ** -0.5), softcap, sliding_window as in
    `reference.decode_attention_reference`."""

    q: jax.Array
    k_cache: jax.Array
    v_cache: jax.Array
    lengths: jax.Array
    layer: jax.Array | int | None = None
    scale: float | None = None
    softcap: float | None = None
    sliding_window: int | None = None
    new: NewToken | None = None

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    def options(self) -> dict:
        """The keyword options of `reference.decode_attention_reference`."""
        return dict(scale=self.scale, softcap=self.softcap, sliding_window=self.sliding_window)

    def layer_caches(self) -> tuple[jax.Array, jax.Array]:
        """This layer's caches [B, S, K, D] (a slice XLA fuses into its consumer: no copy)."""
        if self.layer is None:
            return self.k_cache, self.v_cache
        return self.k_cache[self.layer], self.v_cache[self.layer]


@dataclasses.dataclass(frozen=True, eq=False)
class MLADecodeCall:
    """MLA decode with absorbed queries: q_latent [B, H, R], q_rope [B, H, Dr] over
    latent_cache [B, S, R], rope_cache [B, S, Dr] (or layer `layer` of [L, ...] both),
    lengths [B]; scale as in `reference.mla_decode_reference`."""

    q_latent: jax.Array
    q_rope: jax.Array
    latent_cache: jax.Array
    rope_cache: jax.Array
    lengths: jax.Array
    scale: float
    layer: jax.Array | int | None = None

    def layer_caches(self) -> tuple[jax.Array, jax.Array]:
        if self.layer is None:
            return self.latent_cache, self.rope_cache
        return self.latent_cache[self.layer], self.rope_cache[self.layer]
