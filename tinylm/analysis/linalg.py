"""Numerical linear-algebra tools the analysis calls, independent of the model.

Sections: linear systems (ridge regression and linear probes), orthogonality
(PCA, principal angles), vectors (cosine similarity, neighbours, analogies),
eigenvalues of operators known only through a matrix-vector product (power
iteration, Lanczos), spectra of factored products (attention circuits), and
low-rank truncation.

All functions take plain NumPy arrays, compute in float64, and return plain
arrays, floats or dicts of them. Row vectors are samples / tokens:
X (n_samples, n_features), E (vocab, dim).
"""

import numpy as np


def _f64(x, ndim=None, name="array"):
    """Return x as float64, checking its number of dimensions."""
    x = np.asarray(x, dtype=np.float64)
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    return x


# ---------------------------------------------------------------- linear systems


def ridge_least_squares(X, Y, lam, *, fit_intercept=False):
    """B = argmin ‖XB + 1bᵀ - Y‖² + λ‖B‖², i.e. (XᵀX + λI) B = XᵀY.   X (n, d), Y (n,) or (n, k) -> dict.

    Returns {"coef": B (d,) or (d, k), "intercept": b (scalar or (k,))}.
    With fit_intercept the columns of X and Y are centred first, so the
    intercept is not penalized, and b = ȳ - x̄ B.

    How it is solved:
    - λ > 0: XᵀX + λI is symmetric positive definite, so the system is well
      posed. We solve it with np.linalg.solve (LAPACK LU; for an SPD matrix this
      is as stable as Cholesky, and NumPy has no triangular solver to exploit a
      Cholesky factor). When d > n we solve the n×n dual system instead:
      B = Xᵀ (XXᵀ + λI)⁻¹ Y, the same B (push-through identity), cheaper.
    - λ = 0: forming XᵀX squares the condition number and fails when X is
      rank-deficient, so we use np.linalg.lstsq on X directly (SVD), which
      gives the minimum-norm least-squares solution.
    """
    X = _f64(X, 2, "X")
    Y = _f64(Y)
    squeeze = Y.ndim == 1
    Y2 = Y[:, None] if squeeze else Y
    if Y2.shape[0] != X.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but Y has {Y2.shape[0]}")
    if lam < 0:
        raise ValueError("lam must be >= 0")
    if fit_intercept:
        x_mean, y_mean = X.mean(axis=0), Y2.mean(axis=0)
        Xc, Yc = X - x_mean, Y2 - y_mean
    else:
        x_mean, y_mean = np.zeros(X.shape[1]), np.zeros(Y2.shape[1])
        Xc, Yc = X, Y2
    n, d = Xc.shape
    if lam == 0:
        B = np.linalg.lstsq(Xc, Yc, rcond=None)[0]
    elif d <= n:
        B = np.linalg.solve(Xc.T @ Xc + lam * np.eye(d), Xc.T @ Yc)
    else:
        B = Xc.T @ np.linalg.solve(Xc @ Xc.T + lam * np.eye(n), Yc)
    intercept = y_mean - x_mean @ B
    if squeeze:
        return {"coef": B[:, 0], "intercept": float(intercept[0])}
    return {"coef": B, "intercept": intercept}


