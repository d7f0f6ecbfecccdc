"""Low-rank compression: truncate every block linear weight to rank k, by plain SVD and by whitened SVD
(tinylm.compress: the best rank k for each layer's output on calibration text), and measure the loss;
sample from a few of the compressed models."""
import math

import numpy as np
from tqdm import tqdm

from tinylm.fast.arch import decoder, fast_model
from tinylm.analysis.weights import linear_weight_names
from tinylm.core.sampling import NonFiniteLogits, sample_next
from tinylm.fast.parallel import blas_threads
from tinylm.lowrank import compress as C

# Fractions of each matrix's full rank min(out, in) to try.
DEFAULT_FRACTIONS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)


def mean_loss(params, config, batches):
    """Mean cross-entropy over fixed batches [(x (B,T), y (B,T))]."""
    forward = fast_model(config).forward
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


def whitened_all(params, config, calib, progress=False):
    """layer name -> (A, B, s), the whitened factors of every rank (compress.whitened_factors), from calibration windows."""
    grams = C.collect_grams(params, config, calib, progress)
    return {name: C.whitened_factors(params[name + ".weight"], grams[name]) for name in C.layer_names(config)}


def whitened_params(params, config, factors, fraction):
    """params with every block linear layer replaced by its whitened factors of rank ⌈fraction · full rank⌉."""
    return C.truncate(params, factors, C.ranks_for(config, ("fraction", fraction)))


def rank_sweep(params, config, batches, fractions=DEFAULT_FRACTIONS, tolerance=0.01, progress=True, calib=None):
    """Loss against the fraction of block-linear parameters kept; the smallest rank fraction within tolerance.   -> dict

    With calibration windows calib (n, T), each row also has the whitened model's loss at the same ranks
    ("whitened_loss", "whitened_relative_increase"), and "whitened_smallest_within_tolerance" is given.
    """
    names = linear_weight_names(config)
    factors = svd_all(params, names, progress)
    white = whitened_all(params, config, calib, progress) if calib is not None else None
    base = mean_loss(params, config, batches)
    rows = []
    for f in tqdm(sorted(fractions), desc="lowrank", disable=not progress, leave=False):
        p, kept, dense = truncated_params(params, factors, f)
        loss = mean_loss(p, config, batches)
        row = {"rank_fraction": f, "param_fraction": kept / dense, "loss": loss, "relative_increase": (loss - base) / base}
        if white is not None:
            w_loss = mean_loss(whitened_params(params, config, white, f), config, batches)
            row.update(whitened_loss=w_loss, whitened_relative_increase=(w_loss - base) / base)
        rows.append(row)

    def smallest(key):
        ok = [r for r in rows if key in r and r[key] < tolerance]
        return min(ok, key=lambda r: r["rank_fraction"]) if ok else None
    out = {"base_loss": base, "tolerance": tolerance, "matrices": names, "curve": rows,
           "smallest_within_tolerance": smallest("relative_increase"),
           "n_tokens": int(sum(x.size for x, _ in batches))}
    if white is not None:
        out["whitened_smallest_within_tolerance"] = smallest("whitened_relative_increase")
        out["calib_tokens"] = int(calib.size)
    return out


SAMPLE_FRACTIONS = (1 / 16, 1 / 8, 1 / 4)


def lowrank_samples(params, config, prompt, decode, calib=None, fractions=SAMPLE_FRACTIONS, n_tokens=160, seed=0,
                    temperature=0.8):
    """Text sampled from the dense model and from its compressed forms at a few rank fractions (plain SVD, and
    whitened when calib is given), each with the same seed.   -> [{"model", "rank_fraction", "text"}]"""
    names = linear_weight_names(config)
    models = [("dense", 1.0, params)]
    svd = svd_all(params, names)
    white = whitened_all(params, config, calib) if calib is not None else None
    for f in fractions:
        models.append(("svd", f, truncated_params(params, svd, f)[0]))
        if white is not None:
            models.append(("whitened", f, whitened_params(params, config, white, f)))
    out = []
    with blas_threads(1), np.errstate(over="ignore", invalid="ignore"):    # an overflow is caught as NonFiniteLogits
        for name, f, p in models:
            rng = np.random.default_rng(seed)
            pick = lambda logits: sample_next(logits, temperature, 200, None, rng)
            try:
                text = decode(list(decoder(config).generate(p, config, prompt, n_tokens, pick)))
            except NonFiniteLogits:         # weights so large that float32 overflows: no sample, and no warnings
                text = "(no sample: the model's logits overflowed float32)"
            out.append({"model": name, "rank_fraction": f, "text": text})
    return out
