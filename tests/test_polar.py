"""The polar factor three ways (tinylm/core/polar.py), each held against the others and against its definition."""
import numpy as np
import pytest

from tinylm.core.polar import METHODS, orthogonalize, polar_eigh, polar_newton_schulz, polar_svd

SHAPES = [(384, 128), (128, 384), (128, 128), (512, 128), (7, 3), (3, 7)]


def matrix(shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_exact_ways_agree_to_1e10_and_are_orthogonal(shape):
    G = matrix(shape)
    Q_svd, Q_eigh = polar_svd(G), polar_eigh(G)
    assert Q_svd.shape == Q_eigh.shape == shape
    assert np.abs(Q_svd - Q_eigh).max() < 1e-10
    short = min(shape)
    gram = Q_svd.T @ Q_svd if shape[0] >= shape[1] else Q_svd @ Q_svd.T       # QᵀQ = I on the short side
    assert np.abs(gram - np.eye(short)).max() < 1e-12
    assert np.abs(Q_eigh.T @ Q_eigh if shape[0] >= shape[1] else Q_eigh @ Q_eigh.T).max() < 1 + 1e-10


@pytest.mark.parametrize("shape", SHAPES)
def test_the_polar_factor_is_the_nearest_orthogonal_matrix_and_G_is_Q_times_a_positive_P(shape):
    G = matrix(shape, seed=1)
    Q = polar_svd(G)
    P = Q.T @ G if shape[0] >= shape[1] else G @ Q.T        # G = Q P (tall) or P Q (wide), P symmetric ≥ 0
    assert np.allclose(P, P.T, atol=1e-10) and np.linalg.eigvalsh(P).min() > -1e-10
    best = np.linalg.norm(G - Q)
    for seed in range(5):                                   # any other orthogonal matrix is farther from G
        other = polar_svd(matrix(shape, seed=10 + seed))
        assert np.linalg.norm(G - other) > best


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_keeps_the_singular_vectors_and_lands_sigmas_in_its_band(shape):
    G = matrix(shape, seed=2)
    X = polar_newton_schulz(G, steps=5)
    s = np.linalg.svd(X, compute_uv=False)
    # after G/‖G‖_F, a σ above ~2e-3 grows into the quintic's band by step 5 (p'(0) = a = 3.4445, a⁵ ≈ 490);
    # smaller ones (a square Gaussian matrix has a few) are still on their way
    designed_for = np.linalg.svd(G / np.linalg.norm(G), compute_uv=False) > 3e-3
    assert designed_for.mean() > 0.9
    assert 0.6 < s[designed_for].min() and s.max() < 1.25   # the band, not 1 exactly
    assert np.abs(s - 1).max() > 1e-3                        # it is an approximation, not the exact factor
    # same singular vectors as G: X = U p(Σ) Vᵀ, so UᵀXV is diagonal
    U, _, Vt = np.linalg.svd(G, full_matrices=False)
    D = U.T @ X @ Vt.T
    assert np.abs(D - np.diag(np.diag(D))).max() < 1e-8
    # and much nearer the polar factor than G itself
    Q = polar_svd(G)
    assert np.linalg.norm(X - Q) < 0.35 * np.linalg.norm(G / np.linalg.norm(G) - Q)


def test_more_newton_schulz_steps_bring_small_singular_values_up():
    G = matrix((64, 32), seed=3) @ np.diag(np.logspace(0, -2, 32))      # σ spread over two decades
    smallest = [np.linalg.svd(polar_newton_schulz(G, steps=k), compute_uv=False).min() for k in (1, 2, 3, 5, 8)]
    assert smallest[:4] == sorted(smallest[:4]) and min(smallest[3:]) > 0.6     # then it stays in the band


def test_stacks_of_matrices_are_each_orthogonalized_as_alone():
    stack = np.stack([matrix((12, 5), seed=s) for s in range(3)])
    for method in METHODS:
        together = orthogonalize(stack, method)
        alone = np.stack([orthogonalize(m, method) for m in stack])
        assert np.allclose(together, alone, atol=1e-12), method


def test_float32_in_float32_out_and_close_to_float64():
    G = matrix((384, 128), seed=4)
    for method in METHODS:
        Q32 = orthogonalize(G.astype(np.float32), method)
        assert Q32.dtype == np.float32
        assert np.abs(Q32 - orthogonalize(G, method)).max() < 1e-4, method


def test_eigh_on_a_rank_deficient_matrix_is_finite_and_exact_on_its_range():
    G = matrix((40, 3), seed=5) @ matrix((3, 20), seed=6)          # rank 3 of 20
    Q = polar_eigh(G)
    assert np.isfinite(Q).all()
    s = np.linalg.svd(Q, compute_uv=False)
    assert np.allclose(s[:3], 1, atol=1e-8) and s[3:].max() < 1e-2
    assert np.allclose(Q @ G.T @ G, polar_svd(G) @ G.T @ G, atol=1e-6)     # the same on G's row space


def test_zero_matrix_gives_zero_update_not_nan():
    for dtype in (np.float64, np.float32):          # float32: training's dtype, where 1/√tiny must still fit
        for method in ("eigh", "newton_schulz"):
            with np.errstate(all="raise"):
                Q = orthogonalize(np.zeros((6, 4), dtype), method)
            assert Q.dtype == dtype and np.isfinite(Q).all() and np.abs(Q).max() < 1e-6, (dtype, method)
            # a tiny one (below float32's smallest normal number): finite, no σ above 1
            with np.errstate(over="raise", invalid="raise"):
                Q = orthogonalize(np.full((4, 8), 1e-40, dtype), method)
            assert np.isfinite(Q).all() and np.linalg.svd(Q.astype(np.float64), compute_uv=False).max() < 1.3
        assert np.isfinite(orthogonalize(np.zeros((6, 4), dtype), "svd")).all()     # some orthogonal matrix


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown orthogonalization"):
        orthogonalize(matrix((3, 3)), "qr")
