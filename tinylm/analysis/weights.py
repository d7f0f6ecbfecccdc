"""Which matrices the analysis looks at, for either arch: every linear weight by its role, Q, K, V split, per-head blocks.

Every section asks this module for a matrix by its role (query, key, value, output, mlp gate, mlp in, mlp out)
instead of by a parameter name, so one analysis reads GPT-2 and Llama alike. BLOCK_MATRICES names, per arch,
each block matrix's short kind, the parameter it is cut from, and its role.

Conventions (see core/gpt2.py's and core/llama.py's forward): a linear layer computes y = x Wᵀ with W (out, in).
GPT-2's c_attn (3C, C) stacks W_Q, W_K, W_V by rows; a Llama keeps q_proj (H·D, C), k_proj and v_proj
(Hkv·D, C) apart. Query head h owns rows h·D .. (h+1)·D of W_Q; with grouped-query attention (Hkv < H) it
reads the key/value head h // (H/Hkv). The output projection (c_proj, o_proj) maps the concatenated heads
back to the residual stream, so head h owns its columns h·D .. (h+1)·D. The score of query i and key j in
head h is (W_Q x_i)·(W_K x_j) = x_iᵀ (W_Qᵀ W_K) x_j (a Llama turns both by rotations first: circuits.py's
rotary_qk), and the head writes W_O W_V x_j.
"""
from tinylm.core.arch import arch_of

# Per arch: the short kind of each block matrix (in the order the tables list them), the parameter inside
# block i it is cut from, which third of its rows (GPT-2's stacked c_attn) or None, and its role.
BLOCK_MATRICES = {
    "gpt2": (("attn.q", "attn.c_attn", 0, "query"), ("attn.k", "attn.c_attn", 1, "key"),
             ("attn.v", "attn.c_attn", 2, "value"), ("attn.c_proj", "attn.c_proj", None, "output"),
             ("mlp.c_fc", "mlp.c_fc", None, "mlp in"), ("mlp.c_proj", "mlp.c_proj", None, "mlp out")),
    "llama": (("attn.q", "self_attn.q_proj", None, "query"), ("attn.k", "self_attn.k_proj", None, "key"),
              ("attn.v", "self_attn.v_proj", None, "value"), ("attn.o", "self_attn.o_proj", None, "output"),
              ("mlp.gate", "mlp.gate_proj", None, "mlp gate"), ("mlp.up", "mlp.up_proj", None, "mlp in"),
              ("mlp.down", "mlp.down_proj", None, "mlp out")),
}
BLOCK_PREFIX = {"gpt2": "transformer.h.{}.", "llama": "model.layers.{}."}
# The norms: before attention, before the MLP, the final one; and whether they centre (LayerNorm) or not (RMSNorm).
NORMS = {"gpt2": ("ln_1", "ln_2", "transformer.ln_f", True),
         "llama": ("input_layernorm", "post_attention_layernorm", "model.norm", False)}
EMBEDDING = {"gpt2": "transformer.wte.weight", "llama": "model.embed_tokens.weight"}


def block_prefix(config, i):
    """The parameter-name prefix of block i: transformer.h.{i}. or model.layers.{i}."""
    return BLOCK_PREFIX[arch_of(config)].format(i)


def kind_of(config, role):
    """The short kind of the block matrix with this role ("output" -> "attn.c_proj" for GPT-2, "attn.o" for a Llama)."""
    return next(kind for kind, _, _, r in BLOCK_MATRICES[arch_of(config)] if r == role)


def block_matrix(params, config, i, kind):
    """The block matrix of this short kind in block i, (out, in), cut from its parameter."""
    _, param, third, _ = next(m for m in BLOCK_MATRICES[arch_of(config)] if m[0] == kind)
    W = params[block_prefix(config, i) + param + ".weight"]
    return W if third is None else W[third * config.n_embd:(third + 1) * config.n_embd]


def norm_names(config, i=None):
    """(the norm before attention in block i, the norm before the MLP, the final norm) as names without .weight,
    and whether the norms centre (LayerNorm: True; RMSNorm: False)."""
    attn, mlp, final, centres = NORMS[arch_of(config)]
    pre = "" if i is None else block_prefix(config, i)
    return pre + attn, pre + mlp, final, centres


def embedding(params, config):
    """The token embedding (V, C): wte or embed_tokens."""
    return params[EMBEDDING[arch_of(config)]]


