"""Multi-head latent attention (DeepSeek-V2, 2024) and the MLA decoder around it.

DeepSeek-V3 layout (no q LoRA), per layer, HF names and orientation [out, in]:

    self_attn.q_proj.weight             [H*(dn+dr), D]   per head: [q_nope (dn) | q_rope (dr)]
    self_attn.kv_a_proj_with_mqa.weight [R+dr, D]        [latent c (R) | shared rope key (dr)]
    self_attn.kv_a_layernorm.weight     [R]              only when cfg.latent_norm
    self_attn.kv_b_proj.weight          [H*(dn+dv), R]   per head: [k_nope (dn) | v (dv)]
    self_attn.o_proj.weight             [D, H*dv]

Letters: B batch, T new tokens, S cache slots, H query heads, R kv_lora_rank, dn/dr/dv the
nope/rope/value head widths.  score_h = scale*(q_nope_h.k_nope_h + q_rope_h.k_rope), with one
rope key shared by all heads; scale = (dn+dr)^-0.5 as in DeepSeek.

RoPE here uses jaxturbo's half layout (`models.rope.apply_rope`); the HF bridge permutes
DeepSeek's interleaved pairs on import/export.  `cfg.rope_inv_freq` lets a converted model keep
the frequencies it was trained with (None: DeepSeek's theta^(-2i/dr) schedule).

Cache: {"latent": [L, B, S, R], "k_rope": [L, B, S, dr], "lengths": [B]}: R + dr values per
token per layer instead of 2*K*hd.  Decode (T == 1) absorbs kv_b_proj into the query and the
output (`pallas_kernels.mla_decode_attention`); everything else expands keys/values (naive).
Paged (the serving engine's `PagedLatentCache`): every token of the flat ragged batch, prefill
chunks included, takes the absorbed path through `ragged_paged_mla_attention` (one kernel for
mixed batches; a long prefill chunk pays attention over R + dr wide rows per head instead of
expanding keys/values, which costs more FLOPs than the naive path at large T).

Everything but attention (embedding, norms, SwiGLU MLP, LM head, RoPE tables) is imported from
the GQA model, so the two share one implementation of each.  Generation and perplexity reach
this model through `models.dispatch.model_functions` (an MLAConfig picks `mla_forward` and
`init_mla_cache`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.layers import linear, rms_norm
from jaxturbo.models.rope import apply_rope
from jaxturbo.models.transformer import Cache, Params, embed, lm_head, mlp_block
from pallas_kernels.ragged_paged_attention import ragged_paged_mla_attention, write_mla_pages

LATENT_ALIGN = 16  # latent cache rows padded to a multiple of 16 values (32 bytes in bf16)


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """An MLA decoder: the GQA `base` config for everything but attention, plus MLA widths.

    base: vocabulary, hidden size, layers, heads (num_attention_heads), MLP, norms, rope_theta.
    kv_lora_rank: R, the stored latent width (the largest layer's rank when ranks differ).
    qk_nope_head_dim / qk_rope_head_dim / v_head_dim: dn, dr, dv.
    layer_ranks: per-layer latent ranks (<= R; the stacked weights are zero-padded to R);
      None = R everywhere.  Used for KV accounting; the stacked cache stores R.
    rope_inv_freq: dr/2 inverse frequencies of the rope key, None = theta^(-2i/dr).
    latent_norm: RMSNorm the latent (DeepSeek does; CARE conversions do not).
    latent_norm_eps: that norm's epsilon (transformers' DeepSeek-V3 hard-codes 1e-6).
    """

    base: ModelConfig
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    layer_ranks: tuple[int, ...] | None = None
    rope_inv_freq: tuple[float, ...] | None = None
    latent_norm: bool = True
    latent_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"MLA {name}={getattr(self, name)} must be a positive integer")
        if self.qk_rope_head_dim < 0 or self.qk_rope_head_dim % 2:
            raise UserError(f"MLA qk_rope_head_dim={self.qk_rope_head_dim} must be even and >= 0")
        if self.layer_ranks is not None:
            if len(self.layer_ranks) != self.base.num_hidden_layers:
                raise UserError(
                    f"{len(self.layer_ranks)} layer_ranks for {self.base.num_hidden_layers} layers"
                )
            if max(self.layer_ranks) > self.kv_lora_rank:
                raise UserError(
                    f"layer rank {max(self.layer_ranks)} exceeds kv_lora_rank {self.kv_lora_rank}"
                )
        if self.rope_inv_freq is not None and 2 * len(self.rope_inv_freq) != self.qk_rope_head_dim:
            raise UserError(
                f"{len(self.rope_inv_freq)} rope frequencies for qk_rope_head_dim "
                f"{self.qk_rope_head_dim} (need {self.qk_rope_head_dim // 2})"
            )

    # The base's fields that code written for any config reads (the decode loop's context
    # check and LM head, perplexity's window check, the CLI's stop tokens).
    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    @property
    def num_hidden_layers(self) -> int:
        return self.base.num_hidden_layers

    @property
    def max_position_embeddings(self) -> int:
        return self.base.max_position_embeddings

    @property
    def tie_word_embeddings(self) -> bool:
        return self.base.tie_word_embeddings

    @property
    def eos_token_id(self) -> tuple[int, ...]:
        return self.base.eos_token_id

    @property
    def num_heads(self) -> int:
        return self.base.num_attention_heads

    @property
    def scale(self) -> float:
        return float((self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5)

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.layer_ranks or (self.kv_lora_rank,) * self.base.num_hidden_layers

    def inv_freq(self) -> np.ndarray:
        """[dr/2] float32 inverse frequencies of the rope key."""
        if self.rope_inv_freq is not None:
            return np.asarray(self.rope_inv_freq, np.float32)
        dr = self.qk_rope_head_dim
        return (1.0 / self.base.rope_theta ** (np.arange(0, dr, 2, dtype=np.float64) / dr)).astype(
            np.float32
        )

    @property
    def cache_rank(self) -> int:
        """Width of the stored latent: R rounded up to LATENT_ALIGN, zero beyond R.  A row of an
        odd width (CARE's adjusted ranks pad to e.g. 187) is only 2-byte aligned, and the decode
        kernel then reads it with narrow loads: at 32K context on an H200 that model decoded
        at 0.77x its GQA original, the 160-wide uniform conversion at 1.33x."""
        return -(-self.kv_lora_rank // LATENT_ALIGN) * LATENT_ALIGN

    def kv_values_per_token(self) -> int:
        """Cached values per token over all layers, at the per-layer ranks (latent + rope key)."""
        return sum(self.ranks) + self.base.num_hidden_layers * self.qk_rope_head_dim


def mla_cos_sin(cfg: MLAConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, dr] for the rope key (half layout, as `models.rope.rope_cos_sin`)."""
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(cfg.inv_freq())
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def init_mla_cache(cfg: MLAConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> Cache:
    """Empty latent cache for `batch` rows of up to `max_len` tokens (latent rows
    `cfg.cache_rank` wide: R padded with zeros for aligned loads)."""
    L = cfg.base.num_hidden_layers
    return {
        "latent": jnp.zeros((L, batch, max_len, cfg.cache_rank), dtype),
        "k_rope": jnp.zeros((L, batch, max_len, cfg.qk_rope_head_dim), dtype),
        "lengths": jnp.zeros((batch,), jnp.int32),
    }


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedLatentCache:
    """Paged latent cache plus the layout of one flat ragged batch (the serving engine's step).

    latent_pages: [L, num_pages, page_size, Rc] (Rc = cfg.cache_rank, zero beyond R);
    rope_pages: [L, num_pages, page_size, dr]; page 0 is the null page.  slot_mapping [T],
    page_tables [S, max_pages], seq_lens [S], query_start_loc [S + 1]: as
    `jaxturbo.models.transformer.PagedCache`.
    """

    latent_pages: jax.Array
    rope_pages: jax.Array
    slot_mapping: jax.Array
    page_tables: jax.Array
    seq_lens: jax.Array
    query_start_loc: jax.Array


# ----------------------------------------------------------------------------- attention
def _pad_last(x: jax.Array, width: int) -> jax.Array:
    """x [..., n] zero-padded to [..., width] (the latent cache's aligned rows)."""
    return (
        x
        if x.shape[-1] == width
        else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
    )


def _project(lp: Params, cfg: MLAConfig, h: jax.Array, cos: jax.Array, sin: jax.Array):
    """Queries and the cached quantities of normed input h [B, T, D].

    Returns q_nope [B,T,H,dn], q_rope [B,T,H,dr] (roped), latent [B,T,R], k_rope [B,T,dr] (roped).
    """
    b, t, _ = h.shape
    dn, dr, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    q = linear(h, lp["self_attn.q_proj.weight"]).reshape(b, t, -1, dn + dr)
    q_nope, q_rope = q[..., :dn], apply_rope(q[..., dn:], cos, sin)
    ckv = linear(h, lp["self_attn.kv_a_proj_with_mqa.weight"])
    latent, k_rope = ckv[..., :r], ckv[..., r:]
    if cfg.latent_norm:
        latent = rms_norm(latent, lp["self_attn.kv_a_layernorm.weight"], cfg.latent_norm_eps)
    k_rope = apply_rope(k_rope[:, :, None, :], cos, sin)[:, :, 0]
    return q_nope, q_rope, latent, k_rope


def _naive(
    lp: Params,
    cfg: MLAConfig,
    q_nope: jax.Array,
    q_rope: jax.Array,
    latent: jax.Array,
    k_rope: jax.Array,
    *,
    causal: bool,
    lengths: jax.Array | None,
    segment_ids: jax.Array | None,
    attn_impl: str,
) -> jax.Array:
    """Attention with keys/values expanded from the latent: q [B,T,H,*], latent [B,S,R],
    k_rope [B,S,dr] -> [B, T, H, dv].  With `lengths`, slots >= lengths[b] are masked out
    (queries are then the last T of each row's valid slots)."""
    b, s, _ = latent.shape
    h, dn, dv = q_nope.shape[2], cfg.qk_nope_head_dim, cfg.v_head_dim
    kv = linear(latent, lp["self_attn.kv_b_proj.weight"]).reshape(b, s, h, dn + dv)
    k = jnp.concatenate(
        [kv[..., :dn], jnp.broadcast_to(k_rope[:, :, None, :], (b, s, h, k_rope.shape[-1]))],
        axis=-1,
    )
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    v = kv[..., dn:]
    # the attention op wants one head width: zero-pad the narrower side (no effect on scores)
    width = max(q.shape[-1], dv)
    pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])
    kv_seg = None
    if lengths is not None:
        # decode-style: slot j visible to all queries iff j < lengths[b] (queries are the last ones)
        seg_q = jnp.ones((b, q.shape[1]), jnp.int32)
        kv_seg = jnp.where(jnp.arange(s)[None] < lengths[:, None], 1, 0).astype(jnp.int32)
        segment_ids = seg_q
    out = pallas_kernels.attention(
        pad(q),
        pad(k),
        pad(v),
        causal=causal,
        segment_ids=segment_ids,
        kv_segment_ids=kv_seg,
        scale=cfg.scale,
        implementation=attn_impl,
    )
    return out[..., :dv]


