"""core/llama.py's forward and backward, made fast for training: the same parameter dict and the same numbers.

What it adds to core, as fast/model.py does for GPT-2:
- dropout, where GPT-2's fast path has it: on the embedding, the attention weights and each sublayer's output;
- one matrix product per projection: q, k and v as one product over their weights stacked as rows
  ([q_proj; k_proj; v_proj], (H·D + 2·Hkv·D, C)), gate and up as another ([gate_proj; up_proj], (2F, C));
  the stacked weight's gradient is split back into Hugging Face's names;
- the rotations done in place on that product's q and k columns, each pair turned as one complex number
  (fast/layers.py's rope_): the stacked weight takes each head's q and k rows in the order that puts each rotary
  pair side by side (pairs_side_by_side), which reorders a head's coordinates the same way in q and k and so
  changes no score; the gradient's rows go back to Hugging Face's order;
- GPT-2's fast attention (fast/layers.py: row blocks, in-place passes, dropout), each shared key/value head
  repeated for the G query heads that read it (nothing to repeat when G = 1), the G copies' gradients summed;
- the batch split over threads: fast/model.py's loss_and_grads_parallel, handed this module's loss_and_grads;
- the factorized and LoRA forms of any of the seven matrices, as fast/model.py runs GPT-2's (its linear_by_name):
  a group with such a layer (q, k, v or gate, up) runs each layer's own product instead of the stacked one
  (group_forward). tests/test_lowrank_llama.py holds them equal to core on the matrices they stand for.
The config, the names and shapes, and init are core's (core/llama.py). tests/test_fast_llama.py holds logits,
loss and every gradient equal to core's in float64, tied and untied, with and without shared heads.
"""
import numpy as np

from tinylm.core.llama import block_prefix, head_name
from tinylm.errors import TinyLMError
from tinylm.fast import layers as L
from tinylm.fast import model as M

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def row_orders(config, names):
    """{layer name: the order its rows are stacked in}: q and k with each rotary pair side by side, others as stored."""
    D = config.n_embd // config.n_head
    heads = {"self_attn.q_proj": config.n_head, "self_attn.k_proj": config.n_kv_head}
    return {name: L.pairs_side_by_side(heads[name], D) if name in heads else None for name in names}


def stacked(params, config, pre, names):
    """The weights of block `pre`'s layers `names`, stacked as the rows of one matrix (one product, all outputs),
    q's and k's rows in row_orders' order."""
    parts = [params[pre + name + ".weight"] for name in names]
    out = np.empty((sum(len(W) for W in parts), parts[0].shape[1]), dtype=parts[0].dtype)
    row = 0
    for W, order in zip(parts, row_orders(config, names).values()):
        if order is None:
            out[row:row + len(W)] = W
        else:
            np.take(W, order, axis=0, out=out[row:row + len(W)])
        row += len(W)
    return out


def unstacked(dW, params, config, pre, names):
    """The stacked matrix's gradient dW cut back into its layers' rows, under their names, q's and k's rows put
    back in Hugging Face's order (the others are views into dW)."""
    grads, row = {}, 0
    for name, order in row_orders(config, names).items():
        rows = params[pre + name + ".weight"].shape[0]
        part = dW[row:row + rows]
        if order is not None:
            part = np.empty_like(part)
            part[order] = dW[row:row + rows]
        grads[pre + name + ".weight"] = part
        row += rows
    return grads


def is_dense(params, pre, names):
    """True when every layer `names` of block `pre` is a plain weight (no factors, no adapter): then they stack."""
    return all(pre + name + ".weight" in params and pre + name + ".lora_A" not in params for name in names)


def group_forward(params, config, pre, names, h):
    """The outputs of block `pre`'s layers `names` on h side by side, (B,T,Σ out), q's and k's columns in
    row_orders' order. Dense layers: one product over their stacked weights. A factorized layer or one with an
    adapter (fast/linears.py, by fast/model.py's linear_by_name): each layer's own product, its columns put in
    place, the same numbers as the stacked product of the weights they stand for."""
    if is_dense(params, pre, names):
        y, cache = L.linear_forward(h, stacked(params, config, pre, names))
        return y, ("stacked", cache)
    parts, caches = [], []
    for name, order in row_orders(config, names).items():
        y, cache = M.linear_by_name(params, pre + name, h)
        parts.append(y if order is None else y[..., order])
        caches.append((y.shape[-1], cache))
    return np.concatenate(parts, axis=-1), ("apart", caches)


def linear_backward_into(grads, params, name, dy, cache):
    """linear_by_name's backward for the layer `name`: its parameters' gradients put into grads under their names
    (name.weight; name.weight_A, .weight_B; or name.lora_A, .lora_B, the frozen weight getting none); returns dx."""
    dx, g = M.linear_backward_by_name(params, name, dy, cache)
    if "A" in g:
        grads[name + ".weight_A"], grads[name + ".weight_B"] = g["A"], g["B"]
    elif "lora_A" in g:
        grads[name + ".lora_A"], grads[name + ".lora_B"] = g["lora_A"], g["lora_B"]
    else:
        grads[name + ".weight"] = g["W"]
    return dx


