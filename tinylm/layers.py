"""The layers of GPT-2, each as a forward/backward pair.

Every `*_forward` returns `(out, cache)`; every `*_backward(dout, cache)` returns the
gradient with respect to the input(s) and, for layers with weights, a dict of
parameter gradients. Shapes: B batch, T time, C channels, V vocabulary, H heads,
D = C / H head size. All functions work in whatever float dtype they are given.
"""
import math

import numpy as np

# ----------------------------------------------------------------------------- embedding


def embedding_forward(idx, wte, wpe):
    """x[b,t] = wte[idx[b,t]] + wpe[t].   idx (B,T) ints, wte (V,C), wpe (block,C) -> x (B,T,C)"""
    T = idx.shape[1]
    x = wte[idx] + wpe[:T]
    return x, (idx, wte.shape, wpe.shape)


def embedding_backward(dx, cache):
    """dwte[v] = Σ_{b,t: idx[b,t]=v} dx[b,t];  dwpe[t] = Σ_b dx[b,t]."""
    idx, wte_shape, wpe_shape = cache
    C = dx.shape[-1]
    dwte = np.zeros(wte_shape, dtype=dx.dtype)
    np.add.at(dwte, idx.reshape(-1), dx.reshape(-1, C))   # scatter-add: a token may repeat
    dwpe = np.zeros(wpe_shape, dtype=dx.dtype)
    dwpe[: idx.shape[1]] = dx.sum(axis=0)
    return {"wte": dwte, "wpe": dwpe}


# ----------------------------------------------------------------------------- linear


def linear_forward(x, W, b=None):
    """y = x Wᵀ + b.   x (..., in), W (out, in), b (out,) or None -> y (..., out)"""
    x2 = x.reshape(-1, x.shape[-1])          # one 2-D matmul: BLAS is fastest on it
    y = x2 @ W.T
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], W.shape[0]), (x, W, b is not None)


def linear_backward(dy, cache):
    """dx = dy W;  dW = dyᵀ x summed over every leading axis;  db = Σ dy."""
    x, W, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    dx = (dy2 @ W).reshape(x.shape)
    grads = {"W": dy2.T @ x2}
    if has_bias:
        grads["b"] = dy2.sum(axis=0)
    return dx, grads


# ----------------------------------------------------------------------------- layer norm


def layernorm_forward(x, w, b=None, eps=1e-5):
    """y = (x − μ)/√(σ² + ε) ⊙ w + b, μ and σ² over the last axis.   x (..., C), w (C,), b (C,) -> y (..., C)"""
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = np.mean(xc * xc, axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = xc * rstd
    y = xhat * w
    if b is not None:
        y += b
    return y, (xhat, rstd, w, b is not None)


def layernorm_backward(dy, cache):
    """dx = rstd (g − mean(g) − x̂ mean(g ⊙ x̂)) with g = dy ⊙ w;  dw = Σ dy ⊙ x̂;  db = Σ dy."""
    xhat, rstd, w, has_bias = cache
    g = dy * w
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * np.mean(g * xhat, axis=-1, keepdims=True))
    C = dy.shape[-1]
    grads = {"w": np.einsum("nc,nc->c", dy.reshape(-1, C), xhat.reshape(-1, C), optimize=True)}
    if has_bias:
        grads["b"] = dy.reshape(-1, C).sum(axis=0)
    return dx, grads


# ----------------------------------------------------------------------------- GELU

GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


def gelu_forward(x):
    """y = ½ x (1 + tanh(√(2/π) (x + 0.044715 x³))), GPT-2's tanh approximation.   any shape"""
    t = np.tanh(GELU_SCALE * (x + GELU_CUBIC * x * x * x))
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_backward(dy, cache):
    """dx = dy (½(1 + t) + ½ x (1 − t²) √(2/π) (1 + 3·0.044715 x²)),  t the forward's tanh."""
    x, t = cache
    dtanh_arg = GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x * x)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dtanh_arg)


