"""Muon: momentum, then the orthogonal polar factor of the update, for the matrices inside the blocks.

For each block matrix W (out × in) with gradient g:

    m ← μ m + g                                  momentum (μ = 0.95)
    u = g + μ m                                  Nesterov: the step looks one momentum step ahead
    W ← W − lr · √max(1, out/in) · polar(u)      polar(u) = U Vᵀ of u = U Σ Vᵀ: every σ set to 1

The update has the same direction in each singular subspace as u but equal size in all of them, so
the few directions a gradient is dominated by no longer drown out the rest (an SVD-level reading of
"orthogonalized updates"); with √max(1, out/in) every update's entries have root mean square
lr/√in, whatever the matrix's shape. Embeddings, the head and the norms' gains (anything not 2-D inside
a block) keep AdamW, on its own learning rate. Which matrices are inside a block is the model's rule
(gpt2's or llama's is_block_matrix): for a Llama, the seven of each layer, q, k, v, o, gate, up and down.
fast/optim.py deals the matrices to a thread per core.
"""
import math

import numpy as np

from tinylm.core import gpt2
from tinylm.core.optim import adamw_step
from tinylm.core.polar import orthogonalize


def muon_names(params, is_block_matrix=gpt2.is_block_matrix):
    """The parameters Muon steps: every 2-D array inside a block (or a block matrix's low-rank factors), by the
    model's rule is_block_matrix(name, shape): GPT-2's by default, core/llama.py's for a Llama."""
    return [k for k, p in params.items() if is_block_matrix(k, p.shape)]


def muon_init(params, is_block_matrix=gpt2.is_block_matrix):
    """Momentum buffers for the block matrices; AdamW's moments for the rest; step 0.

    The same dict shape as adamw_init's ('t', 'm', 'v'), plus 'momentum', so checkpoints, resume and
    MPI carry it the same way."""
    matrices = set(muon_names(params, is_block_matrix))
    if not matrices:
        raise ValueError("the model has no matrices inside its blocks for Muon to step")
    rest = [k for k in params if k not in matrices]
    return {"t": 0,
            "m": {k: np.zeros_like(params[k]) for k in rest},
            "v": {k: np.zeros_like(params[k]) for k in rest},
            "momentum": {k: np.zeros_like(params[k]) for k in params if k in matrices}}


def muon_update(W, g, m, lr, mu, method="eigh", ns_steps=5):
    """One matrix's step, in place: m ← μ m + g;  W ← W − lr·√max(1, out/in)·polar(g + μ m)."""
    m *= mu
    m += g
    Q = orthogonalize(g + mu * m, method, ns_steps)
    rows, cols = W.shape
    W -= (lr * math.sqrt(max(1.0, rows / cols))) * Q.astype(W.dtype, copy=False)


def muon_step(params, grads, state, lr, muon_lr, momentum=0.95, method="eigh", ns_steps=5, beta1=0.9,
              beta2=0.99, weight_decay=0.1, grad_scale=1.0):
    """One step, in place: Muon on state['momentum']'s matrices at muon_lr, AdamW on the rest at lr.

    grad_scale (gradient clipping's factor) scales g as in adamw_step. Muon's matrices get no weight
    decay, as in Muon as first published (later variants add a decoupled one); --weight_decay applies
    to AdamW's parameters."""
    adam = {k: params[k] for k in state["m"]}
    adamw_step(adam, grads, state, lr, beta1, beta2, weight_decay=weight_decay, grad_scale=grad_scale)
    for name, m in state["momentum"].items():
        g = grads[name] * grad_scale if grad_scale != 1.0 else grads[name]
        muon_update(params[name], g, m, muon_lr, momentum, method, ns_steps)
