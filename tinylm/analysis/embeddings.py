"""Embedding geometry: PCA of the token embeddings, cosine neighbours, letter-case analogies,
position-embedding similarity, and principal angles between the subspaces heads read and write."""
import itertools

import numpy as np

from . import linalg
from .weights import head_weights


def token_label(ch):
    """A printable label for a character token ('\\n' for newline, '␣' for space)."""
    return {"\n": "\\n", " ": "␣", "\t": "\\t"}.get(ch, ch if ch.isprintable() else repr(ch)[1:-1])


def embedding_pca(wte, k=None):
    """PCA of the token embeddings by eigh of their covariance.   wte (V, C) -> dict (linalg.pca, all k components)."""
    V, C = wte.shape
    return linalg.pca(wte, k or min(C, V))


def neighbours(wte, chars, k=5):
    """Each token's k most cosine-similar tokens.   wte (V, C) -> {char: [(char, sim)] * k}"""
    out = {}
    for i, ch in enumerate(chars):
        idx, sims = linalg.nearest_neighbours(wte, i, min(k, len(chars) - 1))
        out[ch] = [[chars[j], float(s)] for j, s in zip(idx, sims)]
    return out


def case_analogies(wte, chars, max_show=12):
    """For every pair of letters X ≠ Y with both cases in the vocabulary: 'x' - 'X' + 'Y' should be 'y'.   -> dict

    Uses the pair (X, x) as the case offset and Y as the query (linalg.analogy: X : x :: Y : ?).
    Reports top-1 accuracy, the mean and median rank of the expected answer among the V - 3
    candidates (1 = best), chance rank (V - 2) / 2, and the first max_show queries with their top hits.
    """
    index = {c: i for i, c in enumerate(chars)}
    letters = [c for c in chars if c.isupper() and c.lower() in index]
    n_cand = len(chars) - 3
    ranks, shown = [], []
    for X, Y in itertools.permutations(letters, 2):
        order, _ = linalg.analogy(wte, index[X], index[X.lower()], index[Y], k=n_cand)
        rank = int(np.nonzero(order == index[Y.lower()])[0][0]) + 1
        ranks.append(rank)
        if len(shown) < max_show:
            shown.append({"query": f"'{X.lower()}' - '{X}' + '{Y}'", "expected": Y.lower(), "rank": rank,
                          "top": [chars[j] for j in order[:3]]})
    if not ranks:
        return {"n": 0, "letters": "", "note": "the vocabulary has no letter in both cases"}
    ranks = np.array(ranks)
    return {"n": int(len(ranks)), "letters": "".join(letters), "top1_accuracy": float(np.mean(ranks == 1)),
            "top5_accuracy": float(np.mean(ranks <= 5)), "mean_rank": float(ranks.mean()),
            "median_rank": float(np.median(ranks)), "chance_rank": (n_cand + 1) / 2, "examples": shown}


def head_subspace_overlaps(params, config):
    """Mean cos² of the principal angles between every pair of heads' read (W_V rows) and write (W_O columns) subspaces.

    -> {"labels": ["L0H0", ...], "read": (N, N), "write": (N, N), "random_baseline": D/C}
    mean cos²θ = ‖Q_Aᵀ Q_B‖_F² / D: 1 for the same subspace, 0 for orthogonal ones, D/C on
    average for two random D-dimensional subspaces of R^C.
    """
    C, H = config.n_embd, config.n_head
    D = C // H
    reads, writes, labels = [], [], []
    for i in range(config.n_layer):
        hw = head_weights(params, config, i)
        for h in range(H):
            reads.append(np.asarray(hw["W_V"][h], dtype=np.float64).T)     # (C, D): the directions the head reads
            writes.append(np.asarray(hw["W_O"][h], dtype=np.float64))      # (C, D): the directions it writes
            labels.append(f"L{i}H{h}")
    N = len(labels)

    def overlap(bases):
        M = np.eye(N)
        for a, b in itertools.combinations(range(N), 2):
            M[a, b] = M[b, a] = float(np.mean(np.cos(linalg.principal_angles(bases[a], bases[b])) ** 2))
        return M

    return {"labels": labels, "read": overlap(reads), "write": overlap(writes), "random_baseline": D / C}


def analyze_embeddings(params, config, chars):
    """Everything of this section.   -> dict"""
    wte = np.asarray(params["transformer.wte.weight"], dtype=np.float64)
    wpe = np.asarray(params["transformer.wpe.weight"], dtype=np.float64)
    p = embedding_pca(wte)
    evr = p["explained_variance_ratio"]
    return {
        "chars": chars,
        "pca_explained_variance_ratio": evr,
        "pca_components_for_90pct": int(np.searchsorted(np.cumsum(evr), 0.9) + 1),
        "pca_map": p["projections"][:, :2],
        "neighbours": neighbours(wte, chars),
        "analogies": case_analogies(wte, chars),
        "position_cosine": linalg.cosine_similarity_matrix(wpe),
        "head_subspaces": head_subspace_overlaps(params, config),
    }