def train_test_indices(n, test_fraction=0.25, seed=0):
    """Random split of range(n) into (train, test) index arrays; test has round(n·test_fraction) ≥ 1 items."""
    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must be in (0, 1)")
    n_test = max(1, int(round(n * test_fraction)))
    if n_test >= n:
        raise ValueError(f"cannot split {n} samples with test_fraction={test_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_test:], perm[:n_test]


def r2_score(y_true, y_pred):
    """R² = 1 - Σ(y - ŷ)² / Σ(y - ȳ)², averaged over output columns.   (n,) or (n, k) -> float."""
    y_true = _f64(y_true).reshape(len(y_true), -1)
    y_pred = _f64(y_pred).reshape(len(y_pred), -1)
    ss_res = np.sum((y_true - y_pred) ** 2, axis=0)
    ss_tot = np.sum((y_true - y_true.mean(axis=0)) ** 2, axis=0)
    # A constant target is predicted perfectly or not at all (sklearn's convention).
    r2 = np.where(ss_tot > 0, 1 - ss_res / np.where(ss_tot > 0, ss_tot, 1), np.where(ss_res == 0, 1.0, 0.0))
    return float(np.mean(r2))


def probe_fit_regression(X, y, *, lam=1e-3, test_fraction=0.25, seed=0, fit_intercept=True):
    """Linear probe y ≈ XB + b by ridge on a train split; R² on train and test.   X (n, d), y (n,) or (n, k) -> dict.

    R² on the held-out split is the number to read: a probe with d features
    can fit n ≤ d training points exactly whatever they are.
    """
    X, y = _f64(X, 2, "X"), _f64(y)
    train, test = train_test_indices(len(X), test_fraction, seed)
    fit = ridge_least_squares(X[train], y[train], lam, fit_intercept=fit_intercept)
    predict = lambda idx: X[idx] @ fit["coef"] + fit["intercept"]
    return {
        "r2_train": r2_score(y[train], predict(train)),
        "r2_test": r2_score(y[test], predict(test)),
        "coef": fit["coef"], "intercept": fit["intercept"],
        "n_train": len(train), "n_test": len(test),
    }


def probe_fit_classification(X, labels, *, lam=1e-3, test_fraction=0.25, seed=0, n_classes=None, fit_intercept=True):
    """Linear probe: ridge onto one-hot targets, predict argmax of XB + b; accuracies.   X (n, d), labels (n,) ints -> dict.

    Least squares on one-hot targets is the closed-form linear classifier
    (no iterative optimizer needed). `chance` is 1/n_classes, `majority` the
    accuracy on the test split of always guessing the most frequent training label.
    """
    X = _f64(X, 2, "X")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError("labels must be a 1-D array of integers")
    if n_classes is None:
        n_classes = int(labels.max()) + 1
    onehot = np.eye(n_classes)[labels]
    train, test = train_test_indices(len(X), test_fraction, seed)
    fit = ridge_least_squares(X[train], onehot[train], lam, fit_intercept=fit_intercept)
    predict = lambda idx: np.argmax(X[idx] @ fit["coef"] + fit["intercept"], axis=1)
    majority_label = np.bincount(labels[train], minlength=n_classes).argmax()
    return {
        "accuracy_train": float(np.mean(predict(train) == labels[train])),
        "accuracy_test": float(np.mean(predict(test) == labels[test])),
        "chance": 1.0 / n_classes,
        "majority": float(np.mean(labels[test] == majority_label)),
        "coef": fit["coef"], "intercept": fit["intercept"],
        "n_train": len(train), "n_test": len(test),
    }


# ---------------------------------------------------------------- orthogonality


def pca(X, k):
    """PCA by eigh of the covariance C = X̃ᵀX̃/(n-1), X̃ = X - mean.   X (n, d) -> dict.

    Returns components (k, d) (orthonormal rows, by decreasing variance),
    explained_variance (k,) (the eigenvalues of C), explained_variance_ratio (k,)
    (over the total variance trace(C)), projections (n, k) = X̃ componentsᵀ, mean (d,).
    Sign convention: each component is flipped so that its entry of largest
    absolute value is positive (eigenvectors are only defined up to sign; this
    makes results reproducible across runs and LAPACK builds).
    """
    X = _f64(X, 2, "X")
    n, d = X.shape
    if not 1 <= k <= d:
        raise ValueError(f"k must be in [1, {d}]")
    if n < 2:
        raise ValueError("PCA needs at least 2 samples")
    mean = X.mean(axis=0)
    Xc = X - mean
    cov = Xc.T @ Xc / (n - 1)
    evals, evecs = np.linalg.eigh(cov)  # ascending; covariance is symmetric PSD
    order = np.argsort(evals)[::-1][:k]
    variances = np.clip(evals[order], 0, None)  # round-off can give tiny negatives
    components = evecs[:, order].T
    pivot = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(k), pivot])
    components *= signs[:, None]
    total = np.trace(cov)
    return {
        "components": components,
        "explained_variance": variances,
        "explained_variance_ratio": variances / total if total > 0 else np.zeros(k),
        "projections": Xc @ components.T,
        "mean": mean,
    }


def principal_angles(A, B):
    """Principal angles 0 ≤ θ₁ ≤ … ≤ θ_q ≤ π/2 between col(A) and col(B), q = min(rank).   A (n, p), B (n, r) -> (q,).

    Orthonormal bases by thin QR (A and B must have full column rank), then
    cos θ = singular values of Q_Aᵀ Q_B. arccos loses accuracy for small
    angles (cos θ ≈ 1 - θ²/2), so angles below π/4 are recomputed from their
    sines, the singular values of Q_B - Q_A Q_Aᵀ Q_B (Björck & Golub 1973).
    """
    A, B = _f64(A, 2, "A"), _f64(B, 2, "B")
    if A.shape[0] != B.shape[0]:
        raise ValueError("A and B must have the same number of rows")
    Qa = np.linalg.qr(A)[0]
    Qb = np.linalg.qr(B)[0]
    if Qa.shape[1] < Qb.shape[1]:  # make Qb the narrower basis: q = its width
        Qa, Qb = Qb, Qa
    cosines = np.clip(np.linalg.svd(Qa.T @ Qb, compute_uv=False), -1.0, 1.0)
    angles = np.arccos(cosines)  # svd gives descending cosines = ascending angles
    sines = np.clip(np.linalg.svd(Qb - Qa @ (Qa.T @ Qb), compute_uv=False), -1.0, 1.0)
    small_from_sines = np.arcsin(np.sort(sines))  # ascending
    small = angles < np.pi / 4
    angles[small] = small_from_sines[small]
    return angles


