"""Sampling a Llama fast: a key-value cache that slides instead of refilling, and generation.

The cache holds block_size keys and values per layer. Position p's key and value live in slot
p mod block_size, so once the cache is full each new position overwrites the oldest: it always holds
the last block_size positions, and it is never rebuilt. (A generation that needs fewer positions, prompt plus
new tokens, gets a cache of only that many: a huge block_size sizes nothing.) (GPT-2's cache, fast/decode.py, must be refilled
from a shorter context when it fills: its learned position embedding wpe[p] was added into the residual
stream at the key's own position p, and p runs out at block_size.)

Why a slid cache still computes the right scores: the rotary angle of a key is set once, by its
absolute position n, and the query of position m is turned by m's. A rotation is orthogonal and
R_mᵀ R_n = R_{n−m}, so (R_m q)·(R_n k) = q·R_{n−m} k: a score depends on the offset n − m alone, never
on where the positions started. The window of positions p − block_size + 1 … p therefore scores the
same as positions 0 … block_size − 1 would, which is where core's forward (and core.generate, run on
the last block_size tokens) starts every window. The values are not rotated, and the softmax and its
weighted sum do not care in which slot each key sits.

What sliding does not give back: from the second layer on, a cached key was computed from its own
position's residual stream, which attended to the block_size positions before *it*, some of which have
since left the window. So past the first block, each step is a sliding-window attention over the whole
text (every position, in every layer, attends to itself and the block_size − 1 positions before it),
not a fresh forward over the last block_size tokens alone; with one layer the two are the same.
tests/test_fast_llama.py holds every cached step equal to that sliding-window forward, written out
in full in the test, to 1e-9 in float64 (and to the fresh forward for one layer).

The per-token step (decode_rows) works on a row per sequence, with the RMSNorm gains and the attention
scale folded into the next matrix (decoding_weights), one product for q, k and v (each rotary pair side by
side, as fast/llama.py stacks them, and so in the cache) and one for gate and up; a factorized layer
(tinylm.compress) as its two thin products, as fast/decode.py runs GPT-2's.
"""
import math

import numpy as np

from tinylm.core.llama import block_prefix, head_name
from tinylm.errors import TinyLMError
from tinylm.fast import layers as L
from tinylm.fast.decode import prompt_rows
from tinylm.fast.llama import GATE_UP, QKV, forward, is_dense, row_orders, stacked


def new_kv_cache(config, batch_size, dtype, positions=None):
    """Room for S = min(block_size, positions) keys and values per layer, k and v (n_layer, B, Hkv, S, D), and
    "len": the number of positions seen so far (unbounded; position p is kept in slot p mod S). positions: how
    many a generation will ever need (prompt + new tokens), so a huge block_size does not size the cache."""
    D = config.n_embd // config.n_head
    slots = config.block_size if positions is None else max(1, min(config.block_size, positions))
    shape = (config.n_layer, batch_size, config.n_kv_head, slots, D)
    return {"k": np.zeros(shape, dtype), "v": np.zeros(shape, dtype), "len": 0}


def prefill(params, config, idx, kv):
    """Logits (B, V) of the last position of idx (B, t), t ≤ block_size, at positions 0 … t − 1 of an empty
    cache, whose keys and values it fills (fast/llama.py's forward, without dropout)."""
    if kv["len"]:
        raise TinyLMError("prefill starts an empty cache")
    logits, _, _ = forward(params, config, idx, for_backward=False, kv=kv)
    kv["len"] = idx.shape[1]
    return logits[:, -1]


def adapters_folded(params):
    """params with every adapter's W + B A under name.weight and the adapters dropped (the decoder runs the matrix)."""
    folded = {k: v for k, v in params.items() if not k.endswith((".lora_A", ".lora_B"))}
    for k, A in params.items():
        if k.endswith(".lora_A"):
            stem = k[:-len(".lora_A")]
            folded[stem + ".weight"] = params[stem + ".weight"] + params[stem + ".lora_B"] @ A
    return folded


