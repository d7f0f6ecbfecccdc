"""Embedding geometry: PCA of the token embeddings, cosine neighbours, letter-case analogies,
position-embedding similarity, and principal angles between the subspaces heads read and write."""
import itertools

import numpy as np
from tqdm import tqdm

from tinylm.analysis import linalg
from tinylm.analysis.scale import position_subset
from tinylm.analysis.weights import embedding, head_weights, position_embedding


ESCAPES = {"\n": "\\n", " ": "␣", "\t": "\\t", "\r": "\\r"}


def token_label(text):
    """A printable label for a token's text: '\\n' for newline, '␣' for space ('␣the'), escapes for the rest."""
    return "".join(ESCAPES.get(ch, ch if ch.isprintable() else repr(ch)[1:-1]) for ch in text)


def embedding_pca(wte, k=None):
    """PCA of the token embeddings by eigh of their covariance.   wte (V, C) -> dict (linalg.pca, all k components)."""
    V, C = wte.shape
    return linalg.pca(wte, k or min(C, V))


def neighbours(wte, chars, k=5, queries=None, progress=False):
    """The k most cosine-similar tokens of each query token, among all V.   wte (V, C) -> {label: [(label, sim)] * k}

    queries: token ids (default: every token). Similarities are computed for 256 queries
    at a time, (256, C)(C, V), so a 50257-token vocabulary never needs a V×V matrix.
    """
    unit = linalg._unit_rows(np.asarray(wte, dtype=np.float64))
    queries = np.arange(len(chars)) if queries is None else np.asarray(queries)
    k = min(k, len(chars) - 1)
    out = {}
    for start in tqdm(range(0, len(queries), 256), desc="neighbours", disable=not progress, leave=False):
        q = queries[start:start + 256]
        sims = unit[q] @ unit.T                                   # (q, V)
        sims[np.arange(len(q)), q] = -np.inf                      # a token is not its own neighbour
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        for row, i in enumerate(q):
            idx = top[row][np.argsort(-sims[row, top[row]], kind="stable")]
            out[chars[i]] = [[chars[j], float(sims[row, j])] for j in idx]
    return out


def case_analogies(wte, chars, max_show=12):
    """For every pair of letters X ≠ Y with both cases in the vocabulary: 'x' - 'X' + 'Y' should be 'y'.   -> dict

    Uses the pair (X, x) as the case offset and Y as the query (linalg.analogy: X : x :: Y : ?).
    Reports top-1 accuracy, the mean and median rank of the expected answer among the V - 3
    candidates (1 = best), chance rank (V - 2) / 2, and the first max_show queries with their top hits.
    """
    index = {c: i for i, c in enumerate(chars)}
    letters = [c for c in chars if len(c) == 1 and c.isupper() and c.lower() in index]
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


def head_subspace_overlaps(params, config, progress=False):
    """Mean cos² of the principal angles between every pair of heads' read (W_V rows) and write (W_O columns) subspaces.

    -> {"labels": ["L0H0", ...], "read": (N, N), "write": (N, N), "random_baseline": D/C, "same_kv_head": (N, N) bool}
    With grouped-query attention the query heads that share a K/V head read the same subspace (overlap 1).
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
        # With orthonormal bases, Σ cos²θᵢ = ‖Q_Aᵀ Q_B‖_F² (the cosines are its singular values):
        # one (D, C)(C, N·D) product per head instead of an SVD per pair of heads.
        Q = np.stack([np.linalg.qr(b)[0] for b in bases])                  # (N, C, D)
        flat = Q.transpose(1, 0, 2).reshape(C, N * D)                      # (C, N·D)
        M = np.empty((N, N))
        for a in tqdm(range(N), desc="head subspaces", disable=not progress, leave=False):
            M[a] = ((Q[a].T @ flat) ** 2).reshape(D, N, D).sum(axis=(0, 2)) / D
        return (M + M.T) / 2                                               # exactly symmetric

    group = np.repeat(np.arange(N // (H // getattr(config, "n_kv_head", H))), H // getattr(config, "n_kv_head", H))
    return {"labels": labels, "read": overlap(reads), "write": overlap(writes), "random_baseline": D / C,
            "same_kv_head": group[:, None] == group[None, :]}          # pairs that read one shared K/V head


def analyze_embeddings(params, config, chars, subset=None, subset_rule="", progress=False):
    """Everything of this section.   -> dict

    subset: token ids (see scale.token_subset) for the neighbour lists, the analogies and the
    PCA map of a large vocabulary; None means every token. The PCA itself uses every token.
    """
    wte = np.asarray(embedding(params, config), dtype=np.float64)
    wpe = position_embedding(params, config)          # None for a Llama: its positions are rotations, not vectors
    positions = position_subset(config.block_size) if wpe is not None else None
    p = embedding_pca(wte)
    evr = p["explained_variance_ratio"]
    ids = np.arange(len(chars)) if subset is None else np.asarray(subset)
    labels = [chars[i] for i in ids]
    return {
        "chars": labels,
        "token_ids": ids,
        "subset_rule": subset_rule,
        "pca_explained_variance_ratio": evr,
        "pca_components_for_90pct": int(np.searchsorted(np.cumsum(evr), 0.9) + 1),
        "pca_map": p["projections"][ids, :2],
        "neighbours": neighbours(wte, chars, queries=ids, progress=progress),
        "analogies": case_analogies(wte[ids], labels),
        "positions": positions,
        "position_cosine": None if wpe is None else linalg.cosine_similarity_matrix(np.asarray(wpe[positions], np.float64)),
        "head_subspaces": head_subspace_overlaps(params, config, progress=progress),
    }
