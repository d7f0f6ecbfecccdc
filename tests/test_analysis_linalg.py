"""Linear-algebra tools of the analysis on inputs whose answers are known."""

import numpy as np
import pytest

from tinylm.analysis import linalg


def orthogonal(n, rng):
    """A random n×n orthogonal matrix (QR of a Gaussian, signs fixed)."""
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    return Q * np.sign(np.diag(R))


# ---------------------------------------------------------------- ridge and probes


def test_ridge_solves_the_regularized_normal_equation():
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((30, 5)), rng.standard_normal((30, 2))
    B = linalg.ridge_least_squares(X, Y, 0.7)["coef"]
    np.testing.assert_allclose((X.T @ X + 0.7 * np.eye(5)) @ B, X.T @ Y, atol=1e-10)
    # Wide X (d > n) goes through the dual system: same answer.
    Xw = rng.standard_normal((8, 20))
    Yw = rng.standard_normal(8)
    Bw = linalg.ridge_least_squares(Xw, Yw, 0.3)["coef"]
    np.testing.assert_allclose((Xw.T @ Xw + 0.3 * np.eye(20)) @ Bw, Xw.T @ Yw, atol=1e-10)


def test_ridge_intercept_and_exact_recovery_at_lambda_zero():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((50, 4))
    B_true, b_true = np.array([1.0, -2.0, 0.5, 3.0]), 7.0
    fit = linalg.ridge_least_squares(X, X @ B_true + b_true, 0.0, fit_intercept=True)
    np.testing.assert_allclose(fit["coef"], B_true, atol=1e-10)
    assert fit["intercept"] == pytest.approx(b_true)


def test_regression_probe_recovers_planted_signal_and_fails_on_noise():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((400, 16))
    y = X @ rng.standard_normal(16) + 0.01 * rng.standard_normal(400)
    assert linalg.probe_fit_regression(X, y, lam=1e-3)["r2_test"] > 0.99
    noise = linalg.probe_fit_regression(X, rng.standard_normal(400), lam=1e-3)
    assert abs(noise["r2_test"]) < 0.15
    assert noise["r2_train"] > noise["r2_test"]  # it overfits the training split a little


def test_classification_probe_recovers_planted_classes_and_fails_on_noise():
    rng = np.random.default_rng(3)
    n, d, k = 600, 10, 4
    centres = 4.0 * rng.standard_normal((k, d))
    labels = rng.integers(0, k, n)
    X = centres[labels] + rng.standard_normal((n, d))
    good = linalg.probe_fit_classification(X, labels)
    assert good["accuracy_test"] > 0.95
    bad = linalg.probe_fit_classification(rng.standard_normal((n, d)), labels)
    assert abs(bad["accuracy_test"] - bad["chance"]) < 0.1


# ---------------------------------------------------------------- PCA, angles


def test_pca_recovers_planted_variances_and_directions():
    rng = np.random.default_rng(4)
    stds = np.array([5.0, 3.0, 1.0, 0.5])
    R = orthogonal(4, rng)
    X = (rng.standard_normal((20000, 4)) * stds) @ R.T + np.array([1.0, 2.0, 3.0, 4.0])
    out = linalg.pca(X, 2)
    np.testing.assert_allclose(out["explained_variance"], stds[:2] ** 2, rtol=0.05)
    np.testing.assert_allclose(out["explained_variance_ratio"], stds[:2] ** 2 / np.sum(stds**2), rtol=0.05)
    np.testing.assert_allclose(np.abs(out["components"] @ R[:, :2]), np.eye(2), atol=0.02)
    np.testing.assert_allclose(out["components"] @ out["components"].T, np.eye(2), atol=1e-12)
    np.testing.assert_allclose(out["projections"], (X - X.mean(0)) @ out["components"].T)
    # Sign convention: the largest-|.| entry of each component is positive.
    assert np.all(out["components"][np.arange(2), np.argmax(np.abs(out["components"]), axis=1)] > 0)


def test_principal_angles_known_cases():
    rng = np.random.default_rng(5)
    A = rng.standard_normal((6, 2))
    np.testing.assert_allclose(linalg.principal_angles(A, A @ np.array([[2.0, 1.0], [0.0, 3.0]])), 0, atol=1e-7)
    e = np.eye(6)
    np.testing.assert_allclose(linalg.principal_angles(e[:, :2], e[:, 2:5]), np.pi / 2, atol=1e-12)
    theta = 0.3
    B = np.stack([e[:, 0], np.cos(theta) * e[:, 1] + np.sin(theta) * e[:, 2]], axis=1)
    np.testing.assert_allclose(linalg.principal_angles(e[:, :2], B), [0.0, theta], atol=1e-12)
    tiny = 1e-9  # a small angle that arccos alone would lose
    C = np.stack([np.cos(tiny) * e[:, 0] + np.sin(tiny) * e[:, 3]], axis=1)
    assert linalg.principal_angles(e[:, :1], C)[0] == pytest.approx(tiny, rel=1e-6)


# ---------------------------------------------------------------- vectors


def test_cosine_similarity_and_neighbours():
    E = np.array([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]])
    S = linalg.cosine_similarity_matrix(E)
    np.testing.assert_allclose(np.diag(S)[:4], 1.0)
    assert S[0, 3] == pytest.approx(-1.0) and S[0, 2] == pytest.approx(0.0) and S[4, 0] == 0.0
    idx, sims = linalg.nearest_neighbours(E, 0, 2)
    assert list(idx) == [1, 2] or list(idx) == [1, 4]  # 2 and 4 both have similarity 0
    assert sims[0] == pytest.approx(2 / np.sqrt(4.01))


