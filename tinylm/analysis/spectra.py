"""Spectral metrics of one weight matrix W (out, in): norms, ranks, the ESD,
its power-law tail, the Marchenko-Pastur bulk, and WeightWatcher's metrics.

Everything takes a plain NumPy array, works in float64, and returns floats,
ints, arrays or (for `matrix_metrics`) a JSON-serializable dict.

Conventions
-----------
- Singular values are returned in descending order.
- The ESD (empirical spectral density) is the list of the min(out, in)
  squared singular values of W, in ascending order. These are the eigenvalues
  of WᵀW (or WWᵀ, the smaller Gram matrix); the larger Gram matrix only adds
  exact zeros. As in WeightWatcher they are NOT divided by N.
- WeightWatcher's definitions were read from weightwatcher 0.7.7 (PyPI; the
  same code as CalculatedContent/WeightWatcher on GitHub), files
  weightwatcher/weightwatcher.py, weightwatcher/WW_powerlaw.py and
  weightwatcher/RMT_Util.py. Where this module matches them, the docstring
  names the function it matches; where it differs on purpose, see
  DIFFERENCES_FROM_WEIGHTWATCHER below.
"""

import math

import numpy as np

DIFFERENCES_FROM_WEIGHTWATCHER = """\
Deliberate differences from WeightWatcher 0.7.7 (default settings of analyze()):

1. Small ESDs. WW's WWFit switches to a different estimator when fewer than
   20 eigenvalues are fitted (a bias-corrected MLE, alpha = 1 + (n-1)/S, with
   xmin chosen by D - 0.868/sqrt(n) over tails of at least 8 points). We always
   use the standard estimator (alpha = 1 + n/S, xmin by smallest KS distance)
   and instead set `warning` when the chosen tail has fewer than
   MIN_TAIL_FOR_TRUST (= 20) eigenvalues.
2. `warning`. WW's `warning` field is "over-trained" (alpha < 2) or
   "under-trained" (alpha > 6). Ours is about the trustworthiness of the fit
   (too-short tail, failed fit); WW's label is returned as `ww_warning`.
3. MP sigma fit. WW fits sigma_mp with scipy.optimize.brute over a grid
   followed by a Nelder-Mead (fmin) polish, on a sklearn linear-kernel KDE.
   We compute the same KDE (triangular kernel, bandwidth 0.1) and the same
   residual on the same grid, but polish with a golden-section search around
   the best grid point, in NumPy only. sigma_mp can differ in the last digits,
   and rarely by one grid step when the residual is flat.
4. rand_distance. WW shuffles with the global np.random state (unseeded); we
   use a seeded np.random.default_rng(seed) permutation. For matrices with
   fewer than 100 singular values WW additionally builds 5 shuffled replicas
   for its randomized-ESD plots; the distance itself uses one replica, as here.
5. Non-finite numbers. In `matrix_metrics` NaN and +-inf (e.g. the condition
   number of a singular matrix) are reported as None so the dict is strict
   JSON; WW leaves them as floats (or -1 on failure).
6. WW applies its metrics to the ESD after filtering by min_evals/max_evals
   and (for conv layers) combining slices; here one dense matrix is analysed,
   so none of that applies.
"""

# Eigenvalues at or below this are treated as zero when fitting the tail;
# this is WW's EVALS_THRESH (constants.py) for float64 runs.
EVALS_THRESH = 1e-5
# WW's EPSILON (constants.py), used in its matrix entropy.
WW_EPSILON = 1e-10
# Below this many tail eigenvalues the alpha estimate is not to be trusted:
# its relative standard error 1/sqrt(n) exceeds ~22%, and WW itself switches
# to a small-sample estimator below 20 points (WW_powerlaw.SMALL_N_CUTOFF).
MIN_TAIL_FOR_TRUST = 20
# WW's thresholds for its over/under-trained labels (constants.py).
WW_OVER_TRAINED_THRESH = 2.0
WW_UNDER_TRAINED_THRESH = 6.0


def _as_matrix(W):
    """Return W as a 2-D float64 array, or raise ValueError."""
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2 or W.size == 0:
        raise ValueError(f"expected a non-empty 2-D matrix, got shape {W.shape}")
    return W


