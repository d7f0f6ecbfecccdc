"""Exercise 7: orthogonalize a matrix three ways: its polar factor (tinylm/exercises/README.md).

Grade it with: python -m tinylm.exercises check 7
"""
import numpy as np


def polar_svd(M):
    """Q (m, n), the orthonormal matrix nearest M (m ≥ n, full rank), from the SVD."""
    raise NotImplementedError("polar_svd")


def polar_eigh(M):
    """The same Q from an eigendecomposition of the Gram matrix MᵀM (no SVD)."""
    raise NotImplementedError("polar_eigh")


def polar_newton_schulz(M, steps=30):
    """The same Q (to 1e-6) by a Newton–Schulz iteration: matrix products only."""
    raise NotImplementedError("polar_newton_schulz")
