"""Interventions: change what the model computes and measure what changes, so a finding is tested, not only seen.

- Head ablation: a head's output, its softmax(Q Kᵀ/√D + mask) V before the output projection c_proj,
  is replaced at every position by zero ("zero") or by its mean over the evaluation tokens ("mean"),
  and the validation loss is measured again. Δloss is how much the model relies on that head; a head
  whose pattern looks meaningful but whose Δloss is ~0 is not doing much with it.
- Steering: α·d is added to the residual stream at the input of block `layer`, at every position.
  A constant added to the residual stream is a bias: at layer 0 it is a shift of every position
  embedding (x₀ = wte[token] + wpe[t] + α d), at layer l > 0 a shift of block l−1's MLP output bias
  (block l−1 ends in x + c_proj(gelu(..)) + b). So `steer` returns edited parameters, and the fast
  generate() samples from the steered model as from any other. A Llama has no biases: at layer 0 every row of
  its token embedding is shifted; past it, steer_generate adds α·d inside this module's forward.

The forward here is written like tinylm/core/gpt2.py's and core/llama.py's, cut at the blocks so a run can start
at any layer and with the edits as arguments. It computes in the parameters' dtype (float64 to check, float32 for
speed); tests/test_interventions.py and tests/test_analysis_llama.py hold it equal to core's forward when no edit
is given. Shapes: B sequences, T tokens, C = n_embd, H heads of width D = C/H, L = n_layer.
"""
import os
import re

import numpy as np

from tinylm.errors import TinyLMError, brief, shorten
from tinylm.files import open_regular
from tinylm.core import layers as CL
from tinylm.core.layers import softmax
from tinylm.analysis.scale import token_labels
from tinylm.core.sampling import sample_next
from tinylm.core.arch import arch_of
from tinylm.fast.arch import decoder
from tinylm.fast.decode import trace_forward as cached_trace
from tinylm.analysis.weights import (block_matrix, block_prefix, embedding, norm_names, position_embedding,
                                     unembedding)
from tinylm.fast.parallel import blas_threads


def layer_norm(x, w, b=None):
    """core's layer norm as a plain function: (x − μ)/√(σ² + ε) ⊙ w + b over the last axis."""
    return CL.layernorm_forward(x, w, b)[0]


def linear(x, W, b=None):
    """core's linear layer as a plain function: x Wᵀ + b."""
    return CL.linear_forward(x, W, b)[0]


def gelu(x):
    """core's GELU (tanh form), written x·x·x (NumPy's x ** 3 is ~50× slower) with Python-float constants (float32 stays float32)."""
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))   # 0.797… = √(2/π)


# ----------------------------------------------------------------------------- the forward, with edits


def norm(P, config, name, x):
    """The norm `name` (its gain name.weight): GPT-2's layer norm, or a Llama's RMSNorm."""
    if arch_of(config) == "llama":
        return CL.rmsnorm_forward(x, P[name + ".weight"], config.norm_eps)[0]
    return layer_norm(x, P[name + ".weight"], P.get(name + ".bias"))


def queries_keys_values(P, config, i, h):
    """Block i's q (B,H,T,D) and k, v (B,H,T,D), a Llama's q and k turned by their positions' rotations and its
    shared key/value heads repeated for the query heads that read them.   h = the normed stream (B,T,C)"""
    B, T, C = h.shape
    H = config.n_head
    heads = lambda a: a.reshape(B, T, -1, C // H).transpose(0, 2, 1, 3)
    if arch_of(config) == "gpt2":
        pre = f"transformer.h.{i}.attn.c_attn"
        return (heads(a) for a in np.split(linear(h, P[pre + ".weight"], P.get(pre + ".bias")), 3, axis=-1))
    q, k, v = (heads(linear(h, block_matrix(P, config, i, "attn." + part))) for part in "qkv")
    positions = np.arange(T)
    q, k = (CL.rope_forward(a, positions, config.rope_theta)[0] for a in (q, k))
    G = H // config.n_kv_head                                          # query heads per key/value head
    return q, np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)


