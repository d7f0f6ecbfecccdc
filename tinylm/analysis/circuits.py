"""Attention circuits per head: the QK bilinear form, the OV map, the copying score, and attention-pattern heads.

For head h of layer i (see weights.head_weights): W_QK = W_Qᵀ W_K (C, C) gives the
attention score x_qᵀ W_QK x_k / √D, and W_OV = W_O W_V (C, C) is what the head
writes for the token it attends to. Both are rank ≤ D products, so their spectra
come from linalg.factored_spectrum without forming the C×C (or V×V) product.

The token-to-token OV circuit: M = W_U G_f W_OV G_1 W_E (V, V), with W_E = wteᵀ
(column j is token j's embedding), the tied unembedding W_U = wte, and the layer
norms folded in as their linear part: G_1 = diag(ln_1 gain)·P and G_f = diag(ln_f
gain)·P, P = I - 11ᵀ/C the centring. We include both layer norms because their
gains rescale residual directions unevenly and so change which tokens a head
copies; what we leave out is the per-token division by the standard deviation, a
positive scalar for each token that is not a linear map (the same choice as
"folding" layer norm in the interpretability literature). M[i, j] is how much
attending to token j raises the logit of token i; copying means M has large
positive real eigenvalues.

M is never formed, not even as its (V, D)(D, V) factors: its nonzero eigenvalues are those
of the D×D matrix W_V G_1 (W_E W_U) G_f W_O, and W_E W_U = wteᵀ wte is C×C, computed once.
For GPT-2 (V = 50257, C = 768, D = 64) that is one V·C² product instead of one per head.
"""
import numpy as np
from tqdm import tqdm

from tinylm.analysis import linalg
from tinylm.core.gpt2 import block_prefix
from tinylm.fast.decode import trace_forward
from tinylm.analysis.scale import MAX_PROMPT, eval_window
from tinylm.analysis.weights import head_weights

# A head whose score exceeds this is named a previous-token / induction head. Uniform attention over t
# keys gives 1/t, under 0.1 for most positions of a 64-token context; 0.4 asks for a clear majority
# of the attention mass on one specific key, a common cut-off for these scores.
HEAD_THRESHOLD = 0.4


def _ln_linear_part(params, name, C):
    """The linear part of layer norm x ↦ g ⊙ (x - mean x): diag(g) P, P = I - 11ᵀ/C.   -> (C, C)"""
    g = np.asarray(params[name], dtype=np.float64)
    P = np.eye(C) - 1.0 / C
    return g[:, None] * P


def embedding_gram(params):
    """W_E W_U = wteᵀ wte, the C×C Gram matrix of the token embeddings (float64).   -> (C, C)"""
    wte = np.asarray(params["transformer.wte.weight"], dtype=np.float64)       # (V, C)
    return wte.T @ wte


def head_circuits(params, config, layer, fold_ln=True, gram=None):
    """Per head of one layer: QK and OV singular values and eigenvalues, and the full OV circuit's copying score.   -> list of dicts.

    Every product is handled as its factors: W_QK = (W_Qᵀ)(W_K), W_OV = (W_O)(W_V), and the
    token circuit M = (W_U G_f W_O)(W_V G_1 W_E) of shape (V, D)(D, V): its nonzero eigenvalues
    are those of the D×D matrix W_V G_1 (W_E W_U) G_f W_O. gram: wteᵀ wte (embedding_gram), to reuse.
    """
    C = config.n_embd
    hw = {k: np.asarray(v, dtype=np.float64) for k, v in head_weights(params, config, layer).items()}
    gram = embedding_gram(params) if gram is None else gram
    if fold_ln:
        G1 = _ln_linear_part(params, block_prefix(layer) + "ln_1.weight", C)
        Gf = _ln_linear_part(params, "transformer.ln_f.weight", C)
    else:
        G1 = Gf = np.eye(C)
    out = []
    for h in range(config.n_head):
        W_Q, W_K, W_V, W_O = hw["W_Q"][h], hw["W_K"][h], hw["W_V"][h], hw["W_O"][h]
        qk = linalg.factored_spectrum(W_Q.T, W_K)
        ov = linalg.factored_spectrum(W_O, W_V)
        full = linalg.factored_spectrum(gram @ Gf @ W_O, W_V @ G1)          # (C, D)(D, C): the same nonzero eigenvalues as M
        out.append({
            "layer": layer, "head": h,
            "qk_singular_values": qk["singular_values"], "qk_eigenvalues": qk["eigenvalues"],
            "ov_singular_values": ov["singular_values"], "ov_eigenvalues": ov["eigenvalues"],
            "ov_copying_score": linalg.copying_score(ov["eigenvalues"]),
            "token_ov_eigenvalues": full["eigenvalues"],
            "copying_score": linalg.copying_score(full["eigenvalues"]),
        })
    return out


