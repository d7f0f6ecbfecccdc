"""Exercise 2: layer norm, forward and backward, through the gradient check (tinylm/exercises/README.md).

Grade it with: python -m tinylm.exercises check 2
"""
import numpy as np


def layernorm_forward(x, w, b, eps=1e-5):
    """y = (x − μ)/√(σ² + ε) ⊙ w + b, μ and σ² the mean and variance over the last axis.   x (..., C), w (C,), b (C,)"""
    raise NotImplementedError("layernorm_forward")


def layernorm_backward(dy, x, w, eps=1e-5):
    """(dx, dw, db) for dy = dL/dy of the shape of x; dw and db are (C,), summed over every position."""
    raise NotImplementedError("layernorm_backward")