# ---------------------------------------------------------------- basic metrics


def singular_values(W):
    """σ₁ ≥ σ₂ ≥ … ≥ σ_r of W.   W (m, n) -> (min(m, n),), descending."""
    return np.linalg.svd(_as_matrix(W), compute_uv=False)


def frobenius_norm(W):
    """‖W‖_F = sqrt(Σᵢⱼ Wᵢⱼ²) = sqrt(Σ σᵢ²).   W (m, n) -> float."""
    return float(np.linalg.norm(_as_matrix(W), "fro"))


def spectral_norm(W):
    """‖W‖₂ = σ_max, the largest stretch factor.   W (m, n) -> float."""
    return float(singular_values(W)[0])


def stable_rank(W):
    """‖W‖_F² / ‖W‖₂² = Σ σᵢ² / σ₁² (0 for the zero matrix).   W (m, n) -> float."""
    s = singular_values(W)
    if s[0] == 0:
        return 0.0
    return float(np.sum(s**2) / s[0] ** 2)


def effective_rank(W):
    """Roy & Vetterli: exp(H(p)), pᵢ = σᵢ / Σσⱼ, H = -Σ pᵢ ln pᵢ.   W (m, n) -> float."""
    return _effective_rank_from_sv(singular_values(W))


def _effective_rank_from_sv(s):
    """effective_rank given the singular values."""
    total = s.sum()
    if total == 0:
        return 0.0
    p = s / total
    p = p[p > 0]  # 0 ln 0 = 0 by continuity
    return float(np.exp(-np.sum(p * np.log(p))))


def condition_number(W):
    """σ_max / σ_min over the min(m, n) singular values; inf if W is numerically rank-deficient.   W (m, n) -> float.

    A singular value below numerical_rank's tolerance is round-off, not a
    stretch factor, so the ratio (~1e16 or more) would be noise: we return inf.
    """
    W = _as_matrix(W)
    return _condition_from_sv(singular_values(W), W.shape)


def _condition_from_sv(s, shape):
    """condition_number given W's singular values s (descending) and shape."""
    if _rank_from_sv(s, shape) < len(s):
        return math.inf
    return float(s[0] / s[-1])


def numerical_rank(W, tol=None):
    """#{σᵢ > tol}, tol = σ_max·max(m, n)·eps(float64) as np.linalg.matrix_rank's default.   W (m, n) -> int."""
    W = _as_matrix(W)
    return _rank_from_sv(singular_values(W), W.shape, tol)


def _rank_from_sv(s, shape, tol=None):
    """numerical_rank given W's singular values s (descending) and shape (one SVD serves every metric)."""
    if tol is None:
        tol = s[0] * max(shape) * np.finfo(np.float64).eps
    return int(np.count_nonzero(s > tol))


def esd(W):
    """Eigenvalues of WᵀW that can be nonzero: σᵢ², not divided by N.   W (m, n) -> (min(m, n),), ascending."""
    return np.sort(singular_values(W) ** 2)


def matrix_entropy(W):
    """WW matrix entropy: -Σ pᵢ ln pᵢ / ln(rank), pᵢ = σᵢ²/Σσⱼ² + 1e-10, rank + 1e-10.   W (m, n) -> float.

    Matches RMT_Util.matrix_entropy (with its EPSILON and its rank =
    matrix_rank(σ, N), the numpy default tolerance with N = max(m, n)). It is
    1 for a matrix whose singular values are all equal and falls towards 0
    as the spectrum concentrates on a few directions.
    """
    W = _as_matrix(W)
    return _entropy_from_sv(singular_values(W), W.shape)


def _entropy_from_sv(s, shape):
    """matrix_entropy given W's singular values s (descending) and shape."""
    rank = _rank_from_sv(s, shape) + WW_EPSILON
    p = s**2 / np.sum(s**2) + WW_EPSILON
    return float(-np.sum(p * np.log(p)) / np.log(rank))


# ---------------------------------------------------------------- power law


