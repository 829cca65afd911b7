"""Which rotary components survive as the decoupled, shared RoPE key.

A GQA head of width hd rotates hd/2 frequency pairs (half layout: dims j and j + hd/2 share
frequency j).  MLA keeps one rope key of width dr shared by all heads, i.e. dr/2 slots; each
slot carries one (kv head g, frequency j) pair of the original keys, and each query head
keeps that pair only if it reads kv head g.  Everything else loses its rotation and goes
through the latent (the partial-RoPE step of MHA2MLA, Ji et al. 2025).

Pairs are ranked by their contribution to the attention scores on the calibration data,
energy(g, j) = Σ_{h reads g} |q_{h,j}|·|k_{g,j}| with |·| the RMS 2-norm of the pair
(rotation-invariant, so computable from the covariance alone: E|W x|² = tr(W C Wᵀ)).
criterion "rotation" multiplies it by `rotation_weight`: a strong pair whose wavelength far
exceeds the context barely rotates, so it loses little by going position-free.

Layouts:
  geometric  the slots' frequencies form θ_j0·r^i (an arithmetic run j0, j0+s, ... of the
             source frequencies), which DeepSeek-V3 configs express as (rope_theta, linear
             factor); per layer and slot, the kv head with the most energy at that frequency
  free       the dr/2 highest-energy (kv head, frequency) pairs, any frequencies (jaxturbo
             format only); with dr = K*hd it keeps every rotary component (exact conversion)
"""

from __future__ import annotations

import numpy as np

from jaxturbo.errors import UserError

LAYOUTS = ("geometric", "free")


def _row_energy(w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """E[(w_o · x)²] for each row o of w [out, D]."""
    w = np.asarray(w, np.float64)
    return np.sum((w @ c) * w, axis=1)


def pair_energy(
    wq: np.ndarray, wk: np.ndarray, c: np.ndarray, heads: int, kv_heads: int, hd: int
) -> np.ndarray:
    """energy [K, hd/2] of one layer (wq [H*hd, D], wk [K*hd, D], c [D, D])."""
    p = hd // 2
    qe = _row_energy(wq, c).reshape(heads, 2, p).sum(1)  # [H, P]: |q_{h,j}|²
    ke = _row_energy(wk, c).reshape(kv_heads, 2, p).sum(1)  # [K, P]
    qn = np.sqrt(qe).reshape(kv_heads, heads // kv_heads, p).sum(1)  # Σ over the group's heads
    return qn * np.sqrt(ke)


def rotation_weight(inv_freq: np.ndarray, context: int) -> np.ndarray:
    """1 - mean_{0<=Δ<context} cos(θ_j Δ) per frequency: how much dropping the rotation of
    pair j changes its scores over `context` tokens (≈0 for wavelengths far beyond it)."""
    x = np.asarray(inv_freq, np.float64) * context
    return 1.0 - np.sinc(x / np.pi)  # np.sinc(t) = sin(pi t)/(pi t)


def select(energy: np.ndarray, slots: int, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """Choose the rope slots from energies [L, K, P].

    Returns freq_index [slots] (source frequency per slot, ascending = highest frequency first,
    shared by all layers since the config has one set of frequencies) and kv_head [L, slots].
    """
    L, K, P = energy.shape
    if layout not in LAYOUTS:
        raise UserError(f"unknown rope layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if slots == 0:
        return np.zeros(0, np.int64), np.zeros((L, 0), np.int64)
    # each layer votes with its share of energy, so no single layer decides the frequencies
    en = energy / np.maximum(energy.sum(axis=(1, 2), keepdims=True), 1e-300)
    if layout == "free":
        if slots > K * P:
            raise UserError(f"rope dim {2 * slots} exceeds the {2 * K * P} rotary dims of the keys")
        tot = en.sum(0).reshape(-1)  # [(g, j)]
        pick = np.sort(np.argsort(-tot, kind="stable")[:slots])
        g, j = pick // P, pick % P
        order = np.argsort(j, kind="stable")
        return j[order], np.broadcast_to(g[order], (L, slots)).copy()
    if slots > P:
        raise UserError(
            f"rope dim {2 * slots} exceeds the head's {2 * P} rotary dims; use a "
            f"rope dim <= {2 * P} (or rope_layout='free')"
        )
    best_g = en.argmax(1)  # [L, P]
    best_e = en.max(1).sum(0)  # [P]
    best, arg = -1.0, (0, 1)
    for s in range(1, P if slots > 1 else 2):
        for j0 in range(0, P - s * (slots - 1)):
            score = best_e[j0 + s * np.arange(slots)].sum()
            if score > best:
                best, arg = score, (j0, s)
    j = arg[0] + arg[1] * np.arange(slots)
    return j, best_g[:, j]
