"""The layers of GPT-2 and Llama, each forward beside its backward: the math of the models, written to be read.

Every `*_forward` returns (out, cache); every `*_backward(dout, cache)` returns the gradient of the
input and, for a layer with parameters, a dict of their gradients (the embedding's input is token ids,
so its backward returns the dict alone). Shapes: B sequences, T tokens, C = n_embd channels,
V tokens in the vocabulary, H heads of width D = C/H. Plain NumPy in any float dtype; the fast path
(tinylm/fast/layers.py) computes GPT-2's layers faster, and tests hold the two equal. The layers only
Llama uses (RMSNorm, rotary embeddings, SwiGLU) come last; attention with shared K/V heads serves both.
"""
import math

import numpy as np

# ----------------------------------------------------------------------------- embedding


def embedding_forward(idx, wte, wpe=None):
    """x[b,t] = wte[idx[b,t]] + wpe[t].   idx (B,T) ints, wte (V,C), wpe (block,C) or None -> x (B,T,C)

    Llama has no wpe (None): its positions enter the attention by rotation instead (rope_forward).
    """
    x = wte[idx]
    if wpe is not None:
        x = x + wpe[:idx.shape[1]]
    return x, (idx, wte.shape, None if wpe is None else wpe.shape)


def embedding_backward(dx, cache):
    """dwte[v] = Σ_{b,t: idx[b,t]=v} dx[b,t];  dwpe[t] = Σ_b dx[b,t].   dx (B,T,C) -> {"wte", "wpe" (if any)}"""
    idx, wte_shape, wpe_shape = cache
    dwte = np.zeros(wte_shape, dtype=dx.dtype)
    np.add.at(dwte, idx, dx)                 # a token may occur many times: its rows add up, not overwrite
    if wpe_shape is None:
        return {"wte": dwte}
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

GELU_SCALE = math.sqrt(2.0 / math.pi)      # a Python float: float32 inputs stay float32
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


def causal_attention_forward(q, k, v):
    """y = softmax(Q Kᵀ/√D + causal mask) V, each head on its own.   q, k, v (B,H,T,D) -> y (B,H,T,D)

    The cache holds (Q, K, V, A, 1/√D), A (B,H,T,T) the attention weights, each row summing to 1.
    """
    T, D = q.shape[-2:]
    scale = 1.0 / math.sqrt(D)               # keeps the scores' spread independent of D
    future = np.triu(np.ones((T, T), dtype=bool), k=1)                        # key j > query i
    scores = np.where(future, -np.inf, q @ k.transpose(0, 1, 3, 2) * scale)   # exp(−∞) = 0: no look ahead
    att = softmax(scores)
    return att @ v, (q, k, v, att, scale)


def causal_attention_backward(dy, cache):
    """dV = Aᵀ dY;  dA = dY Vᵀ;  dS = A ⊙ (dA − Σ_j dA ⊙ A);  dQ = dS K/√D;  dK = dSᵀ Q/√D.   -> dq, dk, dv"""
    q, k, v, att, scale = cache
    dv = att.transpose(0, 1, 3, 2) @ dy
    datt = dy @ v.transpose(0, 1, 3, 2)
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))   # softmax's backward, row by row
    dq = dscores @ k * scale                 # masked entries have A = 0, so they pass no gradient
    dk = dscores.transpose(0, 1, 3, 2) @ q * scale
    return dq, dk, dv


def attention_forward(qkv, n_head):
    """GPT-2's attention: the fused projection split into H heads of Q, K and V.   qkv (B,T,3C) = [Q K V] -> y (B,T,C)"""
    q, k, v = (split_heads(a, n_head) for a in np.split(qkv, 3, axis=-1))      # each (B,H,T,D)
    y, cache = causal_attention_forward(q, k, v)
    return merge_heads(y), cache


def attention_backward(dy, cache):
    """causal_attention_backward on dy's heads; the gradients side by side as [dQ dK dV].   -> dqkv (B,T,3C)"""
    n_head = cache[0].shape[1]               # the cache's Q is (B,H,T,D)
    dq, dk, dv = causal_attention_backward(split_heads(dy, n_head), cache)
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
    onehot = np.arange(probs.shape[-1]) == targets[..., None]       # (B,T,V) booleans, 1 at the target
    return (probs - onehot) * (dloss / targets.size)