def previous_token_scores(att):
    """Mean attention of position t on t-1, over t ≥ 1 and the batch.   att (B, H, T, T) -> (H,)"""
    att = np.asarray(att, dtype=np.float64)
    T = att.shape[-1]
    t = np.arange(1, T)
    return att[:, :, t, t - 1].mean(axis=(0, 2))


def induction_scores(att, period):
    """Mean attention from position t of the second copy to t - period + 1 (the token after the earlier occurrence).   att (B,H,T,T) -> (H,)

    The input is a random sequence of `period` tokens repeated, so token t equals token t - period;
    a head that attends to the token that followed the earlier occurrence can predict the next token by copying.
    """
    att = np.asarray(att, dtype=np.float64)
    T = att.shape[-1]
    t = np.arange(period, T)
    return att[:, :, t, t - period + 1].mean(axis=(0, 2))


def repeated_random_tokens(config, n_seq=8, seed=0):
    """n_seq random sequences of length L = eval_window // 2 (scale.py), each repeated twice.   -> (idx (n_seq, 2L), L)"""
    L = eval_window(config) // 2
    rng = np.random.default_rng(seed)
    first = rng.integers(0, config.vocab_size, size=(n_seq, L))
    return np.concatenate([first, first], axis=1), L


def head_pattern_scores(params, config, text_idx, n_seq=8, seed=0, threshold=HEAD_THRESHOLD):
    """Previous-token scores on real text and induction scores on repeated random tokens, per layer and head.   -> dict.

    text_idx (B, T) token ids of real text. Returns previous_token (L, H), induction (L, H),
    the threshold, and the (layer, head) pairs above it for each kind.
    """
    prev = np.stack([previous_token_scores(a) for a in trace_forward(params, config, text_idx)["attention"]])
    rep, period = repeated_random_tokens(config, n_seq, seed)
    ind = np.stack([induction_scores(a, period) for a in trace_forward(params, config, rep)["attention"]])
    return {
        "previous_token": prev, "induction": ind, "threshold": threshold, "induction_period": period,
        "previous_token_heads": [[int(i), int(h)] for i, h in zip(*np.nonzero(prev > threshold))],
        "induction_heads": [[int(i), int(h)] for i, h in zip(*np.nonzero(ind > threshold))],
    }


def attention_for_prompt(params, config, idx):
    """Attention weights of every layer for the last MAX_PROMPT tokens of a prompt.   idx (T,) -> (n_layer, H, T, T)"""
    idx = np.asarray(idx)[None, -min(config.block_size, MAX_PROMPT):]
    return np.stack([a[0] for a in trace_forward(params, config, idx)["attention"]])


def analyze_circuits(params, config, text_idx, prompt_idx, fold_ln=True, progress=False):
    """Everything of this section: per-head circuits, head-pattern scores, attention for a prompt.   -> dict."""
    gram = embedding_gram(params)
    heads = [c for i in tqdm(range(config.n_layer), desc="circuits", disable=not progress, leave=False)
             for c in head_circuits(params, config, i, fold_ln, gram)]
    return {
        "fold_ln": fold_ln,
        "heads": heads,
        "patterns": head_pattern_scores(params, config, text_idx),
        "prompt_attention": attention_for_prompt(params, config, prompt_idx),
    }
