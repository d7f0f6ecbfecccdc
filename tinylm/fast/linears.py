"""The two other forms of a linear layer the fast model dispatches to, each a forward/backward pair like fast/layers.py's.

- factorized, y = (x Bᵀ) Aᵀ + b with W ≈ A B (name.weight_A, name.weight_B; lowrank/factorized.py and
  lowrank/compress.py make them);
- with a low-rank adapter, y = x Wᵀ + (x Aᵀ) Bᵀ + b with W frozen (name.lora_A, name.lora_B;
  lowrank/adapters.py makes them).

Both are held equal to core's dense linear layer on the matrix they stand for (tests/test_core_model.py).
"""
import numpy as np


def lowrank_forward(x, A, B, b=None):
    """y = (x Bᵀ) Aᵀ + b.   x (..., in), A (out, r), B (r, in), b (out,) or None -> y (..., out)"""
    x2 = x.reshape(-1, x.shape[-1])
    h = x2 @ B.T                               # (N, r): the input in the r-dimensional basis of B's rows
    y = h @ A.T
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], A.shape[0]), (x, A, B, h, b is not None)


def lowrank_backward(dy, cache):
    """dh = dy A;  dx = dh B;  dA = dyᵀ h;  dB = dhᵀ x  (h = x Bᵀ, sums over every leading axis);  db = Σ dy."""
    x, A, B, h, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    dh = dy2 @ A                               # (N, r)
    dx = (dh @ B).reshape(x.shape)
    grads = {"A": dy2.T @ h, "B": dh.T @ x2}
    if has_bias:
        grads["b"] = dy2.sum(axis=0)
    return dx, grads


def lora_linear_forward(x, W, A, B, b=None):
    """y = x Wᵀ + (x Aᵀ) Bᵀ + b, W frozen.   x (..., in), W (out, in), A (R, in), B (out, R) -> y (..., out)"""
    x2 = x.reshape(-1, x.shape[-1])
    h = x2 @ A.T                             # (N, R): the input along the adapter's R directions
    y = x2 @ W.T
    y += h @ B.T
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], W.shape[0]), (x, W, A, B, h, b is not None)


def lora_linear_backward(dy, cache):
    """dx = dy W + (dy B) A;  dA = (dy B)ᵀ x;  dB = dyᵀ (x Aᵀ);  db = Σ dy;  no dW (W is frozen)."""
    x, W, A, B, h, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    dy_B = dy2 @ B                           # (N, R)
    dx = dy2 @ W
    dx += dy_B @ A
    grads = {"lora_A": dy_B.T @ x2, "lora_B": dy2.T @ h}
    if has_bias:
        grads["b"] = dy2.sum(axis=0)
    return dx.reshape(x.shape), grads
