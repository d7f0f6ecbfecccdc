"""Exercise 6: a ridge least-squares probe, by Cholesky and triangular solves (tinylm/exercises/README.md).

Grade it with: python -m tinylm.exercises check 6
"""
import numpy as np


def cholesky(G):
    """L (n, n) lower triangular with L Lᵀ = G, for G symmetric positive definite; written out, not np.linalg."""
    raise NotImplementedError("cholesky")


def solve_triangular(T, Y, lower):
    """Z (n, k) with T Z = Y, T (n, n) lower triangular if lower else upper, by substitution (no inverse)."""
    raise NotImplementedError("solve_triangular")


def ridge_probe(X, Y, lam):
    """W (d, k) minimizing ‖X W − Y‖²_F + lam ‖W‖²_F, for X (n, d), Y (n, k), lam > 0, with the two functions above."""
    raise NotImplementedError("ridge_probe")
