"""Muon: momentum, then the orthogonal polar factor of the update, for the matrices inside the blocks.

For each block matrix W (out × in) with gradient g:

    m ← μ m + g                                  momentum (μ = 0.95)
    u = g + μ m                                  Nesterov: the step looks one momentum step ahead
    W ← W − lr · √max(1, out/in) · polar(u)      polar(u) = U Vᵀ of u = U Σ Vᵀ: every σ set to 1

The update has the same direction in each singular subspace as u but equal size in all of them, so
the few directions a gradient is dominated by no longer drown out the rest (an SVD-level reading of
"orthogonalized updates"); √max(1, out/in) gives a tall matrix's update the per-entry size of a square
one. Embeddings and layer-norm gains (and anything not 2-D inside a block) keep AdamW, on its own
learning rate. The matrices are independent, so they are orthogonalized on a thread per core.
"""
import math

import numpy as np

from .optim import adamw_step
from .parallel import run_parallel, split_by_size, usable_cores
from .polar import METHODS, orthogonalize

OPTIMIZERS = ("adamw", "muon")


def is_muon_matrix(name, shape):
    """Muon steps every 2-D array inside a block (attention and MLP weights, or their low-rank factors)."""
    return name.startswith("transformer.h.") and len(shape) == 2


def muon_names(params):
    return [k for k, p in params.items() if is_muon_matrix(k, p.shape)]


def muon_init(params):
    """Momentum buffers for the block matrices; AdamW's moments for the rest; step 0.

    The same dict shape as adamw_init's ('t', 'm', 'v'), plus 'momentum', so checkpoints, resume and
    MPI carry it the same way."""
    matrices = set(muon_names(params))
    if not matrices:
        raise ValueError("the model has no matrices inside its blocks for Muon to step")
    rest = [k for k in params if k not in matrices]
    return {"t": 0,
            "m": {k: np.zeros_like(params[k]) for k in rest},
            "v": {k: np.zeros_like(params[k]) for k in rest},
            "momentum": {k: np.zeros_like(params[k]) for k in params if k in matrices}}


def muon_step(params, grads, state, lr, muon_lr, momentum=0.95, method="eigh", ns_steps=5, beta1=0.9,
              beta2=0.99, weight_decay=0.1, grad_scale=1.0, workers=None):
    """One step, in place: Muon on state['momentum']'s matrices at muon_lr, AdamW on the rest at lr.

    grad_scale (gradient clipping's factor) scales g as in adamw_step. Muon's matrices get no weight
    decay, as in Muon as first published (later variants add a decoupled one); --weight_decay applies
    to AdamW's matrices, the embeddings."""
    adam = {k: params[k] for k in state["m"]}
    adamw_step(adam, grads, state, lr, beta1, beta2, weight_decay=weight_decay, grad_scale=grad_scale,
               workers=workers)       # advances state['t'] too
    names = list(state["momentum"])
    workers = workers or usable_cores()
    # cost of a polar factor ≈ size × short side; one group of matrices per core
    costs = [params[k].size * min(params[k].shape) for k in names]
    groups = split_by_size(names, costs, workers) if workers > 1 else [names]
    run_parallel(lambda group: _muon_update(params, grads, state["momentum"], group, muon_lr, momentum,
                                            method, ns_steps, grad_scale), [(g,) for g in groups if g])


def _muon_update(params, grads, buffers, names, lr, mu, method, ns_steps, grad_scale):
    for name in names:
        W, m = params[name], buffers[name]
        g = grads[name] * grad_scale if grad_scale != 1.0 else grads[name]
        m *= mu
        m += g                                   # m ← μ m + g
        u = g + mu * m                           # Nesterov
        Q = orthogonalize(u, method, ns_steps)
        rows, cols = W.shape
        W -= (lr * math.sqrt(max(1.0, rows / cols))) * Q.astype(W.dtype, copy=False)


def check_muon_args(optimizer, muon_lr, muon_momentum, ns_steps, orthogonalize_method):
    """The reason the Muon settings cannot work, or None."""
    if optimizer not in OPTIMIZERS:
        return f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}"
    if not (np.isfinite(muon_lr) and muon_lr > 0):
        return f"--muon_lr must be a finite number > 0, got {muon_lr}"
    if not 0.0 <= muon_momentum < 1.0:
        return f"--muon_momentum must be in [0, 1), got {muon_momentum}"
    if ns_steps < 1:
        return f"--ns_steps must be at least 1, got {ns_steps}"
    if orthogonalize_method not in METHODS:
        return f"--orthogonalize must be one of {', '.join(METHODS)}, got {orthogonalize_method!r}"
    return None
