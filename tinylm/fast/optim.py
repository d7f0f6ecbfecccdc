"""core/optim.py's AdamW and core/muon.py's Muon, fast: fewer passes over memory, a thread per core.

AdamW's update is the same function as core's (tests/test_optim.py holds them equal to rounding), with
the bias corrections and clipping's factor folded into a few constants (adamw_constants) so that a
parameter costs one scratch array and no other temporaries. The parameters are independent, so each step
deals them to `workers` threads (default: one per core); Muon's matrices run core's own muon_update.
"""
import math

import numpy as np

from tinylm.core.muon import muon_update
from tinylm.core.optim import decays
from tinylm.fast.parallel import for_each_split, run_parallel, split_by_size, usable_cores


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


def adamw_step(params, grads, state, lr, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, workers=None,
               grad_scale=1.0):
    """core.optim.adamw_step with the parameters split into `workers` groups, one thread each."""
    state["t"] += 1
    constants = adamw_constants(state["t"], lr, beta1, beta2, eps, weight_decay, grad_scale)

    def update(names):
        for name in names:
            p = params[name]
            adamw_update(p, grads[name], state["m"][name], state["v"][name], decays(p), **constants)
    for_each_split(update, params, workers=workers)


def muon_step(params, grads, state, lr, muon_lr, momentum=0.95, method="eigh", ns_steps=5, beta1=0.9,
              beta2=0.99, weight_decay=0.1, grad_scale=1.0, workers=None):
    """core.muon.muon_step with AdamW's part threaded as above and the matrices dealt to a thread per core,
    balanced by the cost of a polar factor (≈ size × short side)."""
    adam = {k: params[k] for k in state["m"]}
    adamw_step(adam, grads, state, lr, beta1, beta2, weight_decay=weight_decay, grad_scale=grad_scale,
               workers=workers)       # advances state['t'] too
    names = list(state["momentum"])
    workers = workers or usable_cores()
    costs = [params[k].size * min(params[k].shape) for k in names]
    groups = split_by_size(names, costs, workers) if workers > 1 else [names]

    def update(group):
        for name in group:
            g = grads[name] * grad_scale if grad_scale != 1.0 else grads[name]
            muon_update(params[name], g, state["momentum"][name], muon_lr, momentum, method, ns_steps)
    run_parallel(update, [(g,) for g in groups if g])