def head_outputs(P, config, i, h, attention=None):
    """Each head's softmax(Q Kᵀ/√D + mask) V, before the output projection mixes the heads.   h = the normed stream
    (B,T,C) -> (B,H,T,D). attention (a list) gets the weights softmax(…) (B,H,T,T)."""
    q, k, v = queries_keys_values(P, config, i, h)
    T, D = q.shape[2], q.shape[3]
    mask = np.triu(np.full((T, T), -np.inf, dtype=h.dtype), k=1)       # token t sees tokens ≤ t only
    att = softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(D).astype(h.dtype) + mask)
    if attention is not None:
        attention.append(att)
    return att @ v


def mlp(P, config, i, h):
    """The block's MLP: GPT-2's c_proj gelu(c_fc h), a Llama's W_down (silu(W_gate h) ⊙ W_up h).   (B,T,C) -> (B,T,C)"""
    if arch_of(config) == "llama":
        W = lambda kind: block_matrix(P, config, i, kind)
        return linear(CL.swiglu_forward(linear(h, W("mlp.gate")), linear(h, W("mlp.up")))[0], W("mlp.down"))
    p = f"transformer.h.{i}.mlp."
    return linear(gelu(linear(h, P[p + "c_fc.weight"], P.get(p + "c_fc.bias"))), P[p + "c_proj.weight"], P.get(p + "c_proj.bias"))


def block(P, config, i, x, replace=None, record=None, attention=None):
    """Block i on the residual stream x (B,T,C) -> (B,T,C), with head outputs replaced: replace = {head: value},
    value 0 or a (D,) vector put at every position. record (a list) gets this block's head outputs (B,H,T,D),
    attention (a list) its attention weights (B,H,T,T)."""
    attn_norm, mlp_norm, _, _ = norm_names(config, i)
    y = head_outputs(P, config, i, norm(P, config, attn_norm, x), attention)
    if record is not None:
        record.append(y.copy())
    for head, value in (replace or {}).items():
        y[:, head] = value                                              # the intervention: one line
    B, H, T, D = y.shape
    out = block_prefix(config, i) + ("attn.c_proj" if arch_of(config) == "gpt2" else "self_attn.o_proj")
    x = x + linear(y.transpose(0, 2, 1, 3).reshape(B, T, H * D), P[out + ".weight"], P.get(out + ".bias"))
    return x + mlp(P, config, i, norm(P, config, mlp_norm, x))


def embed(P, config, idx):
    """The residual stream before block 0: wte[idx] + wpe[:T] (GPT-2), embed_tokens[idx] (a Llama).   idx (B,T) -> (B,T,C)"""
    wpe = position_embedding(P, config)
    x = embedding(P, config)[idx]
    return x if wpe is None else x + wpe[:idx.shape[1]]


def mean_cross_entropy(logits, targets):
    """−mean log softmax(logits)[target], accumulated in float64.   logits (B,T,V), targets (B,T) -> float"""
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -float(np.take_along_axis(logp, targets[..., None], axis=-1).astype(np.float64).mean())


def final_logits(P, config, x):
    """The final norm, then the head.   the residual stream x (B,T,C) -> logits (B,T,V)"""
    return norm(P, config, norm_names(config)[2], x) @ unembedding(P, config).T


def forward_from(params, config, x, first, targets=None, replace=None, add=None):
    """Blocks first..L−1 on the residual stream x (B,T,C), then the final norm and the head: (logits (B,T,V), loss or None).

    replace: {(layer, head): 0 or a (D,) vector}, the heads' outputs replaced (head ablation).
    add: {layer: (C,) vector} added to the residual stream at the input of that block, L meaning before the final norm (steering).
    """
    replace, add = replace or {}, add or {}
    for i in range(first, config.n_layer):
        if i in add:
            x = x + add[i]
        x = block(params, config, i, x, {h: v for (l, h), v in replace.items() if l == i})
    if config.n_layer in add:
        x = x + add[config.n_layer]
    logits = final_logits(params, config, x)
    return logits, None if targets is None else mean_cross_entropy(logits, targets)


def forward(params, config, idx, targets=None, replace=None, add=None):
    """The model on token ids idx (B,T), with optional edits (see forward_from): (logits (B,T,V), loss or None)."""
    return forward_from(params, config, embed(params, config, idx), 0, targets, replace, add)


