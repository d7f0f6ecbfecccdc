"""Exercise 8: zero-ablate one attention head and measure what the loss loses."""
import numpy as np

from tinylm.fast import model as M


def ablate_head(params, config, layer, head):
    """A copy of params in which head h of block `layer` writes nothing: c_proj maps the joined heads
    [y_0 … y_{H−1}] to the residual stream, so y_h enters only through columns h·D … (h+1)·D of W_O."""
    D = config.n_embd // config.n_head
    P = dict(params)                                          # a new dict; only one array is replaced
    name = f"transformer.h.{layer}.attn.c_proj.weight"
    W = P[name].copy()
    W[:, head * D:(head + 1) * D] = 0.0
    P[name] = W
    return P


def loss_changes(params, config, idx, targets):
    """Δ[l, h] = loss(head h of block l zeroed) − loss, every head.   -> (n_layer, n_head)"""
    loss = lambda P: M.forward(P, config, idx, targets, for_backward=False)[1]
    clean = loss(params)
    return np.array([[loss(ablate_head(params, config, l, h)) - clean for h in range(config.n_head)]
                     for l in range(config.n_layer)])
