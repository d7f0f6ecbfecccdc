"""AdamW, the learning-rate schedule, and gradient clipping by global L2 norm."""
import math

import numpy as np


def learning_rate_at(step, learning_rate, min_lr, warmup_iters, lr_decay_iters):
    """Linear warmup for warmup_iters steps, then cosine decay to min_lr at lr_decay_iters (nanoGPT's schedule)."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / (warmup_iters + 1)
    if step > lr_decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def global_norm(grads):
    """‖g‖₂ over every entry of every gradient, as if they were one long vector."""
    return math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))


def clip_factor(norm, max_norm):
    """The factor that brings a gradient of norm ‖g‖₂ = norm down to max_norm: max_norm/‖g‖₂ if it is
    larger (and max_norm > 0), else 1."""
    return max_norm / (norm + 1e-6) if max_norm > 0 and norm > max_norm else 1.0


def clip_by_global_norm(grads, max_norm):
    """Scale every gradient by clip_factor(‖g‖₂, max_norm), in place. Returns ‖g‖₂ before clipping.

    (The training step passes the factor to adamw_step as grad_scale instead: the same update
    without a pass over the gradients of its own.)
    """
    norm = global_norm(grads)
    scale = clip_factor(norm, max_norm)
    if scale != 1.0:
        for g in grads.values():
            g *= scale
    return norm


def adamw_init(params):
    """Zero first and second moments for every parameter, and step 0."""
    return {"m": {k: np.zeros_like(p) for k, p in params.items()},
            "v": {k: np.zeros_like(p) for k, p in params.items()},
            "t": 0}


def decays(p):
    """Weight decay applies to matrices (linear weights and embeddings), not to biases or norm gains."""
    return p.ndim >= 2


def adamw_step(params, grads, state, lr, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, grad_scale=1.0):
    """One AdamW step, in place: θ ← θ(1 − lr·wd) − lr·m̂/(√v̂ + ε), m and v the moving means of g and g².

    g is grad_scale × grads (clipping's factor; grads are not changed). fast/optim.py computes the same
    update with fewer passes over memory, on a thread per core.
    """
    state["t"] += 1
    t = state["t"]
    for name, p in params.items():
        g = grads[name] * grad_scale
        m, v = state["m"][name], state["v"][name]
        m *= beta1
        m += (1.0 - beta1) * g                   # m ← β₁ m + (1 − β₁) g
        v *= beta2
        v += (1.0 - beta2) * g * g               # v ← β₂ v + (1 − β₂) g²
        m_hat = m / (1.0 - beta1 ** t)           # both means start at 0: divide out that bias
        v_hat = v / (1.0 - beta2 ** t)
        if decays(p):
            p *= 1.0 - lr * weight_decay         # decoupled: shrinks θ, not added to g
        p -= lr * m_hat / (np.sqrt(v_hat) + eps)
