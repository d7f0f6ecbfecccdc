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

A Llama: W_U is its head (lm_head, or the embedding when tied), its RMSNorms fold in as diag(gain) (no
centring), and head h reads the key/value head h // (H/Hkv). Its queries and keys are turned by rotations
first, so its QK circuit is W_Qᵀ R(−Δ) W_K, one C×C matrix per offset Δ between query and key (rotary_qk).
"""
import numpy as np
from tqdm import tqdm

from tinylm.analysis import linalg
from tinylm.core.arch import arch_of
from tinylm.core.layers import rope_forward
from tinylm.analysis.interventions import trace_forward
from tinylm.analysis.scale import MAX_PROMPT, eval_window
from tinylm.analysis.weights import embedding, head_weights, norm_names, unembedding

# A head whose score exceeds this is named a previous-token / induction head. Uniform attention over t
# keys gives 1/t, under 0.1 for most positions of a 64-token context; 0.4 asks for a clear majority
# of the attention mass on one specific key, a common cut-off for these scores.
HEAD_THRESHOLD = 0.4


def norm_linear_part(params, name, C, centres):
    """The linear part of a norm x ↦ g ⊙ (x - mean x) (LayerNorm: diag(g) P, P = I - 11ᵀ/C) or x ↦ g ⊙ x (RMSNorm:
    diag(g)), leaving out the division by a per-token scalar.   -> (C, C)"""
    g = np.asarray(params[name + ".weight"], dtype=np.float64)
    return g[:, None] * (np.eye(C) - 1.0 / C if centres else np.eye(C))


def embedding_gram(params, config):
    """W_E W_U = embeddingᵀ head, the C×C product of the token embedding and the output head (float64; with a tied
    head, the Gram matrix of the embeddings).   -> (C, C)"""
    E = np.asarray(embedding(params, config), dtype=np.float64)          # (V, C)
    return E.T @ np.asarray(unembedding(params, config), dtype=np.float64)


def head_circuits(params, config, layer, fold_ln=True, gram=None):
    """Per head of one layer: QK and OV singular values and eigenvalues, and the full OV circuit's copying score.   -> list of dicts.

    Every product is handled as its factors: W_QK = (W_Qᵀ)(W_K), W_OV = (W_O)(W_V), and the
    token circuit M = (W_U G_f W_O)(W_V G_1 W_E) of shape (V, D)(D, V): its nonzero eigenvalues
    are those of the D×D matrix W_V G_1 (W_E W_U) G_f W_O. gram: embedding_gram, to reuse.
    """
    C = config.n_embd
    hw = {k: np.asarray(v, dtype=np.float64) for k, v in head_weights(params, config, layer).items()}
    gram = embedding_gram(params, config) if gram is None else gram
    if fold_ln:
        attn_norm, _, final_norm, centres = norm_names(config, layer)
        G1 = norm_linear_part(params, attn_norm, C, centres)
        Gf = norm_linear_part(params, final_norm, C, centres)
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


# ----------------------------------------------------------------------------- the QK circuit under rotation


def rotation(offset, D, theta):
    """The D×D matrix R by which core's rope_forward turns a head's vector at position `offset`: its columns are the
    turned unit vectors R e_1 … R e_D (block-diagonal 2×2 rotations of the pairs (j, j + D/2), orthogonal)."""
    return rope_forward(np.eye(D)[:, None, :], np.array([offset]), theta)[0][:, 0, :].T


def rotary_qk(params, config, layer, offsets=None):
    """σ₁ of each head's QK circuit W_Qᵀ R(−Δ) W_K at each offset Δ = m − n ≥ 0 between a query at m and a key at n.

    (R_m W_Q x)·(R_n W_K y) = xᵀ W_Qᵀ R_(n−m) W_K y, so with rotary positions a head's bilinear form depends on how
    far back the key is. Its top singular value is how strongly the head can score any pair of tokens that
    distance apart: read from the weights alone, which distances a head is built for.   -> (H, len(offsets))
    """
    offsets = np.arange(config.block_size) if offsets is None else np.asarray(offsets)
    hw = {k: np.asarray(v, dtype=np.float64) for k, v in head_weights(params, config, layer).items()}
    D = config.n_embd // config.n_head
    turns = [rotation(-int(d), D, config.rope_theta) for d in offsets]
    return np.array([[linalg.factored_spectrum(W_Q.T, R @ W_K)["singular_values"][0] for R in turns]
                     for W_Q, W_K in zip(hw["W_Q"], hw["W_K"])])


def rotary_summary(sigma):
    """Per head of a layer's rotary_qk σ₁ (H, offsets): the offset of the largest σ₁ and max/min over offsets."""
    low = sigma.min(axis=1)
    return {"peak_offset": sigma.argmax(axis=1), "peak_sigma": sigma.max(axis=1),
            "max_over_min": np.where(low > 0, sigma.max(axis=1) / np.where(low > 0, low, 1), np.inf)}


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
    gram = embedding_gram(params, config)
    heads = [c for i in tqdm(range(config.n_layer), desc="circuits", disable=not progress, leave=False)
             for c in head_circuits(params, config, i, fold_ln, gram)]
    out = {
        "fold_ln": fold_ln,
        "norm": "LayerNorm" if norm_names(config)[3] else "RMSNorm",
        "heads": heads,
        "patterns": head_pattern_scores(params, config, text_idx),
        "prompt_attention": attention_for_prompt(params, config, prompt_idx),
    }
    if arch_of(config) == "llama":          # rotary positions: the QK circuit is a function of the offset
        sigma = np.stack([rotary_qk(params, config, i) for i in range(config.n_layer)])      # (L, H, block_size)
        summary = [rotary_summary(s) for s in sigma]
        out["rotary"] = {"offsets": np.arange(config.block_size), "sigma1": sigma,
                         **{k: np.stack([s[k] for s in summary]) for k in summary[0]}}
    return out