def decoding_weights(params, config):
    """The weights arranged for decode_rows, each stored transposed (in, out) for the product x @ M.

    RMSNorm's gain is folded into the matrix that follows: (x̂ ⊙ w) Wᵀ = x̂ (W diag(w))ᵀ, and the attention
    scale 1/√D into the query rows, so a block needs only x's 1/rms beside its products. A factorized layer
    W = A B is the pair (M₁, M₂) = ((B diag(w))ᵀ, Aᵀ), run as (x M₁) M₂ (product): the gain on B's columns, the
    rotary order and the scale on A's rows. A group (q, k, v; gate, up) holding one is a list of its layers'
    matrices or pairs, their outputs side by side; a dense group is one stacked matrix. Adapters are folded in."""
    params = adapters_folded(params)
    D = config.n_embd // config.n_head
    H, n = config.n_head, config.n_layer

    def folded(W, norm):
        return np.ascontiguousarray((W * params[norm + ".weight"]).T)

    def layer(name, norm=None, order=None, scale=None):
        """The stored matrix, or pair, of the layer `name`, its rows in `order`, times scale."""
        W = params.get(name + ".weight", params.get(name + ".weight_A"))
        W = W if order is None else W[order]
        W = W if scale is None else W * scale
        if name + ".weight_A" not in params:
            return folded(W, norm) if norm else np.ascontiguousarray(W.T)
        B = params[name + ".weight_B"]
        return (folded(B, norm) if norm else np.ascontiguousarray(B.T)), np.ascontiguousarray(W.T)

    def group(pre, names, norm, scales=()):
        """The layers `names` of block pre: one stacked matrix when all are dense, else a list (module docstring)."""
        if is_dense(params, pre, names):
            W = folded(stacked(params, config, pre, names), norm)
            for cols, scale in scales:
                W[:, cols] *= scale
            return W
        scale_of = dict((names[0], scale) for _, scale in scales)
        return [layer(pre + name, norm, order, scale_of.get(name))
                for name, order in row_orders(config, names).items()]

    layers = []
    for i in range(n):
        pre = block_prefix(i)
        layers.append((group(pre, QKV, pre + "input_layernorm", [(slice(0, H * D), 1.0 / math.sqrt(D))]),
                       layer(pre + "self_attn.o_proj"), group(pre, GATE_UP, pre + "post_attention_layernorm"),
                       layer(pre + "mlp.down_proj")))
    inv_freq = float(config.rope_theta) ** (-np.arange(0, D, 2) / D)       # as core's rope_forward
    return {"wte": params["model.embed_tokens.weight"], "layers": layers, "inv_freq": inv_freq,
            "head": folded(params[head_name(config)], "model.norm"), "config": config}


def product(x, M):
    """x M for a stored matrix M; (x M₁) M₂ for a factorized layer's pair; for a group's list, its members'
    products side by side (decoding_weights)."""
    if type(M) is tuple:
        return (x @ M[0]) @ M[1]
    if type(M) is list:
        return np.concatenate([product(x, part) for part in M], axis=1)
    return x @ M


def inverse_rms(x, eps):
    """1/√(mean x² + ε) of each row of x (B, C), as a (B, 1) column."""
    r = L.rowdot(x, x)
    r /= x.shape[-1]
    r += eps
    np.sqrt(r, out=r)
    return np.reciprocal(r, out=r)


def this_turn(pos, inv_freq, n_heads, dtype):
    """e^{iθ} of position pos for every pair of n_heads heads, (1, n_heads·D/2) complex: rope_phases' numbers for
    one position (the angles pos·θ^(−2j/D) in float64, their cosine and sine in dtype), for any pos."""
    angles = pos * inv_freq
    turn = np.empty((1, n_heads, inv_freq.size), dtype=np.result_type(dtype, np.complex64))
    turn.real, turn.imag = np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)
    return turn.reshape(1, -1)