def trace_forward(params, config, idx):
    """The forward pass with its insides kept, for analysis.   idx (B,T) -> {"residual": [(B,T,C)] * (n_layer + 1),
    "attention": [(B,H,T,T)] * n_layer, "logits": (B,T,V)}. GPT-2's is fast/decode.py's (its cached forward)."""
    if arch_of(config) == "gpt2":
        return cached_trace(params, config, idx)
    xs, attention = [embed(params, config, idx)], []
    for i in range(config.n_layer):
        xs.append(block(params, config, i, xs[-1], attention=attention))
    return {"residual": xs, "attention": attention, "logits": final_logits(params, config, xs[-1])}


# ----------------------------------------------------------------------------- head ablation


def dense_run(params, config, idx):
    """The unedited model's residual stream at the input of every block (a list of L arrays (B,T,C)) and
    each head's mean output over the B·T tokens ((L, H, D), what mean ablation puts in its place)."""
    xs, heads = [embed(params, config, idx)], []
    for i in range(config.n_layer):
        xs.append(block(params, config, i, xs[-1], record=heads))
    return xs[:-1], np.stack([y.mean(axis=(0, 2)) for y in heads])


def check_mode(mode):
    if mode not in ("zero", "mean"):
        raise TinyLMError(f"ablation mode must be 'zero' or 'mean', got {mode!r}")


def ablate_heads(params, config, heads, mode, idx, targets, means=None):
    """Validation loss with every head in `heads` ([(layer, head)]) ablated at once: its output replaced by
    zero (mode "zero") or by its mean over these tokens (mode "mean").   idx, targets (B,T) -> float"""
    check_mode(mode)
    if mode == "mean" and means is None:
        means = dense_run(params, config, idx)[1]
    replace = {(l, h): 0.0 if mode == "zero" else means[l, h] for l, h in heads}
    return forward(params, config, idx, targets, replace=replace)[1]


def ablation_table(params, config, heads, mode, idx, targets, together=False, progress=False):
    """Each head of `heads` ablated alone: dense loss, ablated loss and Δ = ablated − dense, sorted by Δ (largest first).

    -> {"mode", "n_tokens", "dense_loss", "rows": [{"head": "L1H0", "layer", "index", "loss", "delta"}],
        "delta": (L, H) Δ per head (NaN where not ablated), "together": {"heads", "loss", "delta"} or None}
    Ablating a head of layer l changes nothing below l, so each run starts from the dense residual stream
    at block l (dense_run) instead of recomputing blocks 0..l−1.
    """
    from tqdm import tqdm
    check_mode(mode)
    xs, means = dense_run(params, config, idx)
    dense = forward_from(params, config, xs[0], 0, targets)[1]
    grid = np.full((config.n_layer, config.n_head), np.nan)
    rows = []
    for l, h in tqdm(heads, desc="ablation", disable=not progress, leave=False):
        value = 0.0 if mode == "zero" else means[l, h]
        loss = forward_from(params, config, xs[l], l, targets, replace={(l, h): value})[1]
        grid[l, h] = loss - dense
        rows.append({"head": head_name(l, h), "layer": l, "index": h, "loss": loss, "delta": loss - dense})
    rows.sort(key=lambda r: -r["delta"])
    joint = None
    if together and len(heads) > 1:
        loss = ablate_heads(params, config, heads, mode, idx, targets, means)
        joint = {"heads": "+".join(head_name(l, h) for l, h in heads), "loss": loss, "delta": loss - dense}
    return {"mode": mode, "n_tokens": int(idx.size), "dense_loss": dense, "rows": rows, "delta": grid, "together": joint}


def head_name(layer, head):
    return f"L{layer}H{head}"


HEAD_SPEC = re.compile(r"L(\d+)H(\d+)", re.I)