def group_backward(grads, params, config, pre, names, dy, cache):
    """group_forward's backward: the layers' gradients put into grads under their names; returns dh (the layers
    read the same h, so their input gradients add)."""
    kind, cache = cache
    if kind == "stacked":
        dh, g = L.linear_backward(dy, cache)
        grads.update(unstacked(g["W"], params, config, pre, names))
        return dh
    dh, col = 0, 0
    for (name, order), (width, layer_cache) in zip(row_orders(config, names).items(), cache):
        part = dy[..., col:col + width]
        if order is not None:                            # the columns back in Hugging Face's order
            part = np.empty_like(part)
            part[..., order] = dy[..., col:col + width]
        dh = dh + linear_backward_into(grads, params, pre + name, np.ascontiguousarray(part), layer_cache)
        col += width
    return dh


def rotated(qkv, config):
    """The q and k columns of the stacked projection's output, (B,T,(H+Hkv)·D): a view, for rotating in place."""
    return qkv[..., :(config.n_head + config.n_kv_head) * (config.n_embd // config.n_head)]


def repeated_kv(qkv, config):
    """[q k v] (B,T,(H+2Hkv)·D) -> (B,T,3·H·D), each key/value head repeated for its G = H/Hkv query heads.

    Query head h reads key/value head h // G (core's grouped_attention_forward), so the repeated heads
    sit side by side: [k₀ … k₀ k₁ … k₁ …]. With G = 1 that is qkv itself, no copy."""
    H, Hkv = config.n_head, config.n_kv_head
    if H == Hkv:
        return qkv
    B, T, _ = qkv.shape
    D, G = config.n_embd // H, H // Hkv
    full = np.empty((B, T, 3, Hkv, G, D), dtype=qkv.dtype)
    full[:, :, 0] = qkv[..., :H * D].reshape(B, T, Hkv, G, D)
    full[:, :, 1:] = qkv[..., H * D:].reshape(B, T, 2, Hkv, 1, D)            # broadcast over the G copies
    return full.reshape(B, T, 3 * H * D)


def summed_kv(dqkv, config):
    """repeated_kv's backward: the G copies' gradients of each key/value head added.   -> (B,T,(H+2Hkv)·D)"""
    H, Hkv = config.n_head, config.n_kv_head
    if H == Hkv:
        return dqkv
    B, T, _ = dqkv.shape
    D, G = config.n_embd // H, H // Hkv
    parts = dqkv.reshape(B, T, 3, Hkv, G, D)
    out = np.empty((B, T, (H + 2 * Hkv) * D), dtype=dqkv.dtype)
    out[..., :H * D] = parts[:, :, 0].reshape(B, T, H * D)
    out[..., H * D:] = parts[:, :, 1:].sum(axis=4).reshape(B, T, 2 * Hkv * D)
    return out


def keep_keys_and_values(kv, i, qkv, config):
    """Layer i's rotated keys (their pairs side by side, as the decoder's) and values into the decoder's cache kv
    (llama_decode.py), from position 0."""
    B, T, _ = qkv.shape
    H, Hkv, D = config.n_head, config.n_kv_head, config.n_embd // config.n_head
    both = qkv[..., H * D:].reshape(B, T, 2, Hkv, D).transpose(2, 0, 3, 1, 4)    # (2, B, Hkv, T, D)
    kv["k"][i, :, :, :T], kv["v"][i, :, :, :T] = both[0], both[1]


def forward(params, config, idx, targets=None, train=False, rng=None, for_backward=True, kv=None):
    """logits = Llama(idx).   idx (B,T) ints -> (logits (B,T,V), loss or None, cache for backward)

    Dropout is applied only when train is True and an rng (np.random.Generator) is given. With
    for_backward=False the cache comes back as None. Given kv (llama_decode.new_kv_cache), every layer's
    rotated keys and values are also written into it, from position 0 (the decoder's prefill).
    """
    B, T = idx.shape
    if T > config.block_size:
        raise TinyLMError(f"sequence of length {T} is longer than block_size {config.block_size}")
    p = config.dropout if train else 0.0
    rng = rng if train else None
    P = params
    wte = P["model.embed_tokens.weight"]
    turn, back = L.rope_phases(T, config.n_embd // config.n_head, config.n_head + config.n_kv_head,
                               float(config.rope_theta), wte.dtype)
    cache = {"blocks": [], "idx": idx, "rope_back": back}
    x, cache["emb_drop"] = L.dropout_forward(wte[idx], p, rng)          # no wpe: positions are rotations
    for i in range(config.n_layer):
        pre = block_prefix(i)
        c = {}
        # attention sublayer: x + o_proj(attention(rope(q), rope(k), v)), q k v = [q_proj; k_proj; v_proj] norm(x)
        h, c["input_layernorm"] = L.rmsnorm_forward(x, P[pre + "input_layernorm.weight"], config.norm_eps)
        qkv, c["qkv"] = group_forward(P, config, pre, QKV, h)                  # (B,T,(H+2Hkv)·D)
        L.rope_(rotated(qkv, config), turn)
        if kv is not None:
            keep_keys_and_values(kv, i, qkv, config)
        a, c["attn"] = L.attention_forward(repeated_kv(qkv, config), config.n_head, p, rng)
        a, c["o_proj"] = M.linear_by_name(P, pre + "self_attn.o_proj", a)
        a, c["attn_drop"] = L.dropout_forward(a, p, rng)
        x = x + a
        # MLP sublayer: x + down_proj(silu(g) ⊙ u), [g u] = [gate_proj; up_proj] norm(x)
        h, c["post_attention_layernorm"] = L.rmsnorm_forward(x, P[pre + "post_attention_layernorm.weight"],
                                                             config.norm_eps)
        gu, c["gate_up"] = group_forward(P, config, pre, GATE_UP, h)            # (B,T,2F)
        m, c["swiglu"] = L.swiglu_forward(gu)
        m, c["down_proj"] = M.linear_by_name(P, pre + "mlp.down_proj", m)
        m, c["mlp_drop"] = L.dropout_forward(m, p, rng)
        x += m                                           # x is this block's own array (x + a above)
        cache["blocks"].append(c)
    x, cache["norm"] = L.rmsnorm_forward(x, P["model.norm.weight"], config.norm_eps)
    logits, cache["head"] = L.linear_forward(x, P[head_name(config)])
    loss = None
    if targets is not None:
        loss, cache["loss"] = L.cross_entropy_forward(logits, targets)
    return logits, loss, cache if for_backward else None


def block_backward(params, config, pre, c, dx, rope_back):
    """One block's backward.   dx (B,T,C) -> (dx, the block's gradients by parameter name)"""
    grads = {}
    dm = L.dropout_backward(dx, c["mlp_drop"])           # x + m passes dx to both x and m
    dm = linear_backward_into(grads, params, pre + "mlp.down_proj", dm, c["down_proj"])
    dh = group_backward(grads, params, config, pre, GATE_UP, L.swiglu_backward(dm, c["swiglu"]), c["gate_up"])
    dh, g = L.rmsnorm_backward(dh, c["post_attention_layernorm"])
    grads[pre + "post_attention_layernorm.weight"] = g["w"]
    dx = dx + dh
    da = L.dropout_backward(dx, c["attn_drop"])
    da = linear_backward_into(grads, params, pre + "self_attn.o_proj", da, c["o_proj"])
    dqkv = summed_kv(L.attention_backward(da, c["attn"]), config)
    L.rope_(rotated(dqkv, config), rope_back)            # the turn back, in place: dqkv is a new array
    dh = group_backward(grads, params, config, pre, QKV, dqkv, c["qkv"])
    dh, g = L.rmsnorm_backward(dh, c["input_layernorm"])
    grads[pre + "input_layernorm.weight"] = g["w"]
    return dx + dh, grads


def backward(params, config, cache, dloss=1.0):
    """Gradients of dloss × the mean cross-entropy loss: a dict with params' keys and shapes. (dloss is this
    loss's weight in a sum of losses, as in fast/model.py's backward.)"""
    dlogits = L.cross_entropy_backward(dloss, cache["loss"])
    dx, g = L.linear_backward(dlogits, cache["head"])
    dhead = g["W"]
    dx, g = L.rmsnorm_backward(dx, cache["norm"])
    grads = {"model.norm.weight": g["w"]}
    for i in reversed(range(config.n_layer)):
        dx, g = block_backward(params, config, block_prefix(i), cache["blocks"][i], dx, cache["rope_back"])
        grads.update(g)
    dx = L.dropout_backward(dx, cache["emb_drop"])
    idx, wte = cache["idx"], params["model.embed_tokens.weight"]
    dwte = L.scatter_add_rows(idx.reshape(-1), dx.reshape(-1, dx.shape[-1]), wte.shape[0])
    if config.tie_embeddings:
        dwte += dhead                                    # the embedding is also the head: the two parts add
    else:
        grads["lm_head.weight"] = dhead
    grads["model.embed_tokens.weight"] = dwte
    frozen = {k[:-len(".lora_A")] + ".weight" for k in params if k.endswith(".lora_A")}
    return {k: grads[k] for k in params if k not in frozen}


def loss_and_grads(params, config, idx, targets, train=False, rng=None, dloss=1.0):
    """(loss, grads of dloss × loss) for one batch: the forward then the backward."""
    _, loss, cache = forward(params, config, idx, targets, train=train, rng=rng)
    return loss, backward(params, config, cache, dloss)


def loss_and_grads_parallel(params, config, idx, targets, train=False, rng=None, workers=None):
    """loss_and_grads over a thread per core: fast/model.py's loss_and_grads_parallel (its docstring says how),
    running this model."""
    return M.loss_and_grads_parallel(params, config, idx, targets, train=train, rng=rng, workers=workers,
                                     model_loss_and_grads=loss_and_grads)