def _ks_distances(data, alphas, n_tail, chunk=256):
    """D for every candidate xmin = data[i]: max over the tail j ≥ i of |(1 - (x_j/x_i)^(1-α_i)) - (j-i)/n_i|.

    Vectorized over blocks of `chunk` candidates (an (i, j) grid with j < i masked out), which is the
    same arithmetic as a loop over i but ~50x faster for a few hundred eigenvalues; the bootstrap
    refits the tail hundreds of times. Candidates without a valid exponent (α ≤ 1 or not finite)
    keep D = 1, so they are never chosen.
    """
    N = len(data)
    Ds = np.ones(N - 1)
    j = np.arange(N)
    for start in range(0, N - 1, chunk):
        i = np.arange(start, min(start + chunk, N - 1))
        a = alphas[i]
        valid = np.isfinite(a) & (a > 1)
        if not valid.any():
            continue
        i, a, n = i[valid], a[valid], n_tail[i[valid]]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            model_cdf = 1.0 - (data[None, :] / data[i, None]) ** (1.0 - a[:, None])
            gap = np.abs(model_cdf - (j[None, :] - i[:, None]) / n[:, None])
        gap = np.where(j[None, :] >= i[:, None], gap, -np.inf)
        Ds[i] = gap.max(axis=1)
    return Ds


