"""Exercise 4: the overlap of a random subspace with a fixed one, E ‖Q_Aᵀ Q_B‖²_F = k m / d."""
import numpy as np


def expected_overlap(k, m, d):
    """E Σ cos²θᵢ = tr(E[P_A] P_B) = tr((k/d) I · P_B) = k m / d, for a uniformly random k-dim A, fixed m-dim B."""
    return k * m / d


def overlap(A, B):
    """Σ cos²θᵢ over the principal angles of col(A), col(B) = ‖Q_Aᵀ Q_B‖²_F with orthonormal bases (QR)."""
    return float(np.sum((np.linalg.qr(A)[0].T @ np.linalg.qr(B)[0]) ** 2))


def random_subspace(d, k, rng):
    """An orthonormal basis (d, k) of a uniformly random k-dim subspace: QR of a Gaussian matrix
    (a Gaussian's distribution is unchanged by any rotation, so its column space is too)."""
    return np.linalg.qr(rng.standard_normal((d, k)))[0]
