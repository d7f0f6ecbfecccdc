"""Low-rank compression: truncate every block linear weight to rank k by SVD and measure the loss."""
import math

import numpy as np
from tqdm import tqdm

from ..model import forward
from .weights import linear_weight_names

# Fractions of each matrix's full rank min(out, in) to try.
DEFAULT_FRACTIONS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)


def mean_loss(params, config, batches):
    """Mean cross-entropy over fixed batches [(x (B,T), y (B,T))]."""
    return float(np.mean([forward(params, config, x, y, for_backward=False)[1] for x, y in batches]))


def svd_all(params, names, progress=False):
    """name -> (U, s, Vt) of each weight, in float64, computed once for every rank tried."""
    return {n: np.linalg.svd(np.asarray(params[n], dtype=np.float64), full_matrices=False)
            for n in tqdm(names, desc="lowrank SVDs", disable=not progress, leave=False)}


def truncated_params(params, factors, fraction):
    """params with each factored weight W replaced by U_k diag(s_k) V_kᵀ, k = ceil(fraction·min(out, in)).   -> (params, kept, dense)

    kept counts the parameters of the factored form, min(k(m + n), m n) per matrix (a factorization
    that is not smaller than the dense matrix would be stored dense); dense is Σ m n.
    """
    new, kept, dense = dict(params), 0, 0
    for n, (U, s, Vt) in factors.items():
        m, d = params[n].shape
        k = max(1, math.ceil(fraction * len(s)))
        # Eckart-Young: the best rank-k approximation in Frobenius and spectral norm (cf. linalg.truncate_rank).
        new[n] = ((U[:, :k] * s[:k]) @ Vt[:k]).astype(params[n].dtype)
        kept += min(k * (m + d), m * d)
        dense += m * d
    return new, kept, dense


def rank_sweep(params, config, batches, fractions=DEFAULT_FRACTIONS, tolerance=0.01, progress=True):
    """Loss against the fraction of block-linear parameters kept; the smallest rank fraction within tolerance.   -> dict"""
    names = linear_weight_names(config)
    factors = svd_all(params, names, progress)
    base = mean_loss(params, config, batches)
    rows = []
    for f in tqdm(sorted(fractions), desc="lowrank", disable=not progress, leave=False):
        p, kept, dense = truncated_params(params, factors, f)
        loss = mean_loss(p, config, batches)
        rows.append({"rank_fraction": f, "param_fraction": kept / dense, "loss": loss,
                     "relative_increase": (loss - base) / base})
    ok = [r for r in rows if r["relative_increase"] < tolerance]
    best = min(ok, key=lambda r: r["rank_fraction"]) if ok else None
    return {"base_loss": base, "tolerance": tolerance, "matrices": names, "curve": rows,
            "smallest_within_tolerance": best,
            "n_tokens": int(sum(x.size for x, _ in batches))}