def decode_rows(dw, kv, tokens):
    """Logits (B, V) for one more token of each of B sequences in kv, at position kv["len"] (any, the cache
    slides): the token's q, k, v, its key and value into slot position mod S (the cache's slots, ≤ block_size),
    attention over every slot in use, then the MLP; the same numbers as the sliding-window forward the module
    docstring describes (a cache of S < block_size slots is never outgrown: new_kv_cache's positions)."""
    config = dw["config"]
    pos = kv["len"]
    T, H, Hkv = kv["k"].shape[3], config.n_head, config.n_kv_head
    D, eps = config.n_embd // H, config.norm_eps
    slot, n = pos % T, min(pos + 1, T)
    B = len(tokens)
    x = dw["wte"][np.asarray(tokens)]                                        # (B, C), a new array
    turn = this_turn(pos, dw["inv_freq"], H + Hkv, x.dtype)
    for (W_qkv, W_o, W_gu, W_down), K, V in zip(dw["layers"], kv["k"], kv["v"]):
        qkv = product(x, W_qkv)
        qkv *= inverse_rms(x, eps)
        L.rope_(qkv[:, :(H + Hkv) * D], turn)
        K[:, :, slot] = qkv[:, H * D:(H + Hkv) * D].reshape(B, Hkv, D)
        V[:, :, slot] = qkv[:, (H + Hkv) * D:].reshape(B, Hkv, D)
        q = qkv[:, :H * D].reshape(B, Hkv, H // Hkv, D)                      # query heads grouped by their K/V head
        s = q @ K[:, :, :n].transpose(0, 1, 3, 2)                            # (B, Hkv, G, n): no mask, all are past
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        x += product((s @ V[:, :, :n]).reshape(B, H * D), W_o)
        gu = product(x, W_gu)
        gu *= inverse_rms(x, eps)
        x += product(L.swiglu_forward(gu)[0], W_down)
    kv["len"] = pos + 1
    logits = x @ dw["head"]
    logits *= inverse_rms(x, eps)
    return logits


def generate_rows(params, config, prompt, rows, max_new_tokens, pick_next, use_cache=True, trace=None):
    """`rows` sequences drawn side by side from one prompt: yield (rows,) token ids a step, drawn by
    pick_next(logits (rows, V)) -> (rows,) ints. As fast/decode.py's generate_rows, but the cache slides
    (no refill). Without the cache each step is a forward over the last block_size tokens, from position 0.
    If trace is a list, (contexts (rows, t), logits (rows, V)) is appended per step, the contexts being the
    last block_size tokens. One BLAS thread, as for decode.generate."""
    context = prompt_rows(prompt, rows, config.block_size)                     # (rows, t)
    if use_cache:
        dw = decoding_weights(params, config)
        kv = new_kv_cache(config, rows, params["model.embed_tokens.weight"].dtype,
                          positions=context.shape[1] + max_new_tokens)
        last = prefill(params, config, context, kv)
    for step in range(max_new_tokens):
        if not use_cache:
            last = forward(params, config, context, for_backward=False)[0][:, -1]
        if trace is not None:
            trace.append((context.copy(), last))
        picked = np.asarray(pick_next(last), dtype=np.int64).reshape(rows)
        yield picked
        if step == max_new_tokens - 1:
            break
        context = np.concatenate([context, picked[:, None]], axis=1)[:, -config.block_size:]
        if use_cache:
            last = decode_rows(dw, kv, picked)


def generate(params, config, prompt, max_new_tokens, pick_next, use_cache=True, trace=None):
    """Yield max_new_tokens token ids one at a time, each pick_next(logits (V,)) -> int: generate_rows for one
    sequence (fast/decode.py's generate's signature). If trace is a list, (context ids, logits) per step."""
    rows_trace = [] if trace is not None else None
    for picked in generate_rows(params, config, prompt, 1, max_new_tokens, lambda z: [pick_next(z[0])],
                                use_cache, rows_trace):
        if trace is not None:
            context, logits = rows_trace[-1]
            trace.append((context[0].tolist(), logits[0]))
        yield int(picked[0])
