"""Spectral metrics on matrices whose answers are known by construction."""

import json
import math

import numpy as np
import pytest

from tinylm.analysis import spectra


def orthogonal(n, rng):
    """A random n×n orthogonal matrix (QR of a Gaussian, signs fixed)."""
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    return Q * np.sign(np.diag(R))


def with_singular_values(s, m, n, seed=0):
    """W = U diag(s) Vᵀ, shape (m, n), with random orthogonal U, V."""
    rng = np.random.default_rng(seed)
    S = np.zeros((m, n))
    S[: len(s), : len(s)] = np.diag(s)
    return orthogonal(m, rng) @ S @ orthogonal(n, rng).T


def pareto(alpha, xmin, n, seed):
    """n samples with density ∝ x^-alpha on [xmin, ∞) by inverse-CDF sampling."""
    u = np.random.default_rng(seed).random(n)
    return xmin * (1 - u) ** (-1 / (alpha - 1))


# ---------------------------------------------------------------- basic metrics


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6)])
def test_metrics_of_a_matrix_with_chosen_singular_values(shape):
    s = np.array([5.0, 3.0, 2.0, 1.0, 0.5])
    W = with_singular_values(s, *shape)
    np.testing.assert_allclose(spectra.singular_values(W)[:5], s, rtol=1e-12)
    assert spectra.frobenius_norm(W) == pytest.approx(np.sqrt(np.sum(s**2)), rel=1e-12)
    assert spectra.spectral_norm(W) == pytest.approx(5.0, rel=1e-12)
    assert spectra.stable_rank(W) == pytest.approx(np.sum(s**2) / 25.0, rel=1e-12)
    p = s / s.sum()
    assert spectra.effective_rank(W) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-10)
    np.testing.assert_allclose(spectra.esd(W)[-5:], np.sort(s**2), rtol=1e-12)
    if shape == (6, 6):  # a sixth singular value of exactly zero: rank 5, condition number inf
        assert spectra.numerical_rank(W) == 5
        assert spectra.condition_number(W) == math.inf
    else:
        assert spectra.numerical_rank(W) == 5
        assert spectra.condition_number(W) == pytest.approx(10.0, rel=1e-10)


def test_effective_rank_and_stable_rank_extremes():
    # Equal singular values: every rank notion equals the dimension.
    W = with_singular_values(np.full(4, 2.0), 4, 4, seed=1)
    assert spectra.effective_rank(W) == pytest.approx(4.0, rel=1e-12)
    assert spectra.stable_rank(W) == pytest.approx(4.0, rel=1e-12)
    assert spectra.matrix_entropy(W) == pytest.approx(1.0, abs=1e-6)
    # Rank one: effective rank 1, stable rank 1, numerical rank 1.
    R1 = np.outer([1.0, 2.0, 3.0], [1.0, -1.0])
    assert spectra.effective_rank(R1) == pytest.approx(1.0, abs=1e-6)
    assert spectra.stable_rank(R1) == pytest.approx(1.0, rel=1e-12)
    assert spectra.numerical_rank(R1) == 1


# ---------------------------------------------------------------- power law


@pytest.mark.parametrize("alpha_true, seed", [(2.5, 1), (4.0, 2)])
def test_power_law_fit_recovers_a_known_exponent(alpha_true, seed):
    eigs = pareto(alpha_true, xmin=1.0, n=2000, seed=seed)
    fit = spectra.fit_power_law(eigs)
    assert fit["status"] == "success"
    assert abs(fit["alpha"] - alpha_true) < 3 * fit["sigma"]
    assert fit["sigma"] == pytest.approx((fit["alpha"] - 1) / np.sqrt(fit["n_tail"]))
    assert 1.0 <= fit["xmin"] < 2.0  # near the true xmin (the sample is Pareto from x = 1)
    assert fit["n_tail"] > 200
    assert fit["num_pl_spikes"] == np.count_nonzero(eigs >= fit["xmin"])
    assert fit["warning"] == ""


def test_power_law_fit_finds_the_tail_above_a_bulk():
    # Uniform bulk on [0.1, 1), Pareto(3) tail from 2: xmin must land near 2, not in the bulk.
    rng = np.random.default_rng(5)
    eigs = np.concatenate([rng.uniform(0.1, 1.0, 3000), pareto(3.0, 2.0, 1000, seed=6)])
    fit = spectra.fit_power_law(eigs)
    assert 1.9 <= fit["xmin"] < 3.0
    assert abs(fit["alpha"] - 3.0) < 3 * fit["sigma"]


def test_bootstrap_interval_contains_the_true_alpha():
    eigs = pareto(3.0, xmin=1.0, n=400, seed=3)
    boot = spectra.bootstrap_alpha(eigs, n_boot=60, seed=0)
    low, high = boot["alpha_ci"]
    assert low < 3.0 < high
    assert high - low < 1.5
    assert boot["alpha_ci"] == spectra.bootstrap_alpha(eigs, n_boot=60, seed=0)["alpha_ci"]  # seeded


def test_short_tail_is_flagged():
    fit = spectra.fit_power_law(pareto(3.0, 1.0, 12, seed=4))
    assert fit["n_tail"] < spectra.MIN_TAIL_FOR_TRUST
    assert "too short" in fit["warning"]
    assert "failed" in spectra.fit_power_law([0.0, 0.0, 1.0])["warning"]


