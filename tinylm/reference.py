"""The whole GPT-2 forward, one line per equation: the model to read (tests hold model.forward equal to it).

Plain NumPy in float64: no caches, threads, chunking, recomputation or dropout. It reads the same
parameter dict as tinylm/model.py (nanoGPT's names; a linear weight is (out, in), so y = x Wᵀ + b;
the output head is tied to the token embedding wte). Shapes: B sequences, T tokens, C = n_embd,
H heads of width D = C/H, V tokens in the vocabulary.
"""
import numpy as np


def layer_norm(x, w, b, eps=1e-5):
    """(x − μ)/√(σ² + ε) ⊙ w + b over the last axis (C)."""
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + (0.0 if b is None else b)


def linear(x, W, b):
    """x Wᵀ + b: (..., in) -> (..., out)."""
    return x @ W.T + (0.0 if b is None else b)


def gelu(x):
    """GPT-2's GELU, the tanh form: ½ x (1 + tanh(√(2/π) (x + 0.044715 x³)))."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def softmax(z):
    """exp(z) / Σ exp(z) over the last axis (the max is subtracted first so exp cannot overflow)."""
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def attention(x, W, b, Wo, bo, n_head):
    """softmax(Q Kᵀ/√D + mask) V per head, then the output projection: (B,T,C) -> (B,T,C)."""
    B, T, C = x.shape
    D = C // n_head
    q, k, v = np.split(linear(x, W, b), 3, axis=-1)                   # each (B,T,C)
    q, k, v = (a.reshape(B, T, n_head, D).transpose(0, 2, 1, 3) for a in (q, k, v))   # (B,H,T,D)
    mask = np.triu(np.full((T, T), -np.inf), k=1)                     # token t sees tokens ≤ t only
    y = softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(D) + mask) @ v  # (B,H,T,D)
    return linear(y.transpose(0, 2, 1, 3).reshape(B, T, C), Wo, bo)   # heads side by side again


def forward(params, config, idx, targets=None):
    """logits (B,T,V) and the mean cross-entropy loss (or None) for token ids idx (B,T)."""
    P = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    get = P.get
    T = idx.shape[1]
    x = P["transformer.wte.weight"][idx] + P["transformer.wpe.weight"][:T]    # the residual stream (B,T,C)
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        h = layer_norm(x, P[p + "ln_1.weight"], get(p + "ln_1.bias"))
        x = x + attention(h, P[p + "attn.c_attn.weight"], get(p + "attn.c_attn.bias"),
                          P[p + "attn.c_proj.weight"], get(p + "attn.c_proj.bias"), config.n_head)
        h = layer_norm(x, P[p + "ln_2.weight"], get(p + "ln_2.bias"))
        x = x + linear(gelu(linear(h, P[p + "mlp.c_fc.weight"], get(p + "mlp.c_fc.bias"))),
                       P[p + "mlp.c_proj.weight"], get(p + "mlp.c_proj.bias"))
    x = layer_norm(x, P["transformer.ln_f.weight"], get("transformer.ln_f.bias"))
    logits = x @ P["transformer.wte.weight"].T                               # head tied to wte: (B,T,V)
    if targets is None:
        return logits, None
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))               # log softmax
    loss = -np.take_along_axis(logp, targets[..., None], axis=-1).mean()     # −mean log p(target)
    return logits, loss
