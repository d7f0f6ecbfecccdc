"""Exercise 6: a ridge least-squares probe, solved by Cholesky and two triangular solves."""
import numpy as np


def cholesky(G):
    """L lower triangular with L Lᵀ = G (G symmetric positive definite), column by column:
    L[j, j] = √(G[j, j] − Σ_{k<j} L[j, k]²),  L[i, j] = (G[i, j] − Σ_{k<j} L[i, k] L[j, k]) / L[j, j] for i > j."""
    n = G.shape[0]
    L = np.zeros_like(G, dtype=np.float64)
    for j in range(n):
        L[j, j] = np.sqrt(G[j, j] - L[j, :j] @ L[j, :j])
        L[j + 1:, j] = (G[j + 1:, j] - L[j + 1:, :j] @ L[j, :j]) / L[j, j]
    return L


def solve_triangular(T, Y, lower):
    """Z with T Z = Y, T (n, n) triangular, Y (n, k): row by row, each row one dot product with the rows solved
    (forward substitution from the top when lower, back substitution from the bottom when upper)."""
    n = T.shape[0]
    Z = np.zeros((n, Y.shape[1]))
    for i in (range(n) if lower else reversed(range(n))):
        done = slice(0, i) if lower else slice(i + 1, n)
        Z[i] = (Y[i] - T[i, done] @ Z[done]) / T[i, i]
    return Z


def ridge_probe(X, Y, lam):
    """W = argmin ‖X W − Y‖² + λ‖W‖²: the normal equations (XᵀX + λI) W = XᵀY, with XᵀX + λI = L Lᵀ,
    solved as L Z = XᵀY, then Lᵀ W = Z."""
    L = cholesky(X.T @ X + lam * np.eye(X.shape[1]))
    return solve_triangular(L.T, solve_triangular(L, X.T @ Y, lower=True), lower=False)