def fit_power_law(eigs, *, thresh=EVALS_THRESH, min_tail_for_trust=MIN_TAIL_FOR_TRUST):
    """Fit p(λ) ∝ λ^-α for λ ≥ xmin by continuous MLE, xmin by smallest KS distance.   eigs (n,) -> dict.

    Clauset, Shalizi & Newman (2009), as WW_powerlaw.WWFit.fit_power_law_standard:
    the eigenvalues > `thresh` are sorted; every one of them except the largest
    is tried as xmin; for each, with the n points x ≥ xmin,
        α̂ = 1 + n / Σ ln(x / xmin),
        D  = max |(1 - (x/xmin)^(1-α̂)) - i/n|,  i = 0..n-1 over the sorted tail
    (WW's one-sided empirical CDF i/n); the xmin with the smallest D wins.
    Standard error σ = (α̂ - 1)/√n.

    Returns alpha, xmin, xmax (largest eigenvalue), D, sigma (standard error),
    n_tail, num_pl_spikes (#eigenvalues ≥ xmin, as WW), status ("success" or
    "failed"), warning ("" or why the fit is not to be trusted) and
    ww_warning (WW's "over-trained" / "under-trained" / "" label).
    """
    eigs = np.asarray(eigs, dtype=np.float64).ravel()
    data = np.sort(eigs[eigs > thresh])
    out = {
        "alpha": math.nan, "xmin": math.nan, "xmax": math.nan, "D": math.nan,
        "sigma": math.nan, "n_tail": 0, "num_pl_spikes": 0, "status": "failed",
        "warning": "", "ww_warning": "",
    }
    N = len(data)
    if N < 2:
        out["warning"] = f"power-law fit failed: {N} eigenvalue(s) above {thresh:g}"
        return out

    log_data = np.log(data)
    # Tail sums Σ_{j≥i} ln x_j for every start i, in one pass (reverse cumulative sum).
    tail_log_sums = np.cumsum(log_data[::-1])[::-1][:-1]
    n_tail = N - np.arange(N - 1)  # points in the tail that starts at i
    denom = tail_log_sums - n_tail * log_data[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + n_tail / denom
    Ds = _ks_distances(data, alphas, n_tail)
    best = int(np.argmin(Ds))
    alpha = float(alphas[best])
    if not np.isfinite(alpha) or alpha <= 1:
        out["warning"] = "power-law fit failed: no tail with a valid exponent"
        return out

    xmin = float(data[best])
    n = int(n_tail[best])
    out.update(
        alpha=alpha, xmin=xmin, xmax=float(data[-1]), D=float(Ds[best]),
        sigma=float((alpha - 1.0) / np.sqrt(n)), n_tail=n,
        num_pl_spikes=int(np.count_nonzero(eigs >= xmin)), status="success",
    )
    if n < min_tail_for_trust:
        out["warning"] = (f"tail too short to trust: {n} eigenvalues >= xmin "
                          f"(fewer than {min_tail_for_trust})")
    if alpha < WW_OVER_TRAINED_THRESH:
        out["ww_warning"] = "over-trained"
    elif alpha > WW_UNDER_TRAINED_THRESH:
        out["ww_warning"] = "under-trained"
    return out


def bootstrap_alpha(eigs, *, n_boot=200, seed=0, confidence=0.95, thresh=EVALS_THRESH):
    """Percentile bootstrap CI for α: resample eigs with replacement, refit (xmin too).   eigs (n,) -> dict.

    Returns alpha_ci (low, high), alpha_boot_mean, alpha_boot_std, n_boot,
    n_boot_failed. Refitting xmin in every resample makes the interval include
    the uncertainty of the xmin choice, which the analytic σ does not.
    """
    eigs = np.asarray(eigs, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    alphas = []
    failed = 0
    for _ in range(int(n_boot)):
        sample = rng.choice(eigs, size=len(eigs), replace=True)
        a = fit_power_law(sample, thresh=thresh)["alpha"]
        if np.isfinite(a):
            alphas.append(a)
        else:
            failed += 1
    if not alphas:
        return {"alpha_ci": [math.nan, math.nan], "alpha_boot_mean": math.nan,
                "alpha_boot_std": math.nan, "n_boot": int(n_boot), "n_boot_failed": failed}
    alphas = np.asarray(alphas)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(alphas, [tail, 1.0 - tail])
    return {"alpha_ci": [float(low), float(high)], "alpha_boot_mean": float(alphas.mean()),
            "alpha_boot_std": float(alphas.std(ddof=1)) if len(alphas) > 1 else 0.0,
            "n_boot": int(n_boot), "n_boot_failed": failed}


# ---------------------------------------------------------------- Marchenko-Pastur


def marchenko_pastur_edges(Q, sigma=1.0):
    """MP bulk edges λ± = σ²(1 ± 1/√Q)², Q = N/M ≥ 1 (RMT_Util.calc_lambda_plus/minus).   -> (λ₋, λ₊)."""
    r = 1.0 / np.sqrt(Q)
    return float((sigma * (1 - r)) ** 2), float((sigma * (1 + r)) ** 2)


def marchenko_pastur_pdf(x, Q, sigma=1.0):
    """MP density Q/(2πσ²x)·sqrt((λ₊-x)(x-λ₋)) on [λ₋, λ₊], 0 elsewhere.   x (k,) -> (k,)."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = marchenko_pastur_edges(Q, sigma)
    inside = (x > lo) & (x < hi) & (x > 0)
    out = np.zeros_like(x)
    xi = x[inside]
    out[inside] = Q / (2 * np.pi * sigma**2 * xi) * np.sqrt((hi - xi) * (xi - lo))
    return out


def _quarter_circle_pdf(x, sigma=1.0):
    """Quarter-circle law (Q = 1, on singular values) as WW writes it: sqrt(4 - x²)/(πσ²), 0 outside."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(np.abs(x) < 2, np.sqrt(np.clip(4 - x**2, 0, None)) / (np.pi * sigma**2), 0.0)


def _triangular_kde(samples, grid, bandwidth):
    """Density of a linear-kernel KDE: (1/(n h)) Σ max(0, 1 - |x - xᵢ|/h) (sklearn kernel='linear')."""
    out = np.zeros_like(grid)
    # Chunk over samples so memory stays ~ len(grid) * 256 floats.
    for start in range(0, len(samples), 256):
        chunk = samples[start:start + 256]
        out += np.clip(1.0 - np.abs(grid[:, None] - chunk[None, :]) / bandwidth, 0, None).sum(axis=1)
    return out / (len(samples) * bandwidth)


def _mp_residual(sigma, xde, yde, Q):
    """WW's resid_mp with allresid=False: Σ (MP(x; σ) - KDE(x))², 1000 per point when the fit is implausible."""
    if Q == 1:
        resid = _quarter_circle_pdf(xde, sigma) - yde
    else:
        lo, hi = marchenko_pastur_edges(Q, sigma)
        x_peak = xde[np.argmax(yde)]
        if hi < x_peak or hi > xde.max() or lo > x_peak:
            resid = np.full(len(yde), 1000.0)
        else:
            resid = marchenko_pastur_pdf(xde, Q, sigma) - yde
    # WW pads the residual with zeros for the grid points it dropped: they add nothing.
    return float(np.sum(resid**2))


def _fit_mp_sigma(x, Q, bandwidth=0.1):
    """σ minimizing the squared gap between the MP law and a KDE of the rescaled ESD (RMT_Util.fit_density_with_range)."""
    to_fit = np.sqrt(x) if Q == 1 else x
    # Grid from the σ that would put the bulk edge at the largest eigenvalue (RMT_Util.calc_sigma).
    sigma0 = np.sqrt(np.max(x)) / (1.0 + 1.0 / np.sqrt(Q))
    xde = np.linspace(0.0, np.max(to_fit) + 0.5, 1000)
    yde = _triangular_kde(to_fit, xde, bandwidth)
    keep = yde > 0.01  # WW drops grid points where the KDE is almost zero
    xde, yde = xde[keep], yde[keep]
    step = 0.01 * sigma0
    grid = np.arange(0.05 * sigma0, 2.0 * sigma0, step)
    costs = np.array([_mp_residual(s, xde, yde, Q) for s in grid])
    best = int(np.argmin(costs))
    # Polish (WW: Nelder-Mead) with a golden-section search in the neighbouring grid cells.
    a, b = grid[best] - step, grid[best] + step
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = _mp_residual(c, xde, yde, Q), _mp_residual(d, xde, yde, Q)
    for _ in range(40):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = _mp_residual(c, xde, yde, Q)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = _mp_residual(d, xde, yde, Q)
    polished = (a + b) / 2
    if _mp_residual(polished, xde, yde, Q) <= costs[best]:
        return float(polished)
    return float(grid[best])


def marchenko_pastur(eigs, n_rows, n_cols, *, sigma=None, bandwidth=0.1):
    """MP fit of an ESD as WW's mp_fit: bulk edges, spikes beyond edge + Tracy-Widom margin, softrank.   eigs (k,) -> dict.

    With N = max(n_rows, n_cols), M = min(...), Q = N/M, the eigenvalues are
    first rescaled by W_scale² = k / Σλ (so their mean is 1, WW's rescale=True).
    σ_mp is fitted to the bulk (see _fit_mp_sigma) unless given (in rescaled
    units). Then bulk_max = σ²(1 + 1/√Q)², bulk_min = σ²(1 - 1/√Q)²,
    TW = Q^(-1/2) bulk_max^(2/3) M^(-2/3), and
        num_spikes  = #{λ > bulk_max + √TW}   (rescaled units),
        mp_softrank = bulk_max / λ_max.
    bulk_min/bulk_max are returned in the original (unscaled) units, as WW does.
    """
    eigs = np.asarray(eigs, dtype=np.float64).ravel()
    N, M = max(n_rows, n_cols), min(n_rows, n_cols)
    Q = N / M
    W_scale = np.sqrt(len(eigs) / np.sum(eigs))
    x = W_scale**2 * eigs
    if sigma is None:
        sigma = _fit_mp_sigma(x, Q, bandwidth)
    bulk_min, bulk_max = marchenko_pastur_edges(Q, sigma)
    tracy_widom = 1.0 / np.sqrt(Q) * bulk_max ** (2 / 3) * M ** (-2 / 3)
    bulk_max_tw = bulk_max + np.sqrt(tracy_widom)
    return {
        "Q": float(Q), "sigma_mp": float(sigma), "W_scale": float(W_scale),
        "bulk_min": float(bulk_min / W_scale**2), "bulk_max": float(bulk_max / W_scale**2),
        "bulk_max_tw": float(bulk_max_tw / W_scale**2),
        "num_spikes": int(np.count_nonzero(x > bulk_max_tw)),
        "mp_softrank": float(bulk_max / np.max(x)),
    }


# ---------------------------------------------------------------- randomization


def jensen_shannon_distance(p, q):
    """sqrt(JS divergence) in nats of p and q normalized to sum 1 (RMT_Util.jensen_shannon_distance).   p, q (k,) -> float."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    m = (p + q) / 2

    def kl(a, b):  # scipy.stats.entropy(a, b): normalizes both, 0·ln(0/b) = 0
        a, b = a / a.sum(), b / b.sum()
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / b[nz])))

    return float(np.sqrt(max((kl(p, m) + kl(q, m)) / 2, 0.0)))


def rand_distance(W, *, seed=0, evals=None):
    """WW rand_distance: JS distance between the sorted ESD of W and of W with its entries shuffled.   W (m, n) -> dict.

    As weightwatcher.apply_random_esd: the two sorted eigenvalue vectors are
    themselves treated as the probability vectors (each divided by its sum;
    both sums equal ‖W‖_F², which shuffling preserves). Near 0 when W looks
    like an i.i.d. random matrix; up to sqrt(ln 2) ≈ 0.83 when its spectrum is
    far from that of its shuffle. Also returns ww_softrank = max(λ_rand)/max(λ)
    and max_rand_eval. evals: esd(W) when already known (one SVD fewer).
    """
    W = _as_matrix(W)
    rng = np.random.default_rng(seed)
    W_rand = rng.permutation(W.ravel()).reshape(W.shape)
    evals = esd(W) if evals is None else evals
    rand_evals = esd(W_rand)
    return {
        "rand_distance": jensen_shannon_distance(evals, rand_evals),
        "ww_softrank": float(rand_evals.max() / evals.max()),
        "max_rand_eval": float(rand_evals.max()),
    }


# ---------------------------------------------------------------- everything


def _json_number(value):
    """float/int for JSON; NaN and ±inf become None (strict JSON has neither)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def _jsonable(obj):
    """Recursively turn NumPy scalars/arrays into JSON-friendly Python values."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, str) or obj is None:
        return obj
    return _json_number(obj)


def matrix_metrics(W, *, n_boot=0, seed=0):
    """All spectral metrics of one matrix, JSON-serializable.   W (out, in) -> dict.

    Keys: shape, singular_values (descending), esd (ascending σ²),
    frobenius_norm, spectral_norm, stable_rank, effective_rank,
    condition_number, numerical_rank; power-law fit: alpha, xmin, xmax, D,
    sigma (= alpha_stderr), n_tail, num_pl_spikes, status, warning, ww_warning;
    WW metrics: alpha_weighted = α·log10 λ_max, log_norm = log10 ‖W‖_F²,
    log_spectral_norm = log10 λ_max = log10 ‖W‖₂², log_alpha_norm =
    log10 Σ λᵢ^α, entropy (WW matrix entropy); MP: Q, sigma_mp, W_scale,
    bulk_min, bulk_max, bulk_max_tw, num_spikes, mp_softrank; rand_distance,
    ww_softrank, max_rand_eval; with n_boot > 0 also alpha_ci and friends.
    NaN / inf are reported as None.
    """
    W = _as_matrix(W)
    s = singular_values(W)
    evals = np.sort(s**2)
    fro2 = float(np.sum(evals))
    lam_max = float(evals[-1])
    out = {
        "shape": list(W.shape),
        "singular_values": s,
        "esd": evals,
        "frobenius_norm": np.sqrt(fro2),
        "spectral_norm": s[0],
        "stable_rank": float(fro2 / s[0] ** 2) if s[0] > 0 else 0.0,
        "effective_rank": _effective_rank_from_sv(s),
        "condition_number": _condition_from_sv(s, W.shape),
        "numerical_rank": _rank_from_sv(s, W.shape),
    }
    fit = fit_power_law(evals)
    out.update(fit)
    out["alpha_stderr"] = fit["sigma"]
    alpha = fit["alpha"]
    # WW's norm metrics (weightwatcher.apply_norm_metrics); all logs are base 10.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out["log_norm"] = np.log10(fro2)
        out["log_spectral_norm"] = np.log10(lam_max)
        out["alpha_weighted"] = alpha * np.log10(lam_max)
        out["log_alpha_norm"] = np.log10(np.sum(evals**alpha)) if np.isfinite(alpha) else math.nan
    out["entropy"] = _entropy_from_sv(s, W.shape) if lam_max > 0 else math.nan
    if lam_max > 0:
        out.update(marchenko_pastur(evals, *W.shape))
        out.update(rand_distance(W, seed=seed, evals=evals))
    if n_boot > 0:
        out.update(bootstrap_alpha(evals, n_boot=n_boot, seed=seed))
    return _jsonable(out)