def absorbed_decode(
    lp: Params,
    cfg: MLAConfig,
    q_nope: jax.Array,
    q_rope: jax.Array,
    latent_cache: jax.Array,
    rope_cache: jax.Array,
    lengths: jax.Array,
    attn_impl: str = "auto",
    layer: jax.Array | int | None = None,
) -> jax.Array:
    """One decode step with kv_b_proj absorbed (DeepSeek-V2 §2.1.2).

    q_nope [B,H,dn], q_rope [B,H,dr] (roped), latent_cache [B,S,Rc] (Rc >= R: zero-padded),
    rope_cache [B,S,dr],
    lengths [B] valid slots -> [B, H, dv].  Keys/values are never expanded: the query moves
    into the latent space (q_nope . W_UK_h) and W_UV_h is applied to the latent output.
    layer: the caches are every layer's ([L, B, S, R], ...); the kernel reads this one in place.
    """
    return _absorbed(
        lp,
        cfg,
        q_nope,
        latent_cache.shape[-1],
        lambda q_latent: pallas_kernels.mla_decode_attention(
            q_latent,
            q_rope,
            latent_cache,
            rope_cache,
            lengths,
            scale=cfg.scale,
            layer=layer,
            implementation=attn_impl,
        ),
    )


def _absorbed(
    lp: Params,
    cfg: MLAConfig,
    q_nope: jax.Array,
    width: int,
    attend: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """kv_b_proj absorbed around a latent attention: q_nope [N, H, dn] -> q_latent [N, H, width]
    (zero beyond R) -> attend(q_latent) [N, H, width] -> values [N, H, dv]."""
    h, dn, dv = q_nope.shape[1], cfg.qk_nope_head_dim, cfg.v_head_dim
    w = lp["self_attn.kv_b_proj.weight"].reshape(h, dn + dv, -1)  # [H, dn+dv, R]
    r = w.shape[-1]
    q_latent = _pad_last(jnp.einsum("bhd,hdr->bhr", q_nope, w[:, :dn]), width)
    out_latent = attend(q_latent)
    return jnp.einsum("bhr,hvr->bhv", out_latent[..., :r], w[:, dn:])


def paged_mla_attention(
    lp: Params,
    cfg: MLAConfig,
    q_nope: jax.Array,
    q_rope: jax.Array,
    latent: jax.Array,
    k_rope: jax.Array,
    layer: jax.Array,
    cache: PagedLatentCache,
    attn_impl: str,
) -> tuple[jax.Array, PagedLatentCache]:
    """MLA of a flat ragged batch, absorbed: q_nope [1,T,H,dn], q_rope [1,T,H,dr] (roped),
    latent [1,T,R], k_rope [1,T,dr] (roped) -> [1, T, H, dv] and the cache with this layer's
    pages written (before the attention reads them)."""
    lat, rope = write_mla_pages(
        cache.latent_pages,
        cache.rope_pages,
        _pad_last(latent[0], cache.latent_pages.shape[-1]),
        k_rope[0],
        cache.slot_mapping,
        layer,
    )
    out = _absorbed(
        lp,
        cfg,
        q_nope[0],
        lat.shape[-1],
        lambda q_latent: ragged_paged_mla_attention(
            q_latent,
            q_rope[0],
            lat,
            rope,
            cache.page_tables,
            cache.seq_lens,
            cache.query_start_loc,
            scale=cfg.scale,
            layer=layer,
            implementation=attn_impl,
        ),
    )
    return out[None], dataclasses.replace(cache, latent_pages=lat, rope_pages=rope)


def mla_attention_block(
    lp: Params,
    cfg: MLAConfig,
    h: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    layer: jax.Array,
    *,
    segment_ids: jax.Array | None,
    cache: Cache | None,
    attn_impl: str,
    absorb: bool,
) -> tuple[jax.Array, Cache | None]:
    """MLA of one layer on normed input h [B, T, D]; the o_proj output and the updated cache.

    Without a cache: causal attention over the T tokens.  With a cache and T > 1 (prefill):
    also writes latent/rope key into slots [0, T).  With a cache and T == 1 (decode): writes
    slot lengths[b] and attends to [0, lengths[b]] (absorbed, or expanded when absorb=False).
    """
    b, t, _ = h.shape
    q_nope, q_rope, latent, k_rope = _project(lp, cfg, h, cos, sin)
    if isinstance(cache, PagedLatentCache):  # the engine's flat ragged batch
        out, cache = paged_mla_attention(
            lp, cfg, q_nope, q_rope, latent, k_rope, layer, cache, attn_impl
        )
        return linear(out.reshape(b, t, -1), lp["self_attn.o_proj.weight"]), cache
    stored = None if cache is None else _pad_last(latent, cache["latent"].shape[-1])
    if cache is not None and t == 1:
        rows, pos = jnp.arange(b), cache["lengths"]
        lc = cache["latent"].at[layer, rows, pos].set(stored[:, 0].astype(cache["latent"].dtype))
        rc = cache["k_rope"].at[layer, rows, pos].set(k_rope[:, 0].astype(cache["k_rope"].dtype))
        cache = {**cache, "latent": lc, "k_rope": rc}
        if absorb:
            out = absorbed_decode(
                lp, cfg, q_nope[:, 0], q_rope[:, 0], lc, rc, pos + 1, attn_impl, layer=layer
            )[:, None]
        else:
            out = _naive(
                lp,
                cfg,
                q_nope,
                q_rope,
                lc[layer][..., : latent.shape[-1]],
                rc[layer],
                causal=False,
                lengths=pos + 1,
                segment_ids=None,
                attn_impl=attn_impl,
            )
    else:
        if cache is not None:
            start = (layer, 0, 0, 0)
            cache = {
                **cache,
                "latent": jax.lax.dynamic_update_slice(
                    cache["latent"], stored[None].astype(cache["latent"].dtype), start
                ),
                "k_rope": jax.lax.dynamic_update_slice(
                    cache["k_rope"], k_rope[None].astype(cache["k_rope"].dtype), start
                ),
            }
        out = _naive(
            lp,
            cfg,
            q_nope,
            q_rope,
            latent,
            k_rope,
            causal=True,
            lengths=None,
            segment_ids=segment_ids,
            attn_impl=attn_impl,
        )
    return linear(out.reshape(b, t, -1), lp["self_attn.o_proj.weight"]), cache


# ----------------------------------------------------------------------------- model
def mla_forward(
    params: Params,
    cfg: MLAConfig,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: Cache | None = None,
    lengths: jax.Array | None = None,
    attn_impl: str = "auto",
    absorb: bool = True,
    return_hidden: bool = False,
) -> tuple[jax.Array, Cache | None]:
    """Run the MLA decoder (standard residual, layers under lax.scan).

    tokens [B, T]; positions [B, T] (default 0..T-1, or the cache lengths when decoding);
    cache from `init_mla_cache` (prefill T > 1 needs `lengths` [B]), or a `PagedLatentCache`
    (tokens [1, T] a flat ragged batch, positions required).  Returns logits
    [B, T, V] float32 (or the final normed hidden with return_hidden) and the updated cache.
    """
    b, t = tokens.shape
    paged = isinstance(cache, PagedLatentCache)
    if positions is None:
        if paged:
            raise ValueError("a PagedLatentCache needs explicit positions [1, T]")
        positions = (
            cache["lengths"][:, None]
            if cache is not None and t == 1
            else jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        )
    if cache is not None and t > 1 and lengths is None and not paged:
        raise ValueError("prefill with a cache needs `lengths` (valid tokens per row)")
    cos, sin = mla_cos_sin(cfg, positions)
    eps = cfg.base.rms_norm_eps
    x = embed(params, tokens)

    def body(carry, xs):
        x, c = carry
        lp, i = xs
        a, c = mla_attention_block(
            lp,
            cfg,
            rms_norm(x, lp["input_layernorm.weight"], eps),
            cos,
            sin,
            i,
            segment_ids=segment_ids,
            cache=c,
            attn_impl=attn_impl,
            absorb=absorb,
        )
        x = x + a
        x = x + mlp_block(lp, rms_norm(x, lp["post_attention_layernorm.weight"], eps))
        return (x, c), None

    L = cfg.base.num_hidden_layers
    (x, cache), _ = jax.lax.scan(
        body, (x, cache), (params["layers"], jnp.arange(L, dtype=jnp.int32))
    )
    x = rms_norm(x, params["model.norm.weight"], eps)
    if cache is not None and not paged:
        new_len = cache["lengths"] + 1 if t == 1 else lengths.astype(jnp.int32)
        cache = {**cache, "lengths": new_len}
    if return_hidden:
        return x, cache
    return lm_head(params, cfg.base, x), cache