def test_analogy_finds_the_planted_answer():
    rng = np.random.default_rng(6)
    dim, n_letters = 32, 10
    letters = rng.standard_normal((n_letters, dim))
    case = 3.0 * rng.standard_normal(dim)  # the "lowercase" offset shared by every pair
    distractors = rng.standard_normal((20, dim))
    E = np.vstack([letters, letters + case, distractors])  # rows 0..9 'A'.., rows 10..19 'a'..
    A, a, B, b = 0, 10, 1, 11
    idx, _ = linalg.analogy(E, A, a, B, k=3)  # 'A' : 'a' :: 'B' : ?
    assert idx[0] == b
    assert not set(idx) & {A, a, B}


# ---------------------------------------------------------------- matvec eigen-solvers


def quadratic_hessian(eigs, seed=7):
    """H = R diag(eigs) Rᵀ, the Hessian of f(x) = ½ xᵀHx, and its matvec (a Hessian-vector product)."""
    R = orthogonal(len(eigs), np.random.default_rng(seed))
    H = R @ np.diag(eigs) @ R.T
    return H, (lambda v: H @ v)


def test_lanczos_recovers_top_eigenpairs_from_a_matvec():
    eigs = np.concatenate([[10.0, 7.0, 5.0], np.linspace(-1.0, 1.0, 97)])
    H, hvp = quadratic_hessian(eigs)
    vals, vecs = linalg.lanczos_top_eigs(hvp, 100, k=3, n_iter=40, seed=0)
    np.testing.assert_allclose(vals, [10.0, 7.0, 5.0], rtol=1e-8)
    np.testing.assert_allclose(H @ vecs, vecs * vals, atol=1e-6)
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(3), atol=1e-8)


def test_lanczos_largest_algebraic_not_largest_magnitude_and_full_space_exact():
    eigs = np.array([-20.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    _, hvp = quadratic_hessian(eigs, seed=8)
    vals, _ = linalg.lanczos_top_eigs(hvp, 6, k=2, n_iter=6)
    np.testing.assert_allclose(vals, [3.0, 2.0], rtol=1e-10)


def test_power_iteration_recovers_the_dominant_eigenvalue():
    eigs = np.concatenate([[9.0], np.linspace(0.0, 3.0, 49)])
    H, hvp = quadratic_hessian(eigs, seed=9)
    lam, v = linalg.power_iteration(hvp, 50, n_iter=500, tol=1e-14)
    assert lam == pytest.approx(9.0, rel=1e-10)
    np.testing.assert_allclose(H @ v, lam * v, atol=1e-5)


# ---------------------------------------------------------------- factored spectra


@pytest.mark.parametrize("m, r, n", [(24, 4, 24), (30, 5, 18), (6, 9, 6)])
def test_factored_spectrum_equals_that_of_the_formed_product(m, r, n):
    rng = np.random.default_rng(10)
    A, B = rng.standard_normal((m, r)), rng.standard_normal((r, n))
    P = A @ B
    out = linalg.factored_spectrum(A, B)
    q = min(m, n, r)
    np.testing.assert_allclose(out["singular_values"], np.linalg.svd(P, compute_uv=False)[:q], rtol=1e-10)
    if m == n:
        full = np.linalg.eigvals(P)
        full = full[np.argsort(-np.abs(full))][:q]
        np.testing.assert_allclose(np.sort_complex(out["eigenvalues"]), np.sort_complex(full), atol=1e-8)
    else:
        assert out["eigenvalues"] is None


def test_copying_score():
    assert linalg.copying_score([2.0, 1.0, 3.0]) == pytest.approx(1.0)
    assert linalg.copying_score([-2.0, -1.0]) == pytest.approx(-1.0)
    assert linalg.copying_score([1j, -1j, 1.0]) == pytest.approx(1 / 3)
    rng = np.random.default_rng(11)
    U = rng.standard_normal((16, 4))
    ev = linalg.factored_spectrum(U, U.T)["eigenvalues"]  # U Uᵀ is PSD: a pure copier
    assert linalg.copying_score(ev) == pytest.approx(1.0)


# ---------------------------------------------------------------- low rank


def test_truncate_rank_eckart_young():
    rng = np.random.default_rng(12)
    W = rng.standard_normal((12, 8))
    s = np.linalg.svd(W, compute_uv=False)
    full = linalg.truncate_rank(W, 8)
    np.testing.assert_allclose(full["W_k"], W, atol=1e-12)
    assert full["error_fro"] == pytest.approx(0.0, abs=1e-12)
    for k in (1, 3, 5):
        out = linalg.truncate_rank(W, k)
        assert np.linalg.matrix_rank(out["W_k"]) == k
        assert np.linalg.norm(W - out["W_k"]) == pytest.approx(np.sqrt(np.sum(s[k:] ** 2)), rel=1e-10)
        assert out["error_fro"] == pytest.approx(np.sqrt(np.sum(s[k:] ** 2)), rel=1e-10)
        assert out["n_params_factored"] == k * (12 + 8)
        np.testing.assert_allclose(out["left"] @ out["right"], out["W_k"], atol=1e-12)
    # Any other rank-3 matrix does worse (the "best" in Eckart-Young).
    other = rng.standard_normal((12, 3)) @ rng.standard_normal((3, 8))
    assert np.linalg.norm(W - other) > linalg.truncate_rank(W, 3)["error_fro"]
