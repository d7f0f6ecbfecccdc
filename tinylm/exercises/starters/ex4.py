"""Exercise 4: the overlap of a random subspace with a fixed one, derived (tinylm/exercises/README.md).

Grade it with: python -m tinylm.exercises check 4
"""
import numpy as np


def expected_overlap(k, m, d):
    """E ‖Q_Aᵀ Q_B‖²_F (= E Σ cos²θᵢ) for a uniformly random k-dim subspace A and a fixed m-dim B of R^d: a formula."""
    raise NotImplementedError("expected_overlap")


def overlap(A, B):
    """Σ cos²θᵢ over the principal angles between the column spaces of A (d, k) and B (d, m), any full-rank bases."""
    raise NotImplementedError("overlap")


def random_subspace(d, k, rng):
    """(d, k) orthonormal columns spanning a uniformly random k-dim subspace of R^d; draw only from rng."""
    raise NotImplementedError("random_subspace")