# ---------------------------------------------------------------- vectors


def cosine_similarity_matrix(A):
    """S[i, j] = aᵢ·aⱼ / (‖aᵢ‖‖aⱼ‖); a zero row has similarity 0 to everything.   A (n, d) -> (n, n)."""
    unit = _unit_rows(_f64(A, 2, "A"))
    return unit @ unit.T


def _unit_rows(E):
    """Rows of E divided by their norms (zero rows left at zero)."""
    norms = np.linalg.norm(E, axis=1)
    return E / np.where(norms > 0, norms, 1.0)[:, None]


def nearest_neighbours(E, i, k):
    """The k rows most cosine-similar to row i, excluding i.   E (n, d) -> (indices (k,), similarities (k,))."""
    E = _f64(E, 2, "E")
    unit = _unit_rows(E)
    sims = unit @ unit[i]
    sims[i] = -np.inf
    idx = np.argsort(-sims, kind="stable")[:k]
    return idx, sims[idx]


def analogy(E, a, b, c, k=1):
    """a : b :: c : ?  — rows nearest (cosine) to ê_b - ê_a + ê_c, excluding a, b, c.   E (n, d) -> (indices (k,), sims (k,)).

    This is the usual 3CosAdd solver (Mikolov et al. 2013, as gensim's
    most_similar): rows are normalized to unit length before the arithmetic,
    and the three query words are never returned, since b or c is often the
    nearest row to the target otherwise.
    """
    E = _f64(E, 2, "E")
    unit = _unit_rows(E)
    target = unit[b] - unit[a] + unit[c]
    norm = np.linalg.norm(target)
    sims = unit @ (target / norm if norm > 0 else target)
    sims[[a, b, c]] = -np.inf
    idx = np.argsort(-sims, kind="stable")[:k]
    return idx, sims[idx]


# ---------------------------------------------------------------- operators given by a matvec


def power_iteration(matvec, dim, *, n_iter=200, tol=1e-10, seed=0):
    """Dominant eigenpair of a symmetric operator by v ← Av/‖Av‖, λ = vᵀAv.   matvec: (dim,) -> (dim,); -> (λ, v (dim,)).

    Converges to the eigenvalue of largest |λ| at rate |λ₂/λ₁| per step; stops
    when successive Rayleigh quotients differ by less than tol·|λ|.
    """
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(dim)
    v /= np.linalg.norm(v)
    lam = 0.0
    for _ in range(n_iter):
        w = np.asarray(matvec(v), dtype=np.float64)
        new_lam = float(v @ w)  # Rayleigh quotient of the current unit vector
        norm = np.linalg.norm(w)
        if norm == 0:
            return 0.0, v
        v = w / norm
        if abs(new_lam - lam) <= tol * max(abs(new_lam), 1e-300):
            lam = new_lam
            break
        lam = new_lam
    return lam, v


