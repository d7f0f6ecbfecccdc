"""Every layer of tinylm/core/layers.py: its forward against the math written another way, and its backward
against central finite differences in float64."""
import math

import numpy as np
import pytest

from tinylm.cli import gradcheck
from tinylm.core import layers as L

EPS = 1e-6          # finite-difference step: truncation error ~EPS², rounding ~1e-16/EPS
TOL = 1e-7


def rel_error(a, b):
    """max|a − b| / max|b|."""
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def numerical_grad(f, x):
    """∂f/∂x by central differences, one entry of x at a time: the package's own checker (cli/gradcheck.py)."""
    return gradcheck.numerical_gradient(f, x, eps=EPS)


def weighted_sum(forward, R):
    """The scalar Σ out ⊙ R, whose gradient with respect to out is R: a random direction for the backward."""
    return lambda: float(np.sum(forward() * R))


def test_embedding_backward():
    rng = np.random.default_rng(0)
    idx = np.array([[1, 3, 1, 0], [3, 3, 2, 1]])              # repeated tokens: their rows must add up
    wte, wpe = rng.standard_normal((5, 3)), rng.standard_normal((6, 3))
    x, cache = L.embedding_forward(idx, wte, wpe)
    np.testing.assert_array_equal(x[1, 2], wte[2] + wpe[2])
    R = rng.standard_normal(x.shape)
    grads = L.embedding_backward(R, cache)
    f = weighted_sum(lambda: L.embedding_forward(idx, wte, wpe)[0], R)
    assert rel_error(grads["wte"], numerical_grad(f, wte)) < TOL
    assert rel_error(grads["wpe"], numerical_grad(f, wpe)) < TOL
    assert not grads["wte"][4].any() and not grads["wpe"][4:].any()   # unused token, positions past T


@pytest.mark.parametrize("bias", [False, True])
def test_linear(bias):
    rng = np.random.default_rng(1)
    x, W = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4))
    b = rng.standard_normal(5) if bias else None
    y, cache = L.linear_forward(x, W, b)
    np.testing.assert_allclose(y, np.einsum("bti,oi->bto", x, W) + (b if bias else 0.0), rtol=1e-14)
    R = rng.standard_normal(y.shape)
    dx, grads = L.linear_backward(R, cache)
    f = weighted_sum(lambda: L.linear_forward(x, W, b)[0], R)
    assert rel_error(dx, numerical_grad(f, x)) < TOL
    assert rel_error(grads["W"], numerical_grad(f, W)) < TOL
    assert set(grads) == ({"W", "b"} if bias else {"W"})
    if bias:
        assert rel_error(grads["b"], numerical_grad(f, b)) < TOL


@pytest.mark.parametrize("bias", [False, True])
def test_layernorm(bias):
    rng = np.random.default_rng(2)
    x = 3.0 + 2.0 * rng.standard_normal((2, 3, 6))
    w = rng.standard_normal(6)
    b = rng.standard_normal(6) if bias else None
    y, cache = L.layernorm_forward(x, np.ones(6))
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-14)
    np.testing.assert_allclose((y ** 2).mean(-1), x.var(-1) / (x.var(-1) + 1e-5), rtol=1e-14)   # ε = 1e-5
    y, cache = L.layernorm_forward(x, w, b)
    R = rng.standard_normal(y.shape)
    dx, grads = L.layernorm_backward(R, cache)
    f = weighted_sum(lambda: L.layernorm_forward(x, w, b)[0], R)
    assert rel_error(dx, numerical_grad(f, x)) < TOL
    assert rel_error(grads["w"], numerical_grad(f, w)) < TOL
    assert set(grads) == ({"w", "b"} if bias else {"w"})
    if bias:
        assert rel_error(grads["b"], numerical_grad(f, b)) < TOL


def fast_layers():
    """The fast path's layers module, wherever the reorganization has put it."""
    try:
        from tinylm.fast import layers
    except ImportError:
        from tinylm import layers
    return layers


