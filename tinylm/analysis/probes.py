"""Linear systems on the residual stream: least-squares probes after every layer, and the logit lens."""
import numpy as np

from . import linalg
from .. import layers as L
from ..model import trace_forward

VOWELS = set("aeiouAEIOU")


def probe_targets(x, y, chars):
    """What the probes try to read out, per token.   x, y (B, T) ids -> {name: (kind, labels (B·T,))}"""
    B, T = x.shape
    vowel = np.array([c in VOWELS for c in chars])
    prev = np.concatenate([np.full((B, 1), -1), x[:, :-1]], axis=1)
    return {
        "current character": ("class", x.ravel()),
        "previous character": ("class", prev.ravel()),     # -1 (no previous token) rows are dropped
        "next character is a vowel": ("class", vowel[y].astype(np.intp).ravel()),
        "position": ("regress", np.tile(np.arange(T, dtype=np.float64), B)),
    }


def run_probes(residuals, targets, lam=1e-2, seed=0):
    """Ridge probes (regularized normal equation) from each residual stream to each target.   residuals [(B,T,C)] -> dict

    Classification probes report held-out accuracy (with chance and majority baselines),
    the regression probe held-out R². Row l is the residual stream after l blocks (0 = embeddings).
    """
    out = {}
    for name, (kind, labels) in targets.items():
        rows = []
        keep = labels >= 0 if kind == "class" else np.ones(len(labels), bool)
        for r in residuals:
            X = np.asarray(r, dtype=np.float64).reshape(-1, r.shape[-1])[keep]
            if kind == "class":
                lab = labels[keep].astype(np.intp)
                fit = linalg.probe_fit_classification(X, lab, lam=lam, seed=seed, n_classes=int(lab.max()) + 1)
                rows.append({"score": fit["accuracy_test"], "train": fit["accuracy_train"],
                             "majority": fit["majority"]})
            else:
                fit = linalg.probe_fit_regression(X, labels[keep], lam=lam, seed=seed)
                rows.append({"score": fit["r2_test"], "train": fit["r2_train"]})
        out[name] = {"metric": "accuracy" if kind == "class" else "R²", "per_layer": rows}
    return out


def logit_lens(params, residuals, y):
    """Apply ln_f and the tied head to each residual stream: loss and accuracy per layer.   residuals [(B,T,C)], y (B,T) -> dict"""
    wte = params["transformer.wte.weight"]
    losses, accs = [], []
    for r in residuals:
        h, _ = L.layernorm_forward(r, params["transformer.ln_f.weight"], params.get("transformer.ln_f.bias"))
        logits = h @ wte.T
        loss, _ = L.cross_entropy_forward(logits.astype(np.float64), y)
        losses.append(float(loss))
        accs.append(float(np.mean(np.argmax(logits, axis=-1) == y)))
    return {"loss": losses, "accuracy": accs}


def analyze_probes(params, config, x, y, chars, lam=1e-2):
    """Probes and logit lens on the windows x (B, T) with next tokens y.   -> dict"""
    residuals = trace_forward(params, config, x)["residual"]
    return {"n_tokens": int(x.size), "lam": lam,
            "probes": run_probes(residuals, probe_targets(x, y, chars), lam),
            "logit_lens": logit_lens(params, residuals, y)}
