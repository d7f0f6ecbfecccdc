"""The factorized (low-rank) linear layer, and its parameter names (its forward/backward pair is in fast/linears.py).

A dense linear layer `name` (e.g. transformer.h.0.mlp.c_fc, a Llama's model.layers.0.mlp.up_proj) holds name.weight W (out, in). Its factorized
form holds two thin factors beside it, under these names, in place of name.weight:

    name.weight_A   A (out, r)      W ≈ A B,  the "left" factor (U_r Σ_r for a truncated SVD)
    name.weight_B   B (r, in)                 the "right" factor (V_rᵀ for a truncated SVD)
    name.bias       b (out,)        unchanged, when the model has biases

so the layer computes y = (x Bᵀ) Aᵀ + b: two products, r(out + in) multiply-adds a row instead of
out·in, and r(out + in) numbers stored instead of out·in. The model picks the factorized form of a layer
whenever its params hold name.weight_A (fast/model.py's linear_by_name, which fast/llama.py uses too); a checkpoint lists the ranks in its
metadata ("lowrank": {name: r}). Anything that needs the dense weight (analysis, export) uses
dense_params, which multiplies the factors out.
"""
import numpy as np

from tinylm.errors import TinyLMError, brief

SUFFIX_A, SUFFIX_B = ".weight_A", ".weight_B"
BLOCKS = ("transformer.h.", "model.layers.")     # where GPT-2's and the Llama's block matrices are named


# ----------------------------------------------------------------------------- names


def is_factorized(params, name):
    """True when the linear layer `name` (no .weight suffix) is stored as two factors in params."""
    return name + SUFFIX_A in params


def ranks_of(params):
    """{layer name: rank} of every factorized layer in params (empty for a dense model)."""
    return {k[:-len(SUFFIX_A)]: int(v.shape[1]) for k, v in params.items() if k.endswith(SUFFIX_A)}


def factorized_shapes(shapes, ranks):
    """The shapes dict (name -> shape, as core/gpt2.py's param_shapes gives) with each layer in ranks stored as two factors.

    Raises TinyLMError for a layer that is not a linear weight of the model or a rank outside 1 … min(out, in).
    One pass over shapes, whatever the number of ranks (they come from a file's metadata).
    """
    for name, r in ranks.items():
        shape = shapes.get(name + ".weight")
        if shape is None or len(shape) != 2 or not name.startswith(BLOCKS):
            raise TinyLMError(f"{brief(name)} is not a block linear layer of this model")
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 1 <= r <= min(shape):
            raise TinyLMError(f"rank of {name} must be an integer in 1 … {min(shape)}, got {brief(r)}")
    new = {}
    for k, s in shapes.items():                # the factors take the dense weight's place in the order
        name = k[:-len(".weight")] if k.endswith(".weight") else None
        if name in ranks:
            (out, inp), r = s, int(ranks[name])
            new[name + SUFFIX_A], new[name + SUFFIX_B] = (out, r), (r, inp)
        else:
            new[k] = s
    return new


def factor_params(params, name, A, B):
    """params with layer `name` stored as the factors A (out, r), B (r, in) (a new dict; the dense weight dropped)."""
    new = {}
    for k, v in params.items():
        if k in (name + ".weight", name + SUFFIX_A):
            new[name + SUFFIX_A], new[name + SUFFIX_B] = A, B
        elif k != name + SUFFIX_B:
            new[k] = v
    return new


def dense_weight(params, name):
    """W (out, in) of layer `name`: name.weight, or the product A B of its factors."""
    if is_factorized(params, name):
        return params[name + SUFFIX_A] @ params[name + SUFFIX_B]
    return params[name + ".weight"]


def dense_params(params):
    """params with every factorized layer multiplied out into name.weight = A B, in the dense model's order."""
    new = {}
    for k, v in params.items():
        if k.endswith(SUFFIX_A):
            name = k[:-len(SUFFIX_A)]
            new[name + ".weight"] = dense_weight(params, name)
        elif not k.endswith(SUFFIX_B):
            new[k] = v
    return new
