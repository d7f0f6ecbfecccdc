"""The layers of GPT-2, each forward beside its backward: the math of the model, written to be read.

Every `*_forward` returns (out, cache); every `*_backward(dout, cache)` returns the gradient of the
input and, for a layer with parameters, a dict of their gradients (the embedding's input is token ids,
so its backward returns the dict alone). Shapes: B sequences, T tokens, C = n_embd channels,
V tokens in the vocabulary, H heads of width D = C/H. Plain NumPy in any float dtype; the fast path
(tinylm/fast/layers.py) computes the same functions faster, and tests hold the two equal.
"""
import numpy as np

# ----------------------------------------------------------------------------- embedding


def embedding_forward(idx, wte, wpe):
    """x[b,t] = wte[idx[b,t]] + wpe[t].   idx (B,T) ints, wte (V,C), wpe (block,C) -> x (B,T,C)"""
    T = idx.shape[1]
    return wte[idx] + wpe[:T], (idx, wte.shape, wpe.shape)


def embedding_backward(dx, cache):
    """dwte[v] = Σ_{b,t: idx[b,t]=v} dx[b,t];  dwpe[t] = Σ_b dx[b,t].   dx (B,T,C) -> {"wte", "wpe"}"""
    idx, wte_shape, wpe_shape = cache
    dwte = np.zeros(wte_shape, dtype=dx.dtype)
    np.add.at(dwte, idx, dx)                 # a token may occur many times: its rows add up, not overwrite
    dwpe = np.zeros(wpe_shape, dtype=dx.dtype)
    dwpe[:idx.shape[1]] = dx.sum(axis=0)     # positions past T were not used: their gradient stays 0
    return {"wte": dwte, "wpe": dwpe}


# ----------------------------------------------------------------------------- linear


def linear_forward(x, W, b=None):
    """y = x Wᵀ + b.   x (..., in), W (out, in), b (out,) or None -> y (..., out)"""
    y = x @ W.T
    if b is not None:
        y = y + b
    return y, (x, W, b is not None)


def linear_backward(dy, cache):
    """dx = dy W;  dW = dyᵀ x;  db = Σ dy  (dW and db summed over every leading axis).   -> dx, {"W", "b"}"""
    x, W, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])      # every leading position is one more row of the same product
    x2 = x.reshape(-1, x.shape[-1])
    grads = {"W": dy2.T @ x2}
    if has_bias:
        grads["b"] = dy2.sum(axis=0)
    return dy @ W, grads


# ----------------------------------------------------------------------------- layer norm


def layernorm_forward(x, w, b=None, eps=1e-5):
    """y = (x − μ)/√(σ² + ε) ⊙ w + b, μ and σ² over the last axis.   x (..., C), w (C,), b (C,)/None -> y"""
    mu = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(x.var(axis=-1, keepdims=True) + eps)
    xhat = (x - mu) * rstd
    y = xhat * w
    if b is not None:
        y = y + b
    return y, (xhat, rstd, w, b is not None)


def layernorm_backward(dy, cache):
    """dx = rstd (g − mean g − x̂ mean(g ⊙ x̂)), g = dy ⊙ w;  dw = Σ dy ⊙ x̂;  db = Σ dy.   -> dx, {"w", "b"}"""
    xhat, rstd, w, has_bias = cache
    C = dy.shape[-1]
    g = dy * w
    # μ and σ depend on every x in the row, hence the two means subtracted from g
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    grads = {"w": (dy * xhat).reshape(-1, C).sum(axis=0)}
    if has_bias:
        grads["b"] = dy.reshape(-1, C).sum(axis=0)
    return dx, grads


# ----------------------------------------------------------------------------- GELU

GELU_SCALE = np.sqrt(2.0 / np.pi)
GELU_CUBIC = 0.044715


def gelu_forward(x):
    """y = ½ x (1 + tanh u),  u = √(2/π)(x + 0.044715 x³): GPT-2's tanh approximation.   any shape"""
    t = np.tanh(GELU_SCALE * (x + GELU_CUBIC * x ** 3))
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_backward(dy, cache):
    """dx = dy ⊙ (½(1 + tanh u) + ½ x (1 − tanh² u) u'),  u' = √(2/π)(1 + 3·0.044715 x²).   any shape"""
    x, t = cache
    du = GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x ** 2)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)


# ----------------------------------------------------------------------------- causal self-attention


def split_heads(x, n_head):
    """(B,T,C) -> (B,H,T,D): head h reads channels h·D … (h+1)·D − 1."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B,H,T,D) -> (B,T,C): the heads side by side again."""
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def softmax(z):
    """exp(z) / Σ exp(z) over the last axis."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))      # the max subtracted so exp cannot overflow
    return e / e.sum(axis=-1, keepdims=True)


def attention_forward(qkv, n_head):
    """y = softmax(Q Kᵀ/√D + causal mask) V per head.   qkv (B,T,3C) = [Q K V] -> y (B,T,C)

    The cache holds (Q, K, V, A, 1/√D), A (B,H,T,T) the attention weights, each row summing to 1.
    """
    T = qkv.shape[1]
    q, k, v = (split_heads(a, n_head) for a in np.split(qkv, 3, axis=-1))      # each (B,H,T,D)
    scale = 1.0 / np.sqrt(q.shape[-1])       # keeps the scores' spread independent of D
    future = np.triu(np.ones((T, T), dtype=bool), k=1)                        # key j > query i
    scores = np.where(future, -np.inf, q @ k.transpose(0, 1, 3, 2) * scale)   # exp(−∞) = 0: no look ahead
    att = softmax(scores)
    return merge_heads(att @ v), (q, k, v, att, scale)


def attention_backward(dy, cache):
    """dV = Aᵀ dY;  dA = dY Vᵀ;  dS = A ⊙ (dA − Σ_j dA ⊙ A);  dQ = dS K/√D;  dK = dSᵀ Q/√D.   -> dqkv"""
    q, k, v, att, scale = cache
    dy = split_heads(dy, q.shape[1])
    dv = att.transpose(0, 1, 3, 2) @ dy
    datt = dy @ v.transpose(0, 1, 3, 2)
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))   # softmax's backward, row by row
    dq = dscores @ k * scale                 # masked entries have A = 0, so they pass no gradient
    dk = dscores.transpose(0, 1, 3, 2) @ q * scale
    return np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)


# ----------------------------------------------------------------------------- loss


def cross_entropy_forward(logits, targets):
    """loss = −(1/N) Σ log softmax(logits)[target], N = B·T.   logits (B,T,V), targets (B,T) ints -> float"""
    z = logits - logits.max(axis=-1, keepdims=True)                # exp cannot overflow
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))       # log softmax
    loss = -np.take_along_axis(logp, targets[..., None], axis=-1).mean()
    return float(loss), (np.exp(logp), targets)


def cross_entropy_backward(dloss, cache):
    """dlogits = (softmax(logits) − onehot(target)) · dloss / N.   -> (B,T,V)"""
    probs, targets = cache
    onehot = np.eye(probs.shape[-1], dtype=probs.dtype)[targets]
    return (probs - onehot) * (dloss / targets.size)
