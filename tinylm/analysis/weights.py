"""Which matrices the analysis looks at: every linear weight, c_attn split into Q, K, V, and per-head blocks.

Conventions (see core/gpt2.py's forward and core/layers.py's attention_forward): a linear layer
computes y = x Wᵀ with W (out, in). c_attn (3C, C) stacks W_Q, W_K, W_V by rows,
and head h owns rows h·D .. (h+1)·D of each (D = C / n_head). c_proj (C, C) maps
the concatenated head outputs back to the residual stream, so head h owns its
columns h·D .. (h+1)·D. The score of query i and key j in head h is
(W_Q x_i)·(W_K x_j) = x_iᵀ (W_Qᵀ W_K) x_j, and the head writes W_O W_V x_j.
"""

from tinylm.core.gpt2 import block_prefix

# The kinds of matrix in a block, in the order the tables list them.
BLOCK_KINDS = ("attn.q", "attn.k", "attn.v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def head_weights(params, config, layer):
    """Per-head blocks of one layer: W_Q, W_K, W_V (H, D, C) and W_O (H, C, D)."""
    C, H = config.n_embd, config.n_head
    D = C // H
    pre = block_prefix(layer)
    c_attn = params[pre + "attn.c_attn.weight"]
    c_proj = params[pre + "attn.c_proj.weight"]
    W_Q, W_K, W_V = (c_attn[j * C:(j + 1) * C].reshape(H, D, C) for j in range(3))
    W_O = c_proj.reshape(C, H, D).transpose(1, 0, 2)
    return {"W_Q": W_Q, "W_K": W_K, "W_V": W_V, "W_O": W_O}


def weight_matrices(params, config, per_head=False):
    """Name -> 2-D weight (out, in): wte (V,C), wpe (T,C), per layer Q/K/V (C,C), c_proj (C,C), c_fc (4C,C), mlp c_proj (C,4C).

    With per_head, also "h{i}.attn.{q,k,v}.head{h}" (D, C) and "h{i}.attn.c_proj.head{h}" (C, D).
    Names are short ("h0.attn.q"); `source_name` gives the parameter each comes from.
    """
    C = config.n_embd
    out = {"wte": params["transformer.wte.weight"], "wpe": params["transformer.wpe.weight"]}
    for i in range(config.n_layer):
        pre = block_prefix(i)
        c_attn = params[pre + "attn.c_attn.weight"]
        for j, part in enumerate("qkv"):
            out[f"h{i}.attn.{part}"] = c_attn[j * C:(j + 1) * C]
        out[f"h{i}.attn.c_proj"] = params[pre + "attn.c_proj.weight"]
        out[f"h{i}.mlp.c_fc"] = params[pre + "mlp.c_fc.weight"]
        out[f"h{i}.mlp.c_proj"] = params[pre + "mlp.c_proj.weight"]
    if per_head:
        for i in range(config.n_layer):
            hw = head_weights(params, config, i)
            for h in range(config.n_head):
                for part, key in zip("qkv", ("W_Q", "W_K", "W_V")):
                    out[f"h{i}.attn.{part}.head{h}"] = hw[key][h]
                out[f"h{i}.attn.c_proj.head{h}"] = hw["W_O"][h]
    return out


def source_name(name):
    """The checkpoint parameter a short matrix name is cut from ("h0.attn.q" -> transformer.h.0.attn.c_attn.weight rows 0:C)."""
    if name in ("wte", "wpe"):
        return f"transformer.{name}.weight"
    layer, rest = name.split(".", 1)
    i = int(layer[1:])
    if rest.startswith("attn.c_proj"):
        where = f"columns of head {rest.rsplit('head', 1)[1]}" if ".head" in rest else ""
        return (block_prefix(i) + "attn.c_proj.weight " + where).strip()
    if rest.startswith("attn."):
        part = rest.split(".")[1]
        return block_prefix(i) + f"attn.c_attn.weight ({part.upper()} rows{', head ' + rest.rsplit('head', 1)[1] if '.head' in rest else ''})"
    return block_prefix(i) + rest + ".weight"


def is_per_head(name):
    return ".head" in name


def linear_weight_names(config):
    """The parameter names of the block linear weights (what low-rank truncation acts on)."""
    names = []
    for i in range(config.n_layer):
        pre = block_prefix(i)
        names += [pre + "attn.c_attn.weight", pre + "attn.c_proj.weight", pre + "mlp.c_fc.weight", pre + "mlp.c_proj.weight"]
    return names

