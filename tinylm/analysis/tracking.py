"""Spectra during training: one JSON line of per-matrix spectral metrics per evaluation (train.py --track_spectra)."""
import json
import os
import time

import numpy as np

from tinylm.analysis.spectra import fit_power_law
from tinylm.analysis.weights import weight_matrices
from tinylm.lowrank.factorized import dense_params

# Keep this many of the largest singular values per matrix: enough to draw how the top of the spectrum moves.
TOP_SINGULAR_VALUES = 8


def spectra_snapshot(params, config):
    """name -> {fro, spectral, stable_rank, alpha, top_sv} for every whole weight matrix (no per-head, no bootstrap)."""
    out = {}
    for name, W in weight_matrices(params, config).items():
        s = np.linalg.svd(np.asarray(W, dtype=np.float64), compute_uv=False)
        fro2 = float(np.sum(s**2))
        alpha = fit_power_law(s**2)["alpha"]
        out[name] = {
            "fro": float(np.sqrt(fro2)),
            "spectral": float(s[0]),
            "stable_rank": fro2 / float(s[0]) ** 2 if s[0] > 0 else 0.0,
            # strict JSON has no NaN: a failed fit is null
            "alpha": float(alpha) if np.isfinite(alpha) else None,
            "top_sv": [float(x) for x in s[:TOP_SINGULAR_VALUES]],
        }
    return out


def update_spectra(updates):
    """name -> {"sv": every singular value, "stable_rank"} of each applied update ΔW = W_before − W_after.

    AdamW's ΔW is dominated by a few directions (its σ fall off fast); Muon's is U Vᵀ scaled, so its σ
    are all equal: flat by construction."""
    out = {}
    for name, dW in updates.items():
        s = np.linalg.svd(np.asarray(dW, dtype=np.float64), compute_uv=False)
        out[name] = {"sv": [float(f"{x:.6g}") for x in s],
                     "stable_rank": float(np.sum(s**2) / s[0] ** 2) if s[0] > 0 else 0.0}
    return out


def log_spectra(params, config, step, path, updates=None, optimizer=None):
    """Append {"step", "elapsed_ms", "matrices": spectra_snapshot(...)} as one JSON line to path, and with
    `updates` (the last step's ΔW of each block matrix) their spectra under "updates", with the optimizer's name."""
    t0 = time.perf_counter()
    record = {"step": int(step), "matrices": spectra_snapshot(dense_params(params), config)}   # factorized: the products
    if updates:
        record.update(optimizer=optimizer, updates=update_spectra(updates))
    record["elapsed_ms"] = round(1000 * (time.perf_counter() - t0), 1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
    return record


def read_jsonl(path):
    """The JSON objects of a .jsonl file, skipping blank or damaged lines (a run killed mid-write leaves half a line)."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                rows.append(obj)
    return rows
