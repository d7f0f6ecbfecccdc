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


def decays(name, p):
    """Weight decay applies to matrices (linear weights and embeddings), not to biases or layer-norm gains."""
    return p.ndim >= 2


def adamw_constants(t, lr, beta1, beta2, eps, weight_decay, grad_scale):
    """The numbers adamw_update needs at step t (1, 2, …), worked out once for every parameter.

    With b₁ = 1 − β₁ᵗ, b₂ = 1 − β₂ᵗ, m̂/(√v̂ + ε) = (m/b₁)/(√v/√b₂ + ε) = (√b₂/b₁)·m/(√v + ε√b₂): the bias
    corrections become one step size and one ε. g is grad_scale × grads (clipping's factor), folded into
    the moments' constants: c₁ = (1 − β₁)·s, c₂ = (1 − β₂)·s².
    """
    bias1 = 1.0 - beta1 ** t
    root_bias2 = math.sqrt(1.0 - beta2 ** t)
    return dict(beta1=beta1, beta2=beta2, c1=(1.0 - beta1) * grad_scale, c2=(1.0 - beta2) * grad_scale ** 2,
                eps=eps * root_bias2, step_size=lr * root_bias2 / bias1, decay=1.0 - lr * weight_decay)


def adamw_step(params, grads, state, lr, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, grad_scale=1.0):
    """One AdamW step, in place: θ ← θ(1 − lr·wd) − lr·m̂/(√v̂ + ε), m, v the moving moments of g and g².

    g is grad_scale × grads (grads are not changed). fast/optim.py runs the same update on a thread per core.
    """
    state["t"] += 1
    constants = adamw_constants(state["t"], lr, beta1, beta2, eps, weight_decay, grad_scale)
    for name in params:
        adamw_update(params[name], grads[name], state["m"][name], state["v"][name], decays(name, params[name]),
                     **constants)


def adamw_update(p, g, m, v, decay_it, beta1, beta2, c1, c2, eps, step_size, decay):
    """One parameter's AdamW update, in place, with adamw_constants' numbers (one scratch array, no other temporaries)."""
    scratch = np.multiply(g, c1)
    m *= beta1
    m += scratch                            # m ← β₁ m + (1 − β₁) g
    np.multiply(g, g, out=scratch)
    scratch *= c2
    v *= beta2
    v += scratch                            # v ← β₂ v + (1 − β₂) g²
    if decay != 1.0 and decay_it:
        p *= decay                          # decoupled: shrinks θ, not added to g
    np.sqrt(v, out=scratch)
    scratch += eps
    np.divide(m, scratch, out=scratch)
    scratch *= step_size
    p -= scratch                            # θ ← θ − lr·m̂/(√v̂ + ε)