# ----------------------------------------------------------------------------- Llama's layers: RMSNorm


def rmsnorm_forward(x, w, eps=1e-5):
    """y = x/√(mean x² + ε) ⊙ w over the last axis: layer norm without removing the mean.   x (..., C), w (C,)"""
    rstd = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    xhat = x * rstd
    return xhat * w, (xhat, rstd, w)


def rmsnorm_backward(dy, cache):
    """dx = rstd (g − x̂ mean(g ⊙ x̂)), g = dy ⊙ w;  dw = Σ dy ⊙ x̂.   -> dx, {"w"}"""
    xhat, rstd, w = cache
    g = dy * w
    dx = rstd * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))   # the rms depends on every x in the row
    return dx, {"w": (dy * xhat).reshape(-1, dy.shape[-1]).sum(axis=0)}


# ----------------------------------------------------------------------------- rotary position embeddings


def rotate_half(x):
    """[x₁ x₂] -> [−x₂ x₁], the halves of the last axis: a quarter turn of every pair (j, j + D/2)."""
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([-x2, x1], axis=-1)


def rope_forward(x, positions, theta=10000.0):
    """Turn each pair (x_j, x_{j+D/2}) of x[..., t, :] by the angle positions[t]·θ^(−2j/D), j < D/2.

    y = x ⊙ cos + rotate_half(x) ⊙ sin.   x (..., T, D), D even, positions (T,) -> y (..., T, D)
    A rotation is orthogonal, so (R_m q)·(R_n k) = q·R_{n−m} k: a score depends on the offset n − m only.
    """
    D = x.shape[-1]
    angles = np.outer(positions, theta ** (-np.arange(0, D, 2) / D))   # (T, D/2), computed in float64
    angles = np.concatenate([angles, angles], axis=-1)                 # pair (j, j + D/2) shares its angle
    cos, sin = np.cos(angles).astype(x.dtype), np.sin(angles).astype(x.dtype)
    return x * cos + rotate_half(x) * sin, (cos, sin)


def rope_backward(dy, cache):
    """dx = Rᵀ dy = dy ⊙ cos − rotate_half(dy) ⊙ sin: Rᵀ is R⁻¹, the turn by −angle (R is orthogonal)."""
    cos, sin = cache
    return dy * cos - rotate_half(dy) * sin


# ----------------------------------------------------------------------------- grouped-query attention


def grouped_attention_forward(q, k, v):
    """Causal attention where K/V head j serves the G query heads j·G … j·G + G − 1.   q (B,H,T,D), k, v (B,H/G,T,D)

    It is plain causal attention on K and V with each head repeated G times (G = 1: multi-head attention).
    """
    G = q.shape[1] // k.shape[1]
    y, cache = causal_attention_forward(q, np.repeat(k, G, axis=1), np.repeat(v, G, axis=1))
    return y, (cache, G)


def grouped_attention_backward(dy, cache):
    """causal_attention_backward, then dK and dV summed over the G query heads that share each K/V head
    (the transpose of repeating a head G times is summing its G copies).   -> dq (B,H,T,D), dk, dv (B,H/G,T,D)"""
    attention_cache, G = cache
    dq, dk, dv = causal_attention_backward(dy, attention_cache)
    B, H, T, D = dq.shape
    dk, dv = (d.reshape(B, H // G, G, T, D).sum(axis=2) for d in (dk, dv))
    return dq, dk, dv


# ----------------------------------------------------------------------------- SwiGLU


def swiglu_forward(g, u):
    """y = silu(g) ⊙ u, silu(g) = g σ(g): the gate projection g scales the up projection u.   g, u (..., F)"""
    s = 0.5 * (1.0 + np.tanh(0.5 * g))       # σ(g), written so that exp cannot overflow
    return g * s * u, (g, u, s)


def swiglu_backward(dy, cache):
    """dg = dy ⊙ u ⊙ σ(g)(1 + g(1 − σ(g)));  du = dy ⊙ silu(g).   -> dg, du"""
    g, u, s = cache
    return dy * u * s * (1.0 + g * (1.0 - s)), dy * g * s