def unembedding(params, config):
    """The output head (V, C): logits = x headᵀ. The embedding itself when tied (GPT-2 always, a Llama by its config)."""
    if arch_of(config) == "llama" and not config.tie_embeddings:
        return params["lm_head.weight"]
    return embedding(params, config)


def position_embedding(params, config):
    """GPT-2's learned positions wpe (block_size, C); None for a Llama, whose positions are rotations."""
    return params.get("transformer.wpe.weight") if arch_of(config) == "gpt2" else None


def head_weights(params, config, layer):
    """Per query head of one layer: W_Q, W_K, W_V (H, D, C) and W_O (H, C, D). With grouped-query attention
    W_K[h], W_V[h] are the key/value head h // (H/Hkv) that query head h reads (so shared blocks repeat)."""
    C, H = config.n_embd, config.n_head
    D = C // H
    kv_of = [h // (H // getattr(config, "n_kv_head", H)) for h in range(H)]
    W_Q, W_K, W_V = (block_matrix(params, config, layer, kind_of(config, r)).reshape(-1, D, C)
                     for r in ("query", "key", "value"))
    W_O = block_matrix(params, config, layer, kind_of(config, "output")).reshape(C, H, D).transpose(1, 0, 2)
    return {"W_Q": W_Q, "W_K": W_K[kv_of], "W_V": W_V[kv_of], "W_O": W_O}


def weight_matrices(params, config, per_head=False):
    """Short name -> 2-D weight (out, in): the embedding ("wte" or "embed_tokens"), GPT-2's "wpe", a Llama's untied
    "lm_head", and every block matrix "h{i}.{kind}" (kinds in BLOCK_MATRICES, e.g. "h0.attn.q", "h0.mlp.up").

    With per_head, also "h{i}.attn.{q,k,v}.head{h}" (D, C) (a Llama's k and v per key/value head) and
    "h{i}.{output kind}.head{h}" (C, D). `source_name` gives the parameter each comes from.
    """
    arch = arch_of(config)
    out = {"wte": params["transformer.wte.weight"], "wpe": params["transformer.wpe.weight"]} if arch == "gpt2" else \
        {"embed_tokens": params["model.embed_tokens.weight"]}
    if unembedding(params, config) is not embedding(params, config):
        out["lm_head"] = params["lm_head.weight"]
    for i in range(config.n_layer):
        for kind, _, _, _ in BLOCK_MATRICES[arch]:
            out[f"h{i}.{kind}"] = block_matrix(params, config, i, kind)
    if per_head:
        D = config.n_embd // config.n_head
        for i in range(config.n_layer):
            for part in "qkv":
                W = out[f"h{i}.attn.{part}"]
                for h in range(W.shape[0] // D):
                    out[f"h{i}.attn.{part}.head{h}"] = W[h * D:(h + 1) * D]
            o = kind_of(config, "output")
            for h, W_O in enumerate(head_weights(params, config, i)["W_O"]):
                out[f"h{i}.{o}.head{h}"] = W_O
    return out


def source_name(name, config):
    """The checkpoint parameter a short matrix name is cut from ("h0.attn.q" -> transformer.h.0.attn.c_attn.weight
    (Q rows), or model.layers.0.self_attn.q_proj.weight)."""
    if "." not in name:
        return {"wte": "transformer.wte.weight", "wpe": "transformer.wpe.weight", "lm_head": "lm_head.weight",
                "embed_tokens": "model.embed_tokens.weight"}[name]
    layer, rest = name.split(".", 1)
    kind, _, head = rest.partition(".head")
    _, param, third, role = next(m for m in BLOCK_MATRICES[arch_of(config)] if m[0] == kind)
    where = [f"{kind.split('.')[1].upper()} rows"] if third is not None else []
    if head:
        where.append(("columns of head " if role == "output" else "head ") + head)
    return block_prefix(config, int(layer[1:])) + param + ".weight" + (f" ({', '.join(where)})" if where else "")


def is_per_head(name):
    return ".head" in name


def linear_weight_names(config):
    """The parameter names of the block linear weights (what low-rank truncation acts on), each once."""
    names = []
    for i in range(config.n_layer):
        for _, param, _, _ in BLOCK_MATRICES[arch_of(config)]:
            name = block_prefix(config, i) + param + ".weight"
            if name not in names:
                names.append(name)
    return names
