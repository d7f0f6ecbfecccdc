"""Exercise 3: causal self-attention per head (tinylm/exercises/README.md).

Grade it with: python -m tinylm.exercises check 3
"""
import numpy as np


def attention_weights(q, k):
    """A = softmax(Q Kᵀ/√D + mask) over the last axis, the mask −∞ where the key comes after the query.
    q, k (B,H,T,D) -> (B,H,T,T)"""
    raise NotImplementedError("attention_weights")


def causal_attention(q, k, v):
    """y = A V per head.   q, k, v (B,H,T,D) -> (B,H,T,D)"""
    raise NotImplementedError("causal_attention")
