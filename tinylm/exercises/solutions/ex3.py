"""Exercise 3: causal self-attention, softmax(Q Kᵀ/√D + mask) V, per head."""
import numpy as np


def attention_weights(q, k):
    """A = softmax(Q Kᵀ/√D + mask), mask −∞ above the diagonal.   q, k (B,H,T,D) -> (B,H,T,T)"""
    T, D = q.shape[-2], q.shape[-1]
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(D)
    scores = scores + np.triu(np.full((T, T), -np.inf), k=1)       # token t sees tokens ≤ t
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def causal_attention(q, k, v):
    """y = A V.   q, k, v (B,H,T,D) -> (B,H,T,D)"""
    return attention_weights(q, k) @ v