def parse_heads(text, config=None):
    """'L1H1', 'L0H2,L1H3' or 'all' -> [(layer, head)], checked against config's n_layer and n_head.
    Without config only the form is checked (and 'all' comes back as 'all'): analyze.py does that before loading."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if items == ["all"] and config is not None:
        return [(l, h) for l in range(config.n_layer) for h in range(config.n_head)]
    if items == ["all"]:
        return "all"
    heads = []
    for item in items or [""]:
        m = HEAD_SPEC.fullmatch(item)
        if not m:
            raise TinyLMError(f"--ablate {item!r}: expected heads as L<layer>H<head> (L1H1, or a list L0H2,L1H3) or all")
        heads.append((int(m[1]), int(m[2])))
    if config is not None:
        for l, h in heads:
            if l >= config.n_layer or h >= config.n_head:
                raise TinyLMError(f"--ablate {head_name(l, h)}: this model has layers 0-{config.n_layer - 1} and "
                                  f"heads 0-{config.n_head - 1} (L0H0 to {head_name(config.n_layer - 1, config.n_head - 1)})")
    return list(dict.fromkeys(heads))                                   # each head once, in the order given


ABLATION_HEADER = ["head", "dense loss", "ablated loss", "Δloss"]


def ablation_rows(sec):
    rows = [[r["head"], f"{sec['dense_loss']:.4f}", f"{r['loss']:.4f}", f"{r['delta']:+.4f}"] for r in sec["rows"]]
    if sec.get("together"):
        t = sec["together"]
        rows.append([t["heads"] + " together", f"{sec['dense_loss']:.4f}", f"{t['loss']:.4f}", f"{t['delta']:+.4f}"])
    return rows


# ----------------------------------------------------------------------------- steering


def case_direction(wte, chars):
    """The mean of wte['X'] − wte['x'] over every letter with both cases in the vocabulary: (C,).

    The offset the case analogies of embeddings.py test ('x' − 'X' + 'Y' ≈ 'y'), averaged. Scale 1 moves
    a lowercase letter's embedding onto its capital's, on average.
    """
    index = {c: i for i, c in enumerate(chars)}
    pairs = [(index[c], index[c.lower()]) for c in chars if len(c) == 1 and c.isupper() and c.lower() in index]
    if not pairs:
        raise TinyLMError("the vocabulary has no letter in both cases: there is no case direction")
    wte = np.asarray(wte, dtype=np.float64)
    return np.mean([wte[u] - wte[l] for u, l in pairs], axis=0)


def steering(params, config, direction, layer, scale):
    """(params, add): scale·direction added at the input of block `layer` by edited parameters (steer; add None),
    or, for a Llama past block 0, params unchanged and add = {layer: scale·direction} for steer_generate."""
    if arch_of(config) == "llama" and layer > 0:
        check_steering(config, direction, layer, scale)
        return params, {layer: scale * np.asarray(direction, dtype=np.float64)}
    return steer(params, config, direction, layer, scale), None


def check_steering(config, direction, layer, scale):
    """One line for a layer outside 0..L, a scale that is not finite or a direction not of n_embd numbers."""
    if not 0 <= layer <= config.n_layer:
        raise TinyLMError(f"--steer_layer must be in 0..{config.n_layer} (the input of a block, {config.n_layer}: "
                          f"before the final layer norm), got {layer}")
    if not np.isfinite(scale):
        raise TinyLMError(f"--steer_scale must be a finite number, got {scale}")
    if np.shape(direction) != (config.n_embd,):
        raise TinyLMError(f"a steering direction must have n_embd = {config.n_embd} entries, got shape {np.shape(direction)}")


def steer(params, config, direction, layer, scale):
    """Parameters of the same model with scale·direction added to the residual stream at the input of block
    `layer` (0..L; L: after the last block, before the final norm), at every position. direction (C,); params is
    not changed. A Llama: layer 0 only (see steering)."""
    check_steering(config, direction, layer, scale)
    direction = np.asarray(direction, dtype=np.float64)
    dtype = embedding(params, config).dtype
    if arch_of(config) == "llama":
        if layer > 0:
            raise TinyLMError(f"--steer_layer {layer}: a Llama has no biases to carry a steering vector into a block "
                              "past the first; steer_generate adds it in the forward instead")
        # x₀ = embed[token]: shifting every row adds α d at block 0's input. A tied head shifts too, which adds
        # α (x·d) to every logit of a position alike: the softmax, and so every sample, does not change.
        name = "model.embed_tokens.weight"
        return dict(params, **{name: (params[name] + scale * direction).astype(dtype)})
    # x₀ = wte[token] + wpe[t]: shifting every wpe row is adding to the stream at block 0's input;
    # block l−1 ends in x + (… c_projᵀ + b): shifting b is adding to the stream at block l's input.
    name = "transformer.wpe.weight" if layer == 0 else f"transformer.h.{layer - 1}.mlp.c_proj.bias"
    base = params[name] if name in params else np.zeros(config.n_embd, dtype)   # bias=False: a zero bias, then shifted
    return dict(params, **{name: (base + scale * direction).astype(dtype)})


def steer_generate(params, config, prompt, rows, max_new_tokens, pick_next, add):
    """Yield (rows,) token ids a step, each step a forward with `add` ({layer: (C,) vector}, see forward_from) over
    the last block_size tokens from position 0, as core's generate does: steering where no parameter can carry
    it (a Llama past block 0). pick_next(logits (rows, V)) -> (rows,) ints. No key-value cache: for small models."""
    context = np.repeat(np.asarray(prompt, dtype=np.int64)[None, -config.block_size:], rows, axis=0)
    add = {layer: np.asarray(v, dtype=embedding(params, config).dtype) for layer, v in add.items()}
    for _ in range(max_new_tokens):
        logits = forward(params, config, context[:, -config.block_size:], add=add)[0][:, -1]
        picked = np.asarray(pick_next(logits), dtype=np.int64).reshape(rows)
        yield picked
        context = np.concatenate([context, picked[:, None]], axis=1)


def read_vector(f, n, spec):
    """n numbers from an open .npy file, as float64: its header is read first and must say (n,) numbers, so a
    header claiming 2⁴⁰ of them is refused before anything is allocated; exactly those bytes are then read."""
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if dtype.hasobject or dtype.kind not in "fiu" or tuple(shape) != (n,):
        raise TinyLMError(f"--steer {spec}: expected {n} numbers (n_embd), got {dtype} {brief(tuple(shape))}")
    data = f.read(n * dtype.itemsize)
    if len(data) != n * dtype.itemsize:
        raise TinyLMError(f"--steer {spec}: the file ends before its {n} numbers do")
    return np.frombuffer(data, dtype=dtype).astype(np.float64)


def steering_direction(spec, params, config, tok):
    """sample.py's --steer: 'case' or a .npy file of n_embd numbers -> (direction (C,), a few words saying what it is).

    The file is read only when it is a regular file (a FIFO would hang the read), never unpickled, and its numbers
    must be finite (a NaN direction would make every logit NaN).
    """
    if spec == "case":
        d = case_direction(embedding(params, config), list(token_labels(tok, config.vocab_size)))
        return d, f"the case direction (mean embedding[X] - embedding[x], norm {np.linalg.norm(d):.3g})"
    if spec.endswith(".npy") and os.path.lexists(spec):
        try:
            with open_regular(spec, "--steer file") as f:
                d = read_vector(f, config.n_embd, spec)
        except (OSError, ValueError, EOFError, SyntaxError) as e:
            raise TinyLMError(f"--steer {spec}: not a readable .npy file ({shorten(str(e))})") from None
        if not np.isfinite(d).all():
            bad = int(np.flatnonzero(~np.isfinite(d))[0])
            raise TinyLMError(f"--steer {spec}: entry {bad} is {d[bad]}; a steering direction must be finite")
        return d, f"the direction in {spec} (norm {np.linalg.norm(d):.3g})"
    raise TinyLMError(f"--steer {brief(spec)}: expected 'case' or a .npy file holding an n_embd vector")


def uppercase_fraction(text):
    """Uppercase letters / letters in text (0 when it has no letter)."""
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def sample_texts(params, config, tok, start, n_samples=4, n_tokens=200, seed=0, temperature=0.8, top_k=200):
    """n_samples continuations of start (the new text only), drawn as sample.py draws them (one generator, seeded)."""
    rng = np.random.default_rng(seed)
    pick = lambda logits: sample_next(logits, temperature, top_k, None, rng)
    with blas_threads(1):
        return [tok.decode(list(decoder(config).generate(params, config, tok.encode(start), n_tokens, pick)))
                for _ in range(n_samples)]
