"""Exercise 1: softmax over the last axis, stable, and its backward (tinylm/exercises/README.md).

Grade it with: python -m tinylm.exercises check 1
"""
import numpy as np


def softmax(z):
    """y = exp(z) / Σ exp(z) over the last axis, for any shape (..., n); must not overflow for z of size 1000."""
    raise NotImplementedError("softmax")


def softmax_backward(dy, y):
    """dz given dy = dL/dy and y = softmax(z), both (..., n): the Jacobian of softmax applied to dy."""
    raise NotImplementedError("softmax_backward")