def test_gelu():
    rng = np.random.default_rng(3)
    x = 3.0 * rng.standard_normal((4, 7))
    y, cache = L.gelu_forward(x)
    by_hand = [0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))) for v in x.flat]
    np.testing.assert_allclose(y.ravel(), by_hand, rtol=1e-14, atol=1e-300)
    # the fast path's x σ(2u) is the same function; only in the far negative tail, where 1 + tanh u cancels
    # to 0 and σ(2u) keeps a value near 1e-19, do the two differ, by far less than 1e-16
    np.testing.assert_allclose(y, fast_layers().gelu_forward(x)[0], rtol=1e-13, atol=1e-16)
    R = rng.standard_normal(x.shape)
    dx = L.gelu_backward(R, cache)
    assert rel_error(dx, numerical_grad(weighted_sum(lambda: L.gelu_forward(x)[0], R), x)) < TOL


def attention_by_loops(qkv, n_head):
    """The attention output written one sequence, head and query at a time."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    y = np.zeros((B, T, C))
    for b in range(B):
        for h in range(n_head):
            cols = slice(h * D, (h + 1) * D)
            q, k, v = qkv[b, :, cols], qkv[b, :, C:][:, cols], qkv[b, :, 2 * C:][:, cols]
            for t in range(T):
                s = k[:t + 1] @ q[t] / math.sqrt(D)          # keys 0 … t only
                a = np.exp(s - s.max())
                y[b, t, cols] = (a / a.sum()) @ v[:t + 1]
    return y


def test_attention_forward():
    rng = np.random.default_rng(4)
    qkv = rng.standard_normal((2, 5, 3 * 6))
    y, cache = L.attention_forward(qkv, n_head=3)
    np.testing.assert_allclose(y, attention_by_loops(qkv, 3), rtol=1e-13, atol=1e-14)
    att = cache[3]
    assert att.shape == (2, 3, 5, 5)
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-14)
    future = np.triu(np.ones((5, 5), dtype=bool), k=1)
    assert np.all(att[..., future] == 0.0) and np.all(att[..., ~future] > 0.0)     # no weight on the future
    changed = qkv.copy()
    changed[:, 3:] = rng.standard_normal(changed[:, 3:].shape)       # later tokens cannot change earlier outputs
    np.testing.assert_array_equal(L.attention_forward(changed, 3)[0][:, :3], y[:, :3])


@pytest.mark.parametrize("n_head", [1, 2])
def test_attention_backward(n_head):
    rng = np.random.default_rng(5)
    qkv = rng.standard_normal((2, 4, 3 * 4))
    y, cache = L.attention_forward(qkv, n_head)
    R = rng.standard_normal(y.shape)
    dqkv = L.attention_backward(R, cache)
    assert dqkv.shape == qkv.shape
    assert rel_error(dqkv, numerical_grad(weighted_sum(lambda: L.attention_forward(qkv, n_head)[0], R), qkv)) < TOL


def test_cross_entropy():
    rng = np.random.default_rng(6)
    targets = rng.integers(0, 7, size=(2, 3))
    loss, _ = L.cross_entropy_forward(np.full((2, 3, 7), 0.3), targets)
    assert abs(loss - math.log(7)) < 1e-14                                       # uniform logits: log V
    logits = 4.0 * rng.standard_normal((2, 3, 7))
    loss, cache = L.cross_entropy_forward(logits, targets)
    by_hand = np.mean([math.log(np.exp(logits[b, t]).sum()) - logits[b, t, targets[b, t]]
                       for b in range(2) for t in range(3)])
    assert abs(loss - by_hand) < 1e-14
    dlogits = L.cross_entropy_backward(2.5, cache)                                # dloss scales the gradient
    numerical = numerical_grad(lambda: 2.5 * L.cross_entropy_forward(logits, targets)[0], logits)
    assert rel_error(dlogits, numerical) < TOL
