"""Sampling fast: a key-value cache, the weights refolded for one token at a time, and generation.

The same function as core/gpt2.py's forward, computed for the tokens that follow those already
cached (forward_cached), or for one token (decode_next, decode_rows: ~30 NumPy calls a block into
preallocated buffers, on weights whose layer norms are folded into the next matrix). The tests hold
every cached step equal to an uncached forward (tests/test_generation.py, tests/test_core_model.py).
"""
import math

import numpy as np

from tinylm.errors import TinyLMError
from tinylm.fast import layers as L
from tinylm.fast.model import forward, linear_by_name
from tinylm.core.gpt2 import block_prefix


def new_kv_cache(config, batch_size, dtype):
    """Room for block_size keys and values per layer: k, v (n_layer, B, H, block_size, D), and a length.

    k and v are views into one array kv (n_layer, B, 2, H, block_size, D), so that decode_next writes a
    position's key and value in one assignment.
    """
    D = config.n_embd // config.n_head
    both = np.zeros((config.n_layer, batch_size, 2, config.n_head, config.block_size, D), dtype)
    return {"k": both[:, :, 0], "v": both[:, :, 1], "kv": both, "len": 0}     # k, v: views into one array


def forward_cached(params, config, idx, kv, record=None, last_only=False):
    """Logits (B,t,V) for idx (B,t), the tokens that follow the kv["len"] already cached; appends their keys and values.

    Each new position computes only its own q, k, v and attends to every cached key:
    the same numbers as a full forward over the whole context, at the cost of t positions.
    If record is a dict, the residual stream after the embedding and after every block
    (record["residual"]) and every block's attention weights (record["attention"]) are kept.
    With last_only, the logits are the last position's alone, (B,1,V): the last block computes
    every position's keys and values, then goes on with the last query only (a prefill needs
    no more, and saves ~1/n_layer of its work; record then holds that block's last row only).
    """
    B, t = idx.shape
    start = kv["len"]
    if start + t > config.block_size:
        raise TinyLMError(f"KV cache holds {config.block_size} positions; asked for {start + t}")
    P, get, H = params, params.get, config.n_head
    x = P["transformer.wte.weight"][idx] + P["transformer.wpe.weight"][start:start + t]
    if record is not None:
        record.update(residual=[x], attention=[])
    for i in range(config.n_layer):
        pre = block_prefix(i)
        h, _ = L.layernorm_forward(x, P[pre + "ln_1.weight"], get(pre + "ln_1.bias"))
        qkv, _ = linear_by_name(P, pre + "attn.c_attn", h)
        q, k, v = L.qkv_heads(qkv, H)                                 # views, (B,H,t,D) each
        kv["k"][i, :, :, start:start + t] = k
        kv["v"][i, :, :, start:start + t] = v
        keys, values = kv["k"][i, :, :, :start + t], kv["v"][i, :, :, :start + t]
        if last_only and i == config.n_layer - 1:
            q, x = q[:, :, -1:], x[:, -1:]                            # the others' keys and values are cached
        q = q * (1.0 / math.sqrt(config.n_embd // H))                  # scale Q: t·D numbers, not t·(start+t)
        att = L.causal_softmax_(q @ keys.transpose(0, 1, 3, 2), offset=start + t - q.shape[2])
        y = np.empty((B, q.shape[2], config.n_embd), dtype=x.dtype)
        np.matmul(att, values, out=L.split_heads(y, H))
        a, _ = linear_by_name(P, pre + "attn.c_proj", y)
        x = x + a
        h, _ = L.layernorm_forward(x, P[pre + "ln_2.weight"], get(pre + "ln_2.bias"))
        f, _ = linear_by_name(P, pre + "mlp.c_fc", h)
        f = L.gelu_values_forward(f)
        m, _ = linear_by_name(P, pre + "mlp.c_proj", f)
        x += m
        if record is not None:
            record["residual"].append(x)
            record["attention"].append(att)
    kv["len"] = start + t
    x, _ = L.layernorm_forward(x, P["transformer.ln_f.weight"], get("transformer.ln_f.bias"))
    logits, _ = L.linear_forward(x, P["transformer.wte.weight"])
    return logits


def decoding_weights(params, config):
    """The weights of `params` rearranged for decode_next, computing the same function as forward.

    Plain math, per block (x̂ = (x − x̄)/σ, σ = √(var x + ε); w, b the layer norm's gain and shift):
        (x̂ ⊙ w + b) Wᵀ + c  =  x̂ (W diag(w))ᵀ + (W b + c)          gain and shift folded into W
        x̂ Aᵀ = (x − x̄) Aᵀ / σ = x (A P)ᵀ / σ,   P = I − 11ᵀ/C          the centring folded too: A P is A
                                                                       with each row's mean subtracted
        x A'ᵀ / σ + d  =  [x, σ] [A', d]ᵀ / σ                          the shift as one more column
    so each layer norm + linear layer is one vector-matrix product of the raw residual x followed by
    one multiplication by 1/σ (decode_next keeps σ next to x). The attention scale 1/√D is folded into
    the query rows of c_attn, and the attention and MLP output projections carry their biases as a
    last column too (the vectors they multiply end in a 1). That is the algebra in (out, in) form;
    each matrix is stored transposed, (in + 1, out), for the product v @ M (so the query rows are
    the first C columns as stored, and a bias column is the last row), because OpenBLAS's kernel
    for that layout streams the rows: 1.04-1.08× faster here than a dot product per (out, in + 1)
    row. Computed once per generate() call: a few array copies, so the per-token loop does no
    rearranging.
    """
    P, get = params, params.get
    C, H = config.n_embd, config.n_head

    def fold(ln, W, c):
        """[A', d]ᵀ (C+1, rows) for the layer norm `ln` followed by the linear layer (W, c)."""
        w, b = P[ln + ".weight"], get(ln + ".bias")
        A = W * w
        A -= A.mean(axis=1, keepdims=True)
        d = np.zeros(W.shape[0], W.dtype)
        if b is not None:
            d += W @ b
        if c is not None:
            d += c
        return np.ascontiguousarray(np.concatenate([A, d[:, None]], axis=1).T)

    def with_bias(W, c):
        """[W, c]ᵀ (cols+1, rows), c = 0 when the layer has no bias."""
        col = np.zeros((W.shape[0], 1), W.dtype) if c is None else c[:, None]
        return np.ascontiguousarray(np.concatenate([W, col], axis=1).T)

    def passing_last(M):
        """M (in+1, r) with one more column that carries the vector's last entry (σ, or the 1) through: (in+1, r+1)."""
        col = np.zeros((M.shape[0], 1), M.dtype)
        col[-1] = 1.0
        return np.ascontiguousarray(np.concatenate([M, col], axis=1))

    def layer(name, ln=None, scale=None):
        """The stored matrix for the linear layer `name` (after the layer norm `ln`, if given). A factorized
        layer W = A B (fast/linears.py) gives the pair (M₁, M₂) = (the same for B with no bias, passing σ or 1
        through; [A, c]ᵀ), used as (v M₁) M₂: [x, σ] M₁ = [x B'ᵀ + σ B b, σ], then that M₂ is the A (x B'ᵀ +
        σ B b)ᵀ + σ c of the dense form."""
        c = get(name + ".bias")
        if name + ".weight_A" not in P:
            W = P[name + ".weight"]
            if name + ".lora_A" in P:                   # an unmerged adapter (lowrank/adapters.py): fold it in
                W = W + P[name + ".lora_B"] @ P[name + ".lora_A"]
            W = W if scale is None else scale * W
            return fold(ln, W, c) if ln else with_bias(W, c)
        A, B = P[name + ".weight_A"], P[name + ".weight_B"]
        first = fold(ln, B, None) if ln else with_bias(B, None)
        return passing_last(first), with_bias(A if scale is None else scale * A, c)

    layers = []
    for i in range(config.n_layer):
        pre = block_prefix(i)
        W_attn = layer(pre + "attn.c_attn", pre + "ln_1")
        (W_attn[1] if isinstance(W_attn, tuple) else W_attn)[:, :C] *= 1.0 / math.sqrt(C // H)
        W_fc = layer(pre + "mlp.c_fc", pre + "ln_2")
        layers.append((W_attn, layer(pre + "attn.c_proj"), W_fc, layer(pre + "mlp.c_proj", scale=0.5)))
    head = fold("transformer.ln_f", P["transformer.wte.weight"], None)
    return {"wte": P["transformer.wte.weight"], "wpe": P["transformer.wpe.weight"], "layers": layers,
            "head": head, "n_head": H, "eps": 1e-5}


def decoding_buffers(kv, dtype):
    """Buffers and views for decode_next, made once per cache: per layer the cache's (2, H, block, D) slab
    (keys then values), its keys as (H, D, block) and its values (H, block, D); the residual x inside a
    (2, C+1) array [[1 … 1, 0], [x, σ]] so one product gives Σx and Σx²; one (3C,) buffer for q, k, v
    with q seen as (H, 1, D) and k, v as (2, H, D); the attention output (C+1,) ending in a 1 and seen as
    (H, 1, D); the MLP's hidden (4C,) and its 2·GELU (4C+1,) ending in a 1; a (C,) buffer for the
    outputs of the two projections."""
    n_layer, _, H, _, D = kv["k"].shape
    C = H * D
    both = kv["kv"]                                              # (n_layer, 1, 2, H, block, D)
    xs = np.zeros((2, C + 1), dtype)
    xs[0, :C] = 1.0
    qkv = np.empty(3 * C, dtype)
    y = np.empty(C + 1, dtype)
    y[C] = 1.0
    g = np.empty(4 * C + 1, dtype)
    g[4 * C] = 1.0
    layers = [(both[i, 0], both[i, 0, 0].transpose(0, 2, 1), both[i, 0, 1]) for i in range(n_layer)]
    return {"layers": layers, "xs": xs, "sums_of": xs[:, :C], "x": xs[1, :C], "xa": xs[1], "sums": np.empty(2, dtype),
            "qkv": qkv, "q": qkv[:C].reshape(H, 1, D), "kv": qkv[C:].reshape(2, H, D),
            "y": y, "y_heads": y[:C].reshape(H, 1, D), "f": np.empty(4 * C, dtype), "g": g, "g_out": g[:4 * C],
            "out": np.empty(C, dtype)}


def matvec_into(v, M, out):
    """out = v M for a stored matrix M, or (v M₁) M₂ for a factorized layer's pair (M₁, M₂) (decoding_weights)."""
    if type(M) is tuple:
        return np.dot(np.dot(v, M[0]), M[1], out=out)
    return np.dot(v, M, out=out)


def decode_next(dw, kv, token):
    """Logits (V,) for one more token of a single sequence whose earlier tokens are in kv (batch 1).

    The same numbers as forward_cached(params, config, [[token]], kv)[0, -1], with the weights of
    decoding_weights(params, config) = dw, written for one query: it sees every cached key, so no
    causal mask is needed; vectors are 1-D, every product writes into a preallocated buffer, and each
    block costs ~30 NumPy calls and no allocation beyond the scores (at one token a step, the calls'
    overhead is the cost). A layer norm is one product for Σx and Σx² plus the 1/σ after the next product.
    A factorized layer (fast/linears.py) is two products through its rank-r middle (matvec_into).
    """
    pos = kv["len"]
    n = pos + 1
    if n > kv["k"].shape[3]:
        raise TinyLMError(f"KV cache holds {kv['k'].shape[3]} positions; asked for {n}")
    buf = kv.get("decode")
    if buf is None:
        buf = kv["decode"] = decoding_buffers(kv, kv["k"].dtype)
    sums_of, x, xa, sums = buf["sums_of"], buf["x"], buf["xa"], buf["sums"]
    C = x.size
    eps, inv_C = dw["eps"], 1.0 / C
    np.add(dw["wte"][token], dw["wpe"][pos], out=x)              # the residual stream, inside xa = [x, σ]

    def inverse_sigma():
        """1/σ, σ = √(var x + ε) of the residual x, from one product giving Σx and Σx²; σ stored next to x in xa."""
        s1, s2 = np.dot(sums_of, x, out=sums).tolist()
        mean = s1 * inv_C
        xa[C] = sigma = math.sqrt(max(s2 * inv_C - mean * mean, 0.0) + eps)
        return 1.0 / sigma

    return decode_blocks(dw, kv, buf, inverse_sigma)


def decode_blocks(dw, kv, buf, inverse_sigma):
    """The blocks and the head for the position kv["len"], whose embedding is in buf["x"]: logits (V,) or (B, V).

    The loop of decode_next and decode_rows, on their buffers (decoding_buffers or decoding_buffers_rows:
    one vector, or a row per sequence; the indexing counts from the last axes, so it serves both).
    inverse_sigma() stores σ of the residual next to it in buf["xa"] and returns 1/σ (a float, or a (B, 1)
    column): the layer norm, whose gain, shift and centring decoding_weights folded into the next matrix.
    """
    x, xa, qkv, q, new_kv, y, y_heads, f, g, g_out, out = (buf[k] for k in (
        "x", "xa", "qkv", "q", "kv", "y", "y_heads", "f", "g", "g_out", "out"))
    pos = kv["len"]
    n = pos + 1
    c1, c0 = L.GELU_SCALE * L.GELU_CUBIC, L.GELU_SCALE
    for (W_attn, W_o, W_fc, W_p), (KV, Kt, V) in zip(dw["layers"], buf["layers"]):
        inv = inverse_sigma()                                  # first: the product reads σ from xa
        matvec_into(xa, W_attn, qkv)
        qkv *= inv                                             # q (already × 1/√D), k, v
        KV[..., pos, :] = new_kv                               # append this position's key and value
        s = np.matmul(q, Kt[..., :n])                          # (…, H, 1, n) scores against every cached key
        s -= np.maximum.reduce(s, axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= np.add.reduce(s, axis=-1, keepdims=True)          # softmax: no mask, all n keys are visible
        np.matmul(s, V[..., :n, :], out=y_heads)               # heads side by side in y: (…, H, 1, D) -> (…, C)
        x += matvec_into(y, W_o, out)                           # y ends in 1: c_proj's bias included
        inv = inverse_sigma()
        matvec_into(xa, W_fc, f)
        f *= inv
        np.multiply(f, f, out=g_out)                           # 2·gelu(f) = f (1 + tanh(√(2/π)(f + 0.044715 f³)))
        g_out *= c1
        g_out += c0
        g_out *= f
        np.tanh(g_out, out=g_out)
        g_out += 1.0
        g_out *= f
        x += matvec_into(g, W_p, out)                           # W_p carries GELU's ½; g ends in 1: bias
    kv["len"] = n
    inv = inverse_sigma()
    logits = np.dot(xa, dw["head"])
    logits *= inv
    return logits


def decoding_buffers_rows(kv, dtype):
    """decoding_buffers for B sequences: the same buffers with a leading row per sequence ((B, C+1) for
    [x, σ], (B, 3C) for q, k, v, …), plus x² (B, C) and a (C,) of ones for the rows' Σx and Σx²."""
    n_layer, B, _, H, _, D = kv["kv"].shape
    C = H * D
    xa = np.zeros((B, C + 1), dtype)
    qkv = np.empty((B, 3 * C), dtype)
    y = np.empty((B, C + 1), dtype)
    y[:, C] = 1.0
    g = np.empty((B, 4 * C + 1), dtype)
    g[:, 4 * C] = 1.0
    both = kv["kv"]                                              # (n_layer, B, 2, H, block, D)
    layers = [(both[i], both[i, :, 0].transpose(0, 1, 3, 2), both[i, :, 1]) for i in range(n_layer)]
    return {"layers": layers, "xa": xa, "x": xa[:, :C], "sigma": xa[:, C:], "squares": np.empty((B, C), dtype),
            "ones": np.ones(C, dtype),
            "qkv": qkv, "q": qkv[:, :C].reshape(B, H, 1, D), "kv": qkv[:, C:].reshape(B, 2, H, D),
            "y": y, "y_heads": y[:, :C].reshape(B, H, 1, D), "f": np.empty((B, 4 * C), dtype), "g": g,
            "g_out": g[:, :4 * C], "out": np.empty((B, C), dtype)}


def decode_rows(dw, kv, tokens):
    """Logits (B, V) for one more token of each of B sequences of equal length in kv: decode_next's
    algebra with a row per sequence, so the ~30 NumPy calls a block are paid once for all B rows.

    The same numbers as forward_cached(params, config, tokens[:, None], kv)[:, -1]. A row's σ cannot be
    a Python float here: Σx and Σx² are reduced along each row, and every 1/σ is a (B, 1) column.
    """
    pos = kv["len"]
    n = pos + 1
    if n > kv["k"].shape[3]:
        raise TinyLMError(f"KV cache holds {kv['k'].shape[3]} positions; asked for {n}")
    buf = kv.get("decode_rows")
    if buf is None:
        buf = kv["decode_rows"] = decoding_buffers_rows(kv, kv["k"].dtype)
    x, sigma, squares, ones = buf["x"], buf["sigma"], buf["squares"], buf["ones"]
    eps, inv_C = dw["eps"], 1.0 / x.shape[1]
    np.add(dw["wte"][tokens], dw["wpe"][pos], out=x)

    def inverse_sigma():
        """1/σ, (B, 1), σ = √(var x + ε) of each row of x from two products (Σx, Σx²), stored next to it in xa.
        The few numbers per row are Python floats, as in decode_next: cheaper than more calls."""
        np.multiply(x, x, out=squares)
        sigma[:, 0] = [math.sqrt(max(s2 * inv_C - (s1 * inv_C) ** 2, 0.0) + eps)
                       for s1, s2 in zip(np.dot(x, ones).tolist(), np.dot(squares, ones).tolist())]
        return np.reciprocal(sigma)

    return decode_blocks(dw, kv, buf, inverse_sigma)


def trace_forward(params, config, idx):
    """The forward pass with its insides kept, for analysis (no dropout, no backward).

    idx (B,T) -> {"residual": [(B,T,C)] * (n_layer + 1), "attention": [(B,H,T,T)] * n_layer, "logits": (B,T,V)}
    """
    record = {}
    kv = new_kv_cache(config, idx.shape[0], params["transformer.wte.weight"].dtype)
    record["logits"] = forward_cached(params, config, idx, kv, record)
    return record


def refill_window(config):
    """How many tokens the cache keeps when it is full: half the block.

    With learned positions every cached key depends on its position, so a full cache
    cannot just drop its oldest entry; it is rebuilt from the last `refill_window`
    tokens. Each token then sees between block_size/2 and block_size tokens of context,
    and a refill costs one prefill every block_size/2 tokens.
    """
    return max(1, config.block_size // 2)


def generate(params, config, prompt, max_new_tokens, pick_next, use_cache=True, trace=None):
    """Yield max_new_tokens token ids, one at a time, each drawn by pick_next(logits (V,)) -> int.

    prompt: 1-D token ids (at least one). With use_cache, the context of each step is the
    tokens held in the KV cache (see refill_window); without it, the last block_size tokens,
    recomputed from scratch each step. If trace is a list, (context ids, logits) is appended per step.

    Run it with one BLAS thread (`with parallel.blas_threads(1):`, as sample.py, the trainer's
    sample and the bench do): one token's products are far too small to split, and a second
    BLAS thread waiting for a busy core stalls every call.
    """
    context = [int(t) for t in prompt][-config.block_size:]     # only the context is kept: memory stays bounded
    if not context:                                              # however many tokens are drawn
        raise TinyLMError("the prompt must contain at least one token")
    dtype = params["transformer.wte.weight"].dtype
    if not use_cache:
        for _ in range(max_new_tokens):
            logits, _, _ = forward(params, config, np.array([context]), for_backward=False)
            last = logits[0, -1]
            if trace is not None:
                trace.append((list(context), last))
            token = int(pick_next(last))
            yield token
            context = (context + [token])[-config.block_size:]
        return

    def prefill(context):
        kv = new_kv_cache(config, 1, dtype)
        return kv, forward_cached(params, config, np.array([context]), kv, last_only=True)[0, -1]

    dw = decoding_weights(params, config)
    kv, last = prefill(context)
    for step in range(max_new_tokens):
        if trace is not None:
            trace.append((list(context), last))
        token = int(pick_next(last))
        yield token
        if step == max_new_tokens - 1:
            break
        context.append(token)
        if len(context) > config.block_size:
            context = context[-refill_window(config):]
            kv, last = prefill(context)
        else:
            last = decode_next(dw, kv, token)


def prompt_rows(prompt, rows, block_size):
    """The prompt's last block_size token ids as `rows` equal rows.   prompt (t,) ints -> (rows, min(t, block_size))"""
    prompt = np.asarray([int(t) for t in prompt], dtype=np.int64)
    if prompt.size == 0:
        raise TinyLMError("the prompt must contain at least one token")
    if rows < 1:
        raise TinyLMError(f"rows must be at least 1, got {rows}")
    return np.repeat(prompt[None, -block_size:], rows, axis=0)


def generate_rows(params, config, prompt, rows, max_new_tokens, pick_next, use_cache=True, trace=None):
    """generate() for `rows` sequences drawn side by side from one prompt: yield (rows,) token ids a step,
    drawn by pick_next(logits (rows, V)) -> (rows,) ints.

    The sequences stay the same length, so they share one KV cache with a row each, its refills and
    decode_rows: a step's NumPy calls are paid once for all rows, and each row gets the numbers
    generate() gives it alone, up to float rounding (BLAS may sum a many-row product in another order;
    the tests hold them to 1e-10 in float64). If trace is a list,
    (contexts (rows, t), logits (rows, V)) is appended per step. One BLAS thread, as for generate().
    """
    context = prompt_rows(prompt, rows, config.block_size)                     # (rows, t)
    dtype = params["transformer.wte.weight"].dtype

    def prefill(context):
        kv = new_kv_cache(config, rows, dtype)
        return kv, forward_cached(params, config, context, kv, last_only=True)[:, -1]

    if use_cache:
        dw = decoding_weights(params, config)
        kv, last = prefill(context)
    for step in range(max_new_tokens):
        if not use_cache:
            last = forward(params, config, context, for_backward=False)[0][:, -1]
        if trace is not None:
            trace.append((context.copy(), last))
        picked = np.asarray(pick_next(last), dtype=np.int64).reshape(rows)
        yield picked
        if step == max_new_tokens - 1:
            break
        context = np.concatenate([context, picked[:, None]], axis=1)
        if context.shape[1] > config.block_size:
            context = context[:, -(refill_window(config) if use_cache else config.block_size):]
            if use_cache:
                kv, last = prefill(context)
        elif use_cache:
            last = decode_rows(dw, kv, picked)
