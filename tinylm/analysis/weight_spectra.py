"""Spectral metrics of every weight matrix of a model (spectra.matrix_metrics applied to weights.weight_matrices)."""
import numpy as np
from tqdm import tqdm

from tinylm.core.arch import model_of
from tinylm.analysis.spectra import matrix_metrics
from tinylm.analysis.weights import is_per_head, source_name, weight_matrices


def analyze_spectra(params, config, n_boot=100, per_head=True, seed=0, progress=True, desc="spectra"):
    """name -> matrix_metrics(W) (+ "source"), for every matrix; alpha's bootstrap CI on the whole matrices only.

    Per-head blocks have only D = C/n_head singular values, too few for a power-law tail to mean much
    (their fits carry a warning), so they are not bootstrapped.
    """
    mats = weight_matrices(params, config, per_head=per_head)
    out = {}
    for name, W in tqdm(mats.items(), desc=desc, disable=not progress, leave=False):
        m = matrix_metrics(np.asarray(W, dtype=np.float64), n_boot=0 if is_per_head(name) else n_boot, seed=seed)
        m["source"] = source_name(name, config)
        out[name] = m
    return out


def init_like(config, meta):
    """The same model at initialization: init_params with the seed of the run (meta["train_args"]["seed"]) and its dtype."""
    seed = int((meta.get("train_args") or {}).get("seed", 0))
    dtype = np.float64 if meta.get("dtype") == "float64" else np.float32
    return model_of(config).init_params(config, seed=seed, dtype=dtype), seed
