"""The orthogonal polar factor of a matrix, three ways: G = Q P with Q = U Vᵀ (G's SVD with every σ set to 1).

Q is the orthogonal matrix nearest to G (in Frobenius norm, and in every unitarily invariant one): the
update Muon applies (core/muon.py). Each way is a test oracle for the others (tests/test_polar.py):

- `polar_svd`: Q = U Vᵀ from np.linalg.svd. Exact, and the slowest.
- `polar_eigh`: from the small Gram matrix. For G (m × n), m ≤ n: GGᵀ = U Λ Uᵀ = U Σ² Uᵀ, so
  Q = U Λ^{-1/2} Uᵀ G = U Σ⁻¹ Uᵀ U Σ Vᵀ = U Vᵀ. One m × m eigendecomposition and two products (a tall G
  is transposed first).
- `polar_newton_schulz`: no factorization at all, only products: X ← a X + (b A + c A²) X with A = X Xᵀ,
  an odd polynomial p(σ) = aσ + bσ³ + cσ⁵ applied to every singular value at once (U and V untouched).
  After X ← G/‖G‖_F every σ is in [0, 1]; the quintic's coefficients (3.4445, −4.7750, 2.0315) push small
  σ up fast and leave each σ in a band around 1 (about 0.7 to 1.2 after five steps for σ above about
  0.002·‖G‖_F; σ = 0.001·‖G‖_F ends near 0.5), not at 1 exactly: a cheap, approximate Q, enough for an optimizer.

Where G lacks a direction (σ = 0) the polar factor is not unique: the SVD sets that σ to 1 along an
arbitrary pair of singular vectors, the Gram way and Newton–Schulz leave it near 0. Every block
gradient of the model has one such direction (a layer norm's backward removes the mean, so 1ᵀ dW = 0
for the matrices writing into the residual stream; those reading a layer norm's output g ⊙ x̂ see
inputs orthogonal to 1/g, as x̂ sums to zero; both without biases, the default):
the methods agree on the directions G has, which is what the tests hold them to.

Every function takes one matrix (m, n) or a stack of them (..., m, n) and works on the short side, so
the square matrix it forms (XXᵀ or GGᵀ of the wide form) is min(m, n) wide.
"""
import numpy as np

NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
METHODS = ("newton_schulz", "svd", "eigh")


def _wide(f):
    """Run f on the matrix with at most as many rows as columns (transposing a tall one and back)."""
    def on_short_side(G, *args, **kwargs):
        tall = G.shape[-2] > G.shape[-1]
        Q = f(np.swapaxes(G, -1, -2) if tall else G, *args, **kwargs)
        return np.swapaxes(Q, -1, -2) if tall else Q
    on_short_side.__name__, on_short_side.__doc__ = f.__name__, f.__doc__
    return on_short_side


@_wide
def polar_newton_schulz(G, steps=5, eps=1e-7):
    """≈ U Vᵀ by `steps` quintic Newton–Schulz steps: X ← G/‖G‖_F; X ← aX + (bA + cA²)X, A = XXᵀ."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    X = G / (np.linalg.norm(G, axis=(-2, -1), keepdims=True) + eps)
    for _ in range(steps):
        A = X @ np.swapaxes(X, -1, -2)           # (m, m), m the short side
        X = a * X + (b * A + c * (A @ A)) @ X
    return X


def polar_svd(G):
    """U Vᵀ from G = U Σ Vᵀ (thin SVD)."""
    U, _, Vt = np.linalg.svd(G, full_matrices=False)
    return U @ Vt


@_wide
def polar_eigh(G, floor=None):
    """U Vᵀ = Λ^{-1/2}-whitened G: for wide G (m ≤ n), GGᵀ = U Λ Uᵀ and Q = U Λ^{-1/2} Uᵀ G.

    Eigenvalues below floor·λ_max (σ below √floor·σ_max: directions G hardly has, where the polar factor
    is not determined, and a float32 Gram matrix holds only rounding) are raised to it, so they come out
    small rather than as amplified noise. The products are in G's dtype; the small eigendecomposition is
    in float64 (it costs the same, and squaring G squared its condition number)."""
    if floor is None:
        floor = 1e-12 if G.dtype == np.float64 else 1e-7
    lam, U = np.linalg.eigh((G @ np.swapaxes(G, -1, -2)).astype(np.float64))
    # + the dtype's tiny: a zero G (λ_max = 0) gives a zero Q, and 1/√tiny still fits in G's dtype
    lam = np.maximum(lam, floor * lam[..., -1:] + np.finfo(G.dtype).tiny)
    inv_sqrt = (U / np.sqrt(lam)[..., None, :]) @ np.swapaxes(U, -1, -2)      # U Λ^{-1/2} Uᵀ
    return inv_sqrt.astype(G.dtype, copy=False) @ G


def orthogonalize(G, method="eigh", ns_steps=5):
    """The polar factor of G (or of each matrix in a stack) by `method`, one of METHODS."""
    if method == "newton_schulz":
        return polar_newton_schulz(G, ns_steps)
    if method == "svd":
        return polar_svd(G)
    if method == "eigh":
        return polar_eigh(G)
    raise ValueError(f"unknown orthogonalization {method!r}; choose one of {', '.join(METHODS)}")