def lanczos_top_eigs(matvec, dim, k, n_iter=None, seed=0):
    """Top-k (largest algebraic) eigenpairs of a symmetric operator by Lanczos with full reorthogonalization.   -> (vals (k,) desc, vecs (dim, k)).

    Builds an orthonormal Krylov basis Q (dim, m), m = n_iter (default
    min(dim, 2k + 20)), in which A is tridiagonal T = QᵀAQ; the Ritz values
    (eigenvalues of T) approximate the extreme eigenvalues of A, the Ritz
    vectors Q y their eigenvectors. Every new vector is orthogonalized against
    all previous ones twice ("twice is enough"): without it, round-off makes
    converged eigenvalues reappear as spurious copies. With m = dim the answer
    is exact up to round-off.
    """
    if n_iter is None:
        n_iter = min(dim, 2 * k + 20)
    n_iter = min(n_iter, dim)
    if not 1 <= k <= n_iter:
        raise ValueError(f"need 1 <= k <= n_iter (k={k}, n_iter={n_iter})")
    rng = np.random.default_rng(seed)
    Q = np.zeros((dim, n_iter))
    alphas, betas = np.zeros(n_iter), np.zeros(n_iter)
    q = rng.standard_normal(dim)
    Q[:, 0] = q / np.linalg.norm(q)
    m = n_iter
    for j in range(n_iter):
        w = np.asarray(matvec(Q[:, j]), dtype=np.float64).copy()
        alphas[j] = Q[:, j] @ w
        for _ in range(2):
            w -= Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
        if j == n_iter - 1:
            break
        beta = np.linalg.norm(w)
        scale = max(np.abs(alphas[: j + 1]).max(), 1e-300)
        if beta <= 1e-12 * scale:
            # Invariant subspace found: T's eigenvalues are exact eigenvalues of A.
            m = j + 1
            break
        betas[j] = beta
        Q[:, j + 1] = w / beta
    if k > m:
        raise ValueError(f"Krylov space has dimension {m} < k={k} (start vector hit an invariant subspace)")
    T = np.diag(alphas[:m]) + np.diag(betas[: m - 1], 1) + np.diag(betas[: m - 1], -1)
    theta, Y = np.linalg.eigh(T)
    order = np.argsort(theta)[::-1][:k]
    return theta[order], Q[:, :m] @ Y[:, order]


# ---------------------------------------------------------------- factored products


def factored_spectrum(A, B):
    """Singular values and nonzero eigenvalues of P = A B without forming P.   A (m, r), B (r, n) -> dict.

    Thin QR A = Q_A R_A and Bᵀ = Q_B R_B give P = Q_A (R_A R_Bᵀ) Q_Bᵀ with
    orthonormal columns outside, so P's nonzero singular values are those of
    the small core R_A R_Bᵀ (at most r × r). When P is square (m = n), its
    nonzero eigenvalues are those of B A (r × r): ABx = λx ⇒ BA(Bx) = λ(Bx).
    Returns singular_values (descending, min(m, n, r) of them, zeros included
    when the factors are rank-deficient) and eigenvalues (complex, by
    decreasing modulus, min(r, n) of them, or None when m ≠ n). Use it per head for
    the attention circuits W_QK = W_Qᵀ W_K and W_OV = W_O W_V.
    """
    A, B = _f64(A, 2, "A"), _f64(B, 2, "B")
    if A.shape[1] != B.shape[0]:
        raise ValueError(f"inner dimensions differ: {A.shape} @ {B.shape}")
    Ra = np.linalg.qr(A)[1]
    Rb = np.linalg.qr(B.T)[1]
    singular = np.linalg.svd(Ra @ Rb.T, compute_uv=False)
    singular = singular[: min(A.shape[0], B.shape[1], A.shape[1])]
    eigenvalues = None
    if A.shape[0] == B.shape[1]:
        ev = np.linalg.eigvals(B @ A)
        # When r > n, BA (r, r) has r - n extra zero eigenvalues that AB lacks: drop them.
        eigenvalues = ev[np.argsort(-np.abs(ev), kind="stable")][: A.shape[0]]
    return {"singular_values": singular, "eigenvalues": eigenvalues}


def copying_score(eigenvalues):
    """Σ Re λᵢ / Σ |λᵢ| ∈ [-1, 1]; near 1 when the map mostly copies (positive real eigenvalues).   (k,) complex -> float."""
    ev = np.asarray(eigenvalues, dtype=np.complex128)
    total = np.sum(np.abs(ev))
    if total == 0:
        return 0.0
    return float(np.sum(ev.real) / total)


# ---------------------------------------------------------------- low rank


def truncate_rank(W, k):
    """Best rank-k approximation W_k = U_k diag(s_k) V_kᵀ (Eckart–Young).   W (m, n) -> dict.

    Returns W_k (m, n), the factors left = U_k diag(s_k) (m, k) and
    right = V_kᵀ (k, n) (W_k = left @ right), the error
    ‖W - W_k‖_F = sqrt(Σ_{i>k} σᵢ²) and relative error, and the parameter
    counts: factored k(m + n) against dense m n.
    """
    W = _f64(W, 2, "W")
    m, n = W.shape
    if not 0 <= k <= min(m, n):
        raise ValueError(f"k must be in [0, {min(m, n)}]")
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    left = U[:, :k] * s[:k]
    right = Vt[:k]
    error = float(np.sqrt(np.sum(s[k:] ** 2)))
    total = float(np.sqrt(np.sum(s**2)))
    return {
        "W_k": left @ right,
        "left": left,
        "right": right,
        "singular_values": s,
        "error_fro": error,
        "relative_error": error / total if total > 0 else 0.0,
        "n_params_factored": int(k * (m + n)),
        "n_params_dense": int(m * n),
    }
