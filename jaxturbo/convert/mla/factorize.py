"""Low-rank factorisation of the K/V projections through a latent, and rank allocation.

Every method returns W ≈ B·A with A [r, D] (the down projection into the latent, part of
kv_a_proj_with_mqa) and B [out, r] (the up projection, part of kv_b_proj); weights are HF
oriented [out, in], so a token's latent is c = A x and its keys/values are B c.

  svd-joint  plain SVD of the stacked [W_k; W_v], one shared latent (MHA2MLA, Ji et al. 2025)
  svd        plain SVD of W_k and W_v separately, latent = [c_k; c_v]
  care       SVD of the whitened W·√C (C: calibration second moment of x), then
             A = V_rᵀ·√C⁻¹, B = U_r·Σ_r: the rank-r B·A minimising E|(W - B·A)x|²
             (CARE, Zhou et al., ICLR 2026), K and V separately

Ranks: `uniform` gives every layer the same latent width; `adjusted` water-fills a total
budget across layers and across K/V by the spectra (`allocate_ranks`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxturbo.errors import UserError

METHODS = ("svd-joint", "svd", "care")
RANK_MODES = ("uniform", "adjusted")


@dataclasses.dataclass
class Spectrum:
    """What a method factors for one matrix: the (possibly whitened) SVD and the un-whitening."""

    u: np.ndarray  # [out, m]
    s: np.ndarray  # [m] singular values, descending
    vt: np.ndarray  # [m, D] (whitened space for care)
    unwhiten: np.ndarray | None  # √C⁻¹ [D, D] for care, None for plain SVD

    def factors(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(A [r, D], B [out, r]) of the best rank-r approximation in this method's metric."""
        a = self.vt[:r]
        if self.unwhiten is not None:
            a = a @ self.unwhiten
        return a, self.u[:, :r] * self.s[:r]

    @property
    def energy(self) -> np.ndarray:
        return self.s**2


def sqrt_and_inverse(c: np.ndarray, floor: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric √C and √C⁻¹ of a PSD matrix (eigenvalues floored relative to the largest)."""
    w, q = np.linalg.eigh(c)
    w = np.maximum(w, floor * max(w.max(), 1e-300))
    return (q * np.sqrt(w)) @ q.T, (q / np.sqrt(w)) @ q.T


def spectrum(w: np.ndarray, method: str, c_sqrt: tuple[np.ndarray, np.ndarray] | None) -> Spectrum:
    """SVD of w [out, D] (plain) or of w·√C (care; c_sqrt = (√C, √C⁻¹))."""
    w = np.asarray(w, np.float64)
    if method == "care":
        if c_sqrt is None:
            raise ValueError("care needs the calibration covariance")
        u, s, vt = np.linalg.svd(w @ c_sqrt[0], full_matrices=False)
        return Spectrum(u, s, vt, c_sqrt[1])
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return Spectrum(u, s, vt, None)


def water_fill(spectra: list[np.ndarray], total: int, lo: list[int], hi: list[int]) -> list[int]:
    """Greedy water-filling of `total` rank units over matrices.

    spectra[i]: energies σ² (descending) of matrix i.  Each unit goes to the matrix whose next
    singular direction removes the largest share of that matrix's total energy,
    σ²_{r+1}/Σ_m σ²_m (shares, not raw energies, so layers with larger activations do not take
    everything), within lo[i] <= r_i <= hi[i].
    """
    r = list(lo)
    if sum(r) > total:
        raise UserError(
            f"the minimum ranks need {sum(r)} latent dims, the budget allows {total}; "
            "raise kv_budget or lower min_rank"
        )
    share = [e / max(e.sum(), 1e-300) for e in spectra]
    left = total - sum(r)
    # the shares are descending per matrix, so a merge of all candidates in order is the greedy
    cands = [
        (-share[i][k], i)
        for i in range(len(spectra))
        for k in range(r[i], min(hi[i], len(share[i])))
    ]
    cands.sort()
    for _, i in cands[:left]:
        r[i] += 1
    return r