# ----------------------------------------------------------------------------- dropout


def dropout_forward(x, p, rng=None):
    """y = x ⊙ m / (1 − p), m ~ Bernoulli(1 − p).   any shape; the identity when p = 0 or rng is None"""
    if p == 0.0 or rng is None:
        return x, None
    scaled_mask = (rng.random(x.shape, dtype=np.float32) >= p).astype(x.dtype) / (1.0 - p)
    return x * scaled_mask, scaled_mask


def dropout_backward(dy, cache):
    """dx = dy ⊙ m / (1 − p)."""
    return dy if cache is None else dy * cache


# ----------------------------------------------------------------------------- residual


def residual_forward(x, fx):
    """y = x + f(x).   x, fx (B,T,C) -> y (B,T,C)"""
    return x + fx, None


def residual_backward(dy, cache):
    """dx = dy and dfx = dy: the sum passes its gradient unchanged to both branches."""
    return dy, dy


# ----------------------------------------------------------------------------- attention


def split_heads(x, n_head):
    """(B,T,C) -> (B,H,T,D)."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B,H,T,D) -> (B,T,C)."""
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def causal_softmax(scores, offset=0):
    """Row-wise softmax of scores (..., Tq, Tk) where query i may see keys j ≤ i + offset."""
    Tq, Tk = scores.shape[-2:]
    future = np.arange(Tk)[None, :] > np.arange(Tq)[:, None] + offset
    scores = np.where(future, -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)   # exp never overflows
    e = np.exp(scores)
    return e / e.sum(axis=-1, keepdims=True)


def attention_forward(qkv, n_head, dropout=0.0, rng=None):
    """y = softmax(Q Kᵀ/√D + causal mask) V per head.   qkv (B,T,3C) -> y (B,T,C)"""
    C = qkv.shape[-1] // 3
    q, k, v = (split_heads(part, n_head) for part in np.split(qkv, 3, axis=-1))
    scale = 1.0 / math.sqrt(C // n_head)
    att = causal_softmax((q @ k.transpose(0, 1, 3, 2)) * scale)        # (B,H,T,T), rows sum to 1
    att_dropped, drop_cache = dropout_forward(att, dropout, rng)
    y = merge_heads(att_dropped @ v)
    return y, (q, k, v, att, att_dropped, drop_cache, scale)


def attention_backward(dy, cache):
    """dV = Aᵀ dY;  dA = dY Vᵀ;  dS = A ⊙ (dA − Σ_j dA ⊙ A);  dQ = dS K/√D;  dK = dSᵀ Q/√D."""
    q, k, v, att, att_dropped, drop_cache, scale = cache
    n_head = q.shape[1]
    dy = split_heads(dy, n_head)
    dv = att_dropped.transpose(0, 1, 3, 2) @ dy
    datt = dropout_backward(dy @ v.transpose(0, 1, 3, 2), drop_cache)
    dscores = att * (datt - np.sum(datt * att, axis=-1, keepdims=True))   # masked entries have att = 0
    dq = (dscores @ k) * scale
    dk = (dscores.transpose(0, 1, 3, 2) @ q) * scale
    return np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)


# ----------------------------------------------------------------------------- loss


def cross_entropy_forward(logits, targets):
    """loss = −mean log softmax(logits)[target].   logits (B,T,V), targets (B,T) ints -> scalar"""
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    sum_e = e.sum(axis=1, keepdims=True)
    t = targets.reshape(-1)
    rows = np.arange(t.size)
    loss = float(np.mean(np.log(sum_e[:, 0]) - z[rows, t]))
    probs = e / sum_e
    return loss, (probs, t, logits.shape)


def cross_entropy_backward(dloss, cache):
    """dlogits = (softmax(logits) − onehot(target)) · dloss / N,  N = B·T."""
    probs, t, shape = cache
    dlogits = probs.copy()
    dlogits[np.arange(t.size), t] -= 1.0
    dlogits *= dloss / t.size
    return dlogits.reshape(shape)
