"""GQA params -> MLA params (DeepSeek-V3 layout), with KV budget accounting.

Per layer (H query heads, K kv heads of width hd, D hidden):

* RoPE: `rope_select` picks dr/2 (kv head, frequency) pairs for the shared rope key; their
  rows of W_k become the rope rows of kv_a_proj_with_mqa, each query head keeps the matching
  rows of its own W_q in its q_rope (zeros for slots of other kv heads).
* NoPE: the remaining components of q (dn = hd, selected rows zeroed) score against k_nope
  from the latent; W_k's selected rows are zeroed before factorising, so no rank is spent on
  them.  v_head_dim = hd.
* Latent: `factorize` gives A (into kv_a_proj) and B (into kv_b_proj, one block per query
  head, copied from its kv head's rows).  Layers with smaller ranks are zero-padded to R.
* Scale: DeepSeek scales scores by (dn+dr)^-0.5, the source by hd^-0.5; q_proj is multiplied
  by sqrt((dn+dr)/hd) so scores are unchanged.

Budget: `kv_budget` * 2*K*hd values per token per layer hold latent + rope key
(1.0 = the GQA cache size).  With every rotary component kept (rope_layout="free",
rope_dim=K*hd) and full ranks the conversion is exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxturbo.convert.mla import factorize as fz
from jaxturbo.convert.mla import rope_select
from jaxturbo.convert.mla.calibrate import shrink
from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.mla import MLAConfig
from jaxturbo.models.rope import inv_frequencies

Params = dict[str, Any]


@dataclasses.dataclass
class ConversionResult:
    """The MLA model and what the conversion decided."""

    cfg: MLAConfig
    params: Params  # numpy float32, stacked layers
    method: str
    rank_mode: str
    kv_budget: float
    rank_k: list[int]  # per layer (svd-joint: the joint rank, rank_v all 0)
    rank_v: list[int]
    rope_freq_index: list[int]  # source frequency index per rope slot
    rope_kv_head: list[list[int]]  # [L][slot] source kv head per rope slot
    kv_values_before: int  # per token, all layers
    kv_values_after: int  # per token, all layers, at the per-layer ranks
    kv_values_stored: int  # per token with ranks padded to kv_lora_rank (stacked / HF)

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "ranks": self.rank_mode,
            "kv_budget": self.kv_budget,
            "kv_lora_rank": self.cfg.kv_lora_rank,
            "rope_dim": self.cfg.qk_rope_head_dim,
            "rank_k": self.rank_k,
            "rank_v": self.rank_v,
            "kv_values_per_token_before": self.kv_values_before,
            "kv_values_per_token_after": self.kv_values_after,
            "kv_values_per_token_padded": self.kv_values_stored,
        }


def _check_source(cfg: ModelConfig) -> None:
    if cfg.attention_bias:
        raise UserError(
            "source model has attention biases (qwen2); MLA conversion supports "
            "bias-free attention (llama)"
        )
    if cfg.qk_norm:
        raise UserError(
            "source model has per-head q/k norms (qwen3), which do not commute with "
            "the latent factorisation; convert a llama-family model"
        )
    if cfg.residual_mode != "standard":
        raise UserError(f"residual_mode={cfg.residual_mode!r}: convert standard-residual models")


def convert_to_mla(
    params: Params,
    cfg: ModelConfig,
    cov: np.ndarray | None,
    *,
    method: str = "care",
    ranks: str = "uniform",
    kv_budget: float = 1.0,
    rope_dim: int | None = None,
    rope_layout: str = "geometric",
    alpha: float = 0.01,
    min_rank: int | None = None,
    rope_criterion: str = "rotation",
    context: int = 512,
    progress: Callable[[int], None] | None = None,
) -> ConversionResult:
    """Convert GQA params (HF names, stacked layers) to MLA.

    cov: [L, D, D] calibration second moments (`calibrate.attention_input_covariance`); needed
      by `care` and by the energy-based rope selection (None: identity, i.e. weights only).
    rope_dim: shared rope key width dr (default hd/2).  alpha: covariance shrinkage.
    min_rank: smallest rank per matrix under `adjusted` (default: 1/8 of the uniform share).
    rope_criterion: "rotation" (default: energy weighted by how much each frequency rotates
      over `context` tokens) or "energy" (plain score energy); see `rope_select` and
      experiments/mla/RESULTS.md (levers) for why plain energy is the wrong default.
    """
    _check_source(cfg)
    if method not in fz.METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(fz.METHODS)}")
    if ranks not in fz.RANK_MODES:
        raise UserError(f"unknown rank mode {ranks!r}; choose one of {', '.join(fz.RANK_MODES)}")
    L, D, H, K, hd = (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    )
    g_of = np.arange(H) // (H // K)
    dr = hd // 2 if rope_dim is None else int(rope_dim)
    if dr % 2 or dr < 0:
        raise UserError(f"rope_dim={dr} must be even and >= 0")
    orig = 2 * K * hd
    per_layer = int(round(kv_budget * orig)) - dr
    if per_layer < 1:
        raise UserError(
            f"kv_budget={kv_budget} leaves {per_layer} latent dims per layer after "
            f"the {dr}-dim rope key (of {orig}); raise the budget or lower rope_dim"
        )
    lay = {k: np.asarray(v, np.float64) for k, v in params["layers"].items()}
    if cov is None:
        cov = np.broadcast_to(np.eye(D), (L, D, D))
    if method == "care" and cov.shape != (L, D, D):
        raise UserError(f"covariance has shape {cov.shape}, expected {(L, D, D)}")
    cs = [shrink(np.asarray(cov[i], np.float64), alpha) for i in range(L)]

    # --- RoPE slots (shared frequencies, per-layer kv head)
    energy = np.stack(
        [
            rope_select.pair_energy(
                lay["self_attn.q_proj.weight"][i],
                lay["self_attn.k_proj.weight"][i],
                cs[i],
                H,
                K,
                hd,
            )
            for i in range(L)
        ]
    )
    src_freq = inv_frequencies(cfg)
    if rope_criterion == "rotation":
        energy = energy * rope_select.rotation_weight(src_freq, context)[None, None]
    elif rope_criterion != "energy":
        raise UserError(f"unknown rope criterion {rope_criterion!r}; choose energy or rotation")
    fidx, khead = rope_select.select(energy, dr // 2, rope_layout)
    P = hd // 2

    # --- targets and spectra
    wk_nope, wv = [], []
    for i in range(L):
        wk = lay["self_attn.k_proj.weight"][i].copy()
        for s, j in enumerate(fidx):
            g = khead[i, s]
            wk[g * hd + j] = 0.0
            wk[g * hd + j + P] = 0.0
        wk_nope.append(wk)
        wv.append(lay["self_attn.v_proj.weight"][i])
    roots = [fz.sqrt_and_inverse(c) for c in cs] if method == "care" else [None] * L
    if method == "svd-joint":
        specs = [[fz.spectrum(np.concatenate([wk_nope[i], wv[i]]), "svd", None)] for i in range(L)]
    else:
        specs = [
            [fz.spectrum(wk_nope[i], method, roots[i]), fz.spectrum(wv[i], method, roots[i])]
            for i in range(L)
        ]
        for i in range(L):  # rows zeroed for rope carry no energy: do not count them as rank
            nz = int((np.abs(wk_nope[i]).sum(1) > 0).sum())
            specs[i][0] = dataclasses.replace(
                specs[i][0], u=specs[i][0].u[:, :nz], s=specs[i][0].s[:nz], vt=specs[i][0].vt[:nz]
            )

    # --- ranks
    flat = [sp for layer in specs for sp in layer]
    hi = [len(sp.s) for sp in flat]
    per = len(specs[0])
    if ranks == "uniform":
        alloc = []
        for i in range(L):
            if per == 1:
                alloc.append(min(per_layer, hi[i]))
            else:
                hk, hv = hi[2 * i], hi[2 * i + 1]
                rk = min(hk, per_layer // 2)
                rv = min(hv, per_layer - rk)
                rk = min(hk, per_layer - rv)  # hand K what V could not use
                alloc += [rk, rv]
    else:
        lo_default = max(1, per_layer // (8 * per))
        lo = [min(h, lo_default if min_rank is None else min_rank) for h in hi]
        alloc = fz.water_fill([sp.energy for sp in flat], L * per_layer, lo, hi)
    rk_l = [alloc[per * i] for i in range(L)]
    rv_l = [alloc[per * i + 1] if per == 2 else 0 for i in range(L)]
    lat = [rk_l[i] + rv_l[i] for i in range(L)]
    R = max(lat)

    # --- build MLA weights
    scale_q = np.sqrt((hd + dr) / hd)
    q_out, kva_out, kvb_out = [], [], []
    for i in range(L):
        wq = lay["self_attn.q_proj.weight"][i].reshape(H, hd, D)
        wk = lay["self_attn.k_proj.weight"][i].reshape(K, hd, D)
        q_nope = wq.copy()
        q_rope = np.zeros((H, dr, D))
        k_rope = np.zeros((dr, D))
        for s, j in enumerate(fidx):
            g = khead[i, s]
            k_rope[s], k_rope[s + dr // 2] = wk[g, j], wk[g, j + P]
            for h in np.nonzero(g_of == g)[0]:
                q_rope[h, s], q_rope[h, s + dr // 2] = wq[h, j], wq[h, j + P]
                q_nope[h, j] = 0.0
                q_nope[h, j + P] = 0.0
        q_out.append((np.concatenate([q_nope, q_rope], axis=1) * scale_q).reshape(H * (hd + dr), D))
        a = np.zeros((R, D))
        bk = np.zeros((K * hd, R))
        bv = np.zeros((K * hd, R))
        if per == 1:
            a_, b_ = specs[i][0].factors(rk_l[i])
            a[: rk_l[i]] = a_
            bk[:, : rk_l[i]], bv[:, : rk_l[i]] = b_[: K * hd], b_[K * hd :]
        else:
            ak, bk_ = specs[i][0].factors(rk_l[i])
            av, bv_ = specs[i][1].factors(rv_l[i])
            a[: rk_l[i]], a[rk_l[i] : lat[i]] = ak, av
            bk[:, : rk_l[i]], bv[:, rk_l[i] : lat[i]] = bk_, bv_
        kva_out.append(np.concatenate([a, k_rope]))
        bk3, bv3 = bk.reshape(K, hd, R)[g_of], bv.reshape(K, hd, R)[g_of]  # [H, hd, R]
        kvb_out.append(np.concatenate([bk3, bv3], axis=1).reshape(H * 2 * hd, R))
        if progress is not None:
            progress(1)

    f32 = lambda x: np.asarray(x, np.float32)
    new_layers = {
        k: f32(v)
        for k, v in params["layers"].items()
        if not k.startswith("self_attn.") or k == "self_attn.o_proj.weight"
    }
    new_layers["self_attn.q_proj.weight"] = f32(np.stack(q_out))
    new_layers["self_attn.kv_a_proj_with_mqa.weight"] = f32(np.stack(kva_out))
    new_layers["self_attn.kv_b_proj.weight"] = f32(np.stack(kvb_out))
    new_params = {k: f32(v) for k, v in params.items() if k != "layers"}
    new_params["layers"] = new_layers
    mcfg = MLAConfig(
        base=cfg,
        kv_lora_rank=R,
        qk_nope_head_dim=hd,
        qk_rope_head_dim=dr,
        v_head_dim=hd,
        layer_ranks=tuple(lat) if len(set(lat)) > 1 else None,
        rope_inv_freq=tuple(float(src_freq[j]) for j in fidx),
        latent_norm=False,
    )
    return ConversionResult(
        cfg=mcfg,
        params=new_params,
        method=method,
        rank_mode=ranks,
        kv_budget=kv_budget,
        rank_k=rk_l,
        rank_v=rv_l,
        rope_freq_index=[int(j) for j in fidx],
        rope_kv_head=khead.tolist(),
        kv_values_before=L * orig,
        kv_values_after=sum(lat) + L * dr,
        kv_values_stored=L * (R + dr),
    )
