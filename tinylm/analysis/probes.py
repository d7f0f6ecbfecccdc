"""Linear systems on the residual stream: least-squares probes after every layer, and the logit lens."""
import numpy as np
from tqdm import tqdm

from tinylm.analysis import linalg
from tinylm.analysis.interventions import final_logits, trace_forward
from tinylm.analysis.scale import LARGE_VOCAB, LOGIT_LENS_TOKENS, PROBE_CLASSES, frequent_tokens

VOWELS = set("aeiouAEIOU")


def probe_targets(x, y, chars):
    """What the probes try to read out, per token.   x, y (B, T) ids -> {name: (kind, labels (B·T,))}

    For a vocabulary over scale.LARGE_VOCAB, bpe_probe_targets.
    """
    if len(chars) > LARGE_VOCAB:
        return bpe_probe_targets(x, y, chars)
    B, T = x.shape
    vowel = np.array([c in VOWELS for c in chars])
    prev = np.concatenate([np.full((B, 1), -1), x[:, :-1]], axis=1)
    return {
        "current character": ("class", x.ravel()),
        "previous character": ("class", prev.ravel()),     # -1 (no previous token) rows are dropped
        "next character is a vowel": ("class", vowel[y].astype(np.intp).ravel()),
        "position": ("regress", np.tile(np.arange(T, dtype=np.float64), B)),
    }


def bpe_probe_targets(x, y, labels, n_classes=PROBE_CLASSES):
    """Probe targets for a large (BPE) vocabulary.   x, y (B, T) ids -> {name: (kind, labels (B·T,))}

    Token identity is read out over n_classes classes: the n_classes - 1 most frequent tokens
    of x, and "other" for the rest (a one-hot target of 50257 classes would be a 50257-column
    least-squares problem per layer). The character property becomes a word property:
    whether the next token starts with a space, i.e. begins a new word.
    """
    B, T = x.shape
    top = frequent_tokens(x, len(labels), n_classes - 1)
    cls = np.full(len(labels), len(top), dtype=np.intp)                   # "other"
    cls[top] = np.arange(len(top))
    starts_word = np.array([s[:1].isspace() for s in labels])
    prev = np.concatenate([np.full((B, 1), -1), cls[x[:, :-1]]], axis=1)
    return {
        f"current token ({len(top)} most frequent + other)": ("class", cls[x].ravel()),
        f"previous token ({len(top)} most frequent + other)": ("class", prev.ravel()),
        "next token starts with a space": ("class", starts_word[y].astype(np.intp).ravel()),
        "position": ("regress", np.tile(np.arange(T, dtype=np.float64), B)),
    }


def run_probes(residuals, targets, lam=1e-2, seed=0, progress=False):
    """Ridge probes (regularized normal equation) from each residual stream to each target.   residuals [(B,T,C)] -> dict

    Classification probes report held-out accuracy (with chance and majority baselines),
    the regression probe held-out R². Row l is the residual stream after l blocks (0 = embeddings).
    """
    out = {}
    for name, (kind, labels) in tqdm(targets.items(), desc="probes", disable=not progress, leave=False):
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


def mean_nll(logits, y):
    """−mean log softmax(logits)[y], without the (N, V) probabilities.   logits (B,T,V), y (B,T) -> float

    exp runs in the logits' dtype (a float64 copy of a 2048×50257 block costs seconds);
    the sums over the vocabulary are accumulated in float64.
    """
    z = logits.reshape(-1, logits.shape[-1])
    m = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=1, dtype=np.float64)) + m[:, 0]
    return float(np.mean(lse - z[np.arange(len(z)), y.reshape(-1)]))


def logit_lens(params, config, residuals, y):
    """Apply the final norm and the head to each residual stream: loss and accuracy per layer.   residuals [(B,T,C)], y (B,T) -> dict"""
    losses, accs = [], []
    for r in residuals:
        logits = final_logits(params, config, r)
        losses.append(mean_nll(logits, y))
        accs.append(float(np.mean(np.argmax(logits, axis=-1) == y)))
    return {"loss": losses, "accuracy": accs}


def analyze_probes(params, config, x, y, chars, lam=1e-2, progress=False):
    """Probes and logit lens on the windows x (B, T) with next tokens y.   -> dict"""
    residuals = trace_forward(params, config, x)["residual"]
    # Each layer of the lens is a (tokens, C)(C, V) product: a large vocabulary reads fewer windows.
    n_lens = max(1, LOGIT_LENS_TOKENS // x.shape[1]) if len(chars) > LARGE_VOCAB else len(x)
    return {"n_tokens": int(x.size), "lam": lam, "window": int(x.shape[1]), "n_windows": int(x.shape[0]),
            "probes": run_probes(residuals, probe_targets(x, y, chars), lam, progress=progress),
            "logit_lens": logit_lens(params, config, [r[:n_lens] for r in residuals], y[:n_lens]),
            "logit_lens_tokens": int(y[:n_lens].size)}
