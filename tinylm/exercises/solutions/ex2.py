"""Exercise 2: layer norm, forward and backward."""
import numpy as np


def layernorm_forward(x, w, b, eps=1e-5):
    """y = (x − μ)/√(σ² + ε) ⊙ w + b, μ and σ² over the last axis.   x (..., C), w (C,), b (C,)"""
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return xhat * w + b


def layernorm_backward(dy, x, w, eps=1e-5):
    """dx = (g − mean(g) − x̂ mean(g ⊙ x̂)) / √(σ² + ε) with g = dy ⊙ w;  dw = Σ dy ⊙ x̂;  db = Σ dy."""
    rstd = 1.0 / np.sqrt(x.var(-1, keepdims=True) + eps)
    xhat = (x - x.mean(-1, keepdims=True)) * rstd
    g = dy * w
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    C = x.shape[-1]
    dw = (dy * xhat).reshape(-1, C).sum(0)          # summed over every position
    db = dy.reshape(-1, C).sum(0)
    return dx, dw, db
