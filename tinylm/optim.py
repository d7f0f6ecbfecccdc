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


def clip_by_global_norm(grads, max_norm):
    """Scale every gradient by min(1, max_norm/‖g‖₂), in place. Returns ‖g‖₂ before clipping."""
    norm = global_norm(grads)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= scale
    return norm


def adamw_init(params):
    """Zero first and second moments for every parameter, and step 0."""
    return {"m": {k: np.zeros_like(p) for k, p in params.items()},
            "v": {k: np.zeros_like(p) for k, p in params.items()},
            "t": 0}


def decays(name, p):
    """Weight decay applies to matrices (linear weights and embeddings), not to biases or layer-norm gains."""
    return p.ndim >= 2


def adamw_step(params, grads, state, lr, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, workers=None):
    """One AdamW step, in place: θ ← θ(1 − lr·wd) − lr·m̂/(√v̂ + ε), m, v the moving moments of g and g².

    Written with `out=` so that each parameter costs one scratch buffer and no other temporaries;
    m̂/(√v̂ + ε) is computed as (m/(1 − β₁ᵗ)) / (√v/√(1 − β₂ᵗ) + ε). The parameters are independent,
    so large models update them in `workers` groups on as many threads (default: one per core).
    """
    from .parallel import for_each_split
    state["t"] += 1
    t = state["t"]
    bias1 = 1.0 - beta1 ** t
    bias2 = 1.0 - beta2 ** t
    step_size = lr / bias1
    for_each_split(lambda names: _adamw_update(params, grads, state, names, lr, beta1, beta2, eps, weight_decay,
                                               bias2, step_size), params, workers=workers)


def _adamw_update(params, grads, state, names, lr, beta1, beta2, eps, weight_decay, bias2, step_size):
    """adamw_step's update of the parameters `names`."""
    for name in names:
        p = params[name]
        g, m, v = grads[name], state["m"][name], state["v"][name]
        scratch = np.multiply(g, 1.0 - beta1)
        m *= beta1
        m += scratch                            # m ← β₁ m + (1 − β₁) g
        np.multiply(g, g, out=scratch)
        scratch *= 1.0 - beta2
        v *= beta2
        v += scratch                            # v ← β₂ v + (1 − β₂) g²
        if weight_decay and decays(name, p):
            p *= 1.0 - lr * weight_decay        # decoupled: shrinks θ, not added to g
        np.sqrt(v, out=scratch)
        scratch *= 1.0 / math.sqrt(bias2)
        scratch += eps
        np.divide(m, scratch, out=scratch)
        scratch *= step_size
        p -= scratch
