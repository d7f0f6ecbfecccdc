"""Exercise 8: zero-ablate an attention head and measure the loss (tinylm/exercises/README.md).

Grade it with: python -m tinylm.exercises check 8      (add --ckpt out/ckpt.npz for your own model)
"""
import numpy as np

from tinylm.fast import model as M


def ablate_head(params, config, layer, head):
    """A new params dict in which head `head` of block `layer` contributes nothing to the residual stream.
    params itself must stay unchanged."""
    raise NotImplementedError("ablate_head")


def loss_changes(params, config, idx, targets):
    """(n_layer, n_head) array: loss with that head ablated − loss of the intact model, on idx -> targets."""
    raise NotImplementedError("loss_changes")
