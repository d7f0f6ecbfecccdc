"""Exercise 5: the best rank-r approximation by truncated SVD, and its error (Eckart–Young)."""
import numpy as np


def truncated_svd(W, r):
    """W ≈ A B with A = U_r Σ_r (m, r), B = V_rᵀ (r, n): the best rank-r approximation in ‖·‖_F."""
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    return U[:, :r] * s[:r], Vt[:r]


def eckart_young_error(s, r):
    """‖W − W_r‖_F = √(σ²_{r+1} + … + σ²_n), from the singular values s (descending)."""
    return float(np.sqrt(np.sum(np.asarray(s)[r:] ** 2)))
