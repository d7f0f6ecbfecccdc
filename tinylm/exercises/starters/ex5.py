"""Exercise 5: compress a matrix by truncated SVD; its error by Eckart–Young (tinylm/exercises/README.md).

Grade it with: python -m tinylm.exercises check 5      (add --ckpt out/ckpt.npz to compress your model)
"""
import numpy as np


def truncated_svd(W, r):
    """(A, B), A (m, r) and B (r, n), with A B the best rank-r approximation of W (m, n) in the Frobenius norm."""
    raise NotImplementedError("truncated_svd")


def eckart_young_error(s, r):
    """‖W − W_r‖_F from W's singular values s (descending) alone: a number."""
    raise NotImplementedError("eckart_young_error")
