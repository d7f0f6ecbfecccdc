"""What fine-tuning changed, matrix by matrix: singular values, singular directions, the rank of the change.

For each weight W (base) and W' (fine-tuned), with SVDs W = U Σ Vᵀ and W' = U' Σ' V'ᵀ:
- how far it moved: ‖W' − W‖_F / ‖W‖_F;
- which stretch factors moved: σ'ᵢ/σᵢ − 1 for the top k;
- which directions moved: |uᵢ·u'ᵢ| per top direction, and the principal angles between the top-k
  left (output) subspaces span(U_k), span(U'_k) and right (input) subspaces span(V_k), span(V'_k);
- the change itself, ΔW = W' − W: its effective rank (exp of the entropy of its normalized singular
  values), its stable rank ‖ΔW‖_F²/‖ΔW‖₂², and how many directions hold 90% of ‖ΔW‖_F² (is full
  fine-tuning's change low rank, as LoRA assumes?). A rank-R adapter's ΔW has at most R.
"""
import numpy as np

from tinylm.analysis.linalg import principal_angles
from tinylm.analysis.spectra import _effective_rank_from_sv
from tinylm.analysis.weights import weight_matrices

DEFAULT_K = 8
ENERGY = 0.9


def compare_matrix(W0, W1, k=DEFAULT_K):
    """The change from W0 to W1 (same shape).   -> dict of floats and short lists"""
    W0, W1 = np.asarray(W0, np.float64), np.asarray(W1, np.float64)
    U0, s0, V0t = np.linalg.svd(W0, full_matrices=False)
    U1, s1, V1t = np.linalg.svd(W1, full_matrices=False)
    k = min(k, len(s0))
    dW = W1 - W0
    ds = np.linalg.svd(dW, compute_uv=False)
    energy = np.cumsum(ds ** 2)
    total = energy[-1] if len(energy) else 0.0
    scale = float(np.linalg.norm(W0))
    tiny = ds[0] * max(dW.shape) * np.finfo(np.float32).eps if total > 0 else 0.0
    left = np.degrees(principal_angles(U0[:, :k], U1[:, :k]))
    right = np.degrees(principal_angles(V0t[:k].T, V1t[:k].T))
    return {
        "relative_change": float(np.sqrt(total) / scale) if scale > 0 else float("nan"),
        "sigma_base": s0[:k].tolist(), "sigma_tuned": s1[:k].tolist(),
        "sigma_relative_change": (s1[:k] / np.where(s0[:k] > 0, s0[:k], np.nan) - 1.0).tolist(),
        "direction_overlap_left": np.abs(np.sum(U0[:, :k] * U1[:, :k], axis=0)).tolist(),
        "direction_overlap_right": np.abs(np.sum(V0t[:k] * V1t[:k], axis=1)).tolist(),
        "angles_left_deg": left.tolist(), "angles_right_deg": right.tolist(),
        "delta_effective_rank": _effective_rank_from_sv(ds),
        "delta_stable_rank": float(total / ds[0] ** 2) if total > 0 else 0.0,
        "delta_numerical_rank": int(np.sum(ds > tiny)) if total > 0 else 0,
        "delta_rank_for_90pct": int(np.searchsorted(energy, ENERGY * total) + 1) if total > 0 else 0,
        "full_rank": int(min(dW.shape)),
        "k": k,
    }


def compare_weights(base, tuned, config, k=DEFAULT_K, progress=False):
    """compare_matrix for every weight matrix of the analysis (Q, K, V split).   -> {short name: dict}"""
    from tqdm import tqdm
    m0, m1 = weight_matrices(base, config), weight_matrices(tuned, config)
    return {name: compare_matrix(m0[name], m1[name], k)
            for name in tqdm(m0, desc="compare", disable=not progress, leave=False)}


COMPARE_HEADER = ("matrix", "‖ΔW‖/‖W‖", "Δσ₁", "Δσ_k", "max ∠U_k", "max ∠V_k", "rank ΔW", "eff.rank ΔW", "rank 90% ΔW", "of")


def compare_rows(results):
    """The terminal table: one row a matrix."""
    rows = []
    for name, m in results.items():
        rows.append((name, f"{m['relative_change']:.3f}", f"{100 * m['sigma_relative_change'][0]:+.1f}%",
                     f"{100 * m['sigma_relative_change'][-1]:+.1f}%", f"{max(m['angles_left_deg']):.1f}°",
                     f"{max(m['angles_right_deg']):.1f}°", str(m["delta_numerical_rank"]), f"{m['delta_effective_rank']:.1f}",
                     str(m["delta_rank_for_90pct"]), str(m["full_rank"])))
    return rows


def compare_summary(results):
    """One line: the median change and the rank of the changes of the block matrices."""
    block = {n: m for n, m in results.items() if n.startswith("h")}
    if not block:
        return "compare: no block matrices"
    med = lambda key: float(np.median([m[key] for m in block.values()]))
    frac = np.median([m["delta_rank_for_90pct"] / m["full_rank"] for m in block.values()])
    k = next(iter(block.values()))["k"]
    return (f"compare: block matrices moved by a median {med('relative_change'):.3f} of their norm; median largest "
            f"principal angle between base and tuned top-{k} subspaces {_median_max(block, 'angles_left_deg'):.1f}° "
            f"(outputs), {_median_max(block, 'angles_right_deg'):.1f}° (inputs); ΔW's effective rank median "
            f"{med('delta_effective_rank'):.1f}, 90% of ‖ΔW‖² in a median {100 * frac:.0f}% of the directions")


def _median_max(block, key):
    return float(np.median([max(m[key]) for m in block.values()]))