# ---------------------------------------------------------------- Marchenko-Pastur


def test_mp_pure_noise_has_almost_no_spikes():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((400, 200)) / np.sqrt(200)
    mp = spectra.marchenko_pastur(spectra.esd(W), *W.shape)
    assert mp["num_spikes"] <= 1
    assert mp["sigma_mp"] == pytest.approx(1.0, abs=0.1)  # rescaled units: a pure MP bulk has σ = 1
    assert mp["Q"] == 2.0


def test_mp_counts_planted_spikes_exactly():
    rng = np.random.default_rng(1)
    m, n = 400, 200
    W = rng.standard_normal((m, n)) / np.sqrt(m)  # bulk singular values ≈ 1 ± 0.7
    for strength in (3.0, 4.0, 5.0):  # spikes far beyond the bulk edge (≈ 1.7)
        u, v = rng.standard_normal(m), rng.standard_normal(n)
        W += strength * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    mp = spectra.marchenko_pastur(spectra.esd(W), *W.shape)
    assert mp["num_spikes"] == 3
    assert mp["mp_softrank"] < 0.5


def test_mp_edges_formula():
    lo, hi = spectra.marchenko_pastur_edges(4.0, sigma=2.0)
    assert lo == pytest.approx(4 * 0.25) and hi == pytest.approx(4 * 2.25)
    x = np.linspace(lo, hi, 20001)
    pdf = spectra.marchenko_pastur_pdf(x, 4.0, sigma=2.0)
    assert np.sum(pdf) * (x[1] - x[0]) == pytest.approx(1.0, abs=1e-3)  # a density on its support


# ---------------------------------------------------------------- randomization


def test_rand_distance_small_for_random_large_for_structured():
    rng = np.random.default_rng(2)
    random_W = rng.standard_normal((100, 60))
    structured = np.outer(np.arange(1, 101), np.arange(1, 61)).astype(float)  # rank one, smooth
    structured += 0.01 * rng.standard_normal(structured.shape)
    d_random = spectra.rand_distance(random_W, seed=0)["rand_distance"]
    d_structured = spectra.rand_distance(structured, seed=0)["rand_distance"]
    assert d_random < 0.05
    assert d_structured > 0.3


def test_jensen_shannon_distance_known_values():
    assert spectra.jensen_shannon_distance([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0, abs=1e-12)
    assert spectra.jensen_shannon_distance([1, 0], [0, 1]) == pytest.approx(np.sqrt(np.log(2)))


# ---------------------------------------------------------------- everything at once


def test_matrix_metrics_is_json_and_consistent():
    rng = np.random.default_rng(3)
    W = rng.standard_t(3, size=(80, 50)) / np.sqrt(50)
    out = spectra.matrix_metrics(W, n_boot=5, seed=0)
    json.dumps(out, allow_nan=False)
    evals = np.array(out["esd"])
    assert out["log_norm"] == pytest.approx(np.log10(np.sum(W**2)))
    assert out["log_spectral_norm"] == pytest.approx(np.log10(out["spectral_norm"] ** 2))
    assert out["alpha_weighted"] == pytest.approx(out["alpha"] * np.log10(evals.max()))
    assert out["log_alpha_norm"] == pytest.approx(np.log10(np.sum(evals ** out["alpha"])))
    assert out["stable_rank"] == pytest.approx(np.sum(evals) / evals.max())
    assert out["num_pl_spikes"] == np.count_nonzero(evals >= out["xmin"])
    assert len(out["alpha_ci"]) == 2
    assert "alpha" in spectra.DIFFERENCES_FROM_WEIGHTWATCHER


def test_matrix_metrics_singular_matrix_reports_none_for_inf():
    out = spectra.matrix_metrics(np.outer([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]))
    assert out["condition_number"] is None
    json.dumps(out, allow_nan=False)


# ---------------------------------------------------------------- optional cross-check


def test_matches_weightwatcher_on_the_same_matrix():
    """Same matrix in a torch Linear layer: WW's deterministic metrics must agree to round-off."""
    torch = pytest.importorskip("torch")
    ww = pytest.importorskip("weightwatcher")
    import logging

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    rng = np.random.default_rng(0)
    W = (rng.standard_t(2.5, size=(150, 80)) / np.sqrt(80)).astype(np.float32)
    layer = torch.nn.Linear(80, 150, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(W))
    row = ww.WeightWatcher(model=torch.nn.Sequential(layer)).analyze(mp_fit=True).iloc[0]
    ours = spectra.matrix_metrics(W.astype(np.float64))
    for key in ["alpha", "xmin", "D", "sigma", "alpha_weighted", "log_norm", "log_spectral_norm",
                "log_alpha_norm", "stable_rank", "entropy"]:
        assert ours[key] == pytest.approx(float(row[key]), rel=1e-6), key
    assert ours["num_pl_spikes"] == int(row["num_pl_spikes"])
    assert ours["num_spikes"] == int(row["num_spikes"])
    # σ_mp: same objective, different polishing step (see DIFFERENCES_FROM_WEIGHTWATCHER).
    assert ours["sigma_mp"] == pytest.approx(float(row["sigma_mp"]), rel=1e-2)
    assert ours["mp_softrank"] == pytest.approx(float(row["mp_softrank"]), rel=1e-2)
