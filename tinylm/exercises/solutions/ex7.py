"""Exercise 7: the polar factor Q = U Vᵀ of M = U Σ Vᵀ (the orthonormal matrix nearest M), three ways."""
import numpy as np


def polar_svd(M):
    """Q = U Vᵀ from the thin SVD M = U Σ Vᵀ."""
    U, _, Vt = np.linalg.svd(M, full_matrices=False)
    return U @ Vt


def polar_eigh(M):
    """Q = M (MᵀM)^(−1/2), with MᵀM = V Λ Vᵀ by eigh: (MᵀM)^(−1/2) = V Λ^(−1/2) Vᵀ (M of full column rank)."""
    lam, V = np.linalg.eigh(M.T @ M)
    return M @ (V / np.sqrt(lam)) @ V.T


def polar_newton_schulz(M, steps=30):
    """X ← 1.5 X − 0.5 X XᵀX from X = M/‖M‖_F: each singular value σ ↦ 1.5σ − 0.5σ³, which climbs to 1
    from anywhere in (0, 1], while U and V stay; only matrix products."""
    X = M / np.linalg.norm(M)
    for _ in range(steps):
        X = 1.5 * X - 0.5 * X @ (X.T @ X)
    return X
