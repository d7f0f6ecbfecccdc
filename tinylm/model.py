"""GPT-2 in NumPy: config, init, forward, backward and generation with a key-value cache.

Parameters live in a flat dict under nanoGPT's state_dict names, so a tinylm
checkpoint is a GPT-2 that other tools can load by name. Read `forward` and
`backward` side by side: the backward walks the same blocks in reverse.
"""
import dataclasses
import math

import numpy as np

from . import layers as L
from .adapters import lora_linear_backward, lora_linear_forward
from .errors import TinyLMError
from .lowrank import lowrank_backward, lowrank_forward


@dataclasses.dataclass
class GPTConfig:
    """The shape of the model; field names are nanoGPT's."""
    block_size: int = 64      # longest context, in tokens
    vocab_size: int = 65      # number of distinct tokens
    n_layer: int = 4          # transformer blocks
    n_head: int = 4           # attention heads per block
    n_embd: int = 128         # width of the residual stream, C
    dropout: float = 0.0      # applied in training only
    bias: bool = False        # biases in the linear layers and layer norms

    def validate(self):
        """Raise TinyLMError naming the first field that cannot work; return self."""
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise TinyLMError(f"--{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise TinyLMError(f"--n_embd ({self.n_embd}) must be divisible by --n_head ({self.n_head})")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise TinyLMError(f"--dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise TinyLMError(f"bias must be true or false, got {self.bias!r}")
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Build from a dict (e.g. checkpoint metadata), refusing unknown or missing fields."""
        if not isinstance(d, dict):
            raise TinyLMError("model config must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise TinyLMError(f"unknown model config field(s): {', '.join(sorted(unknown))}")
        missing = names - set(d)
        if missing:
            raise TinyLMError(f"missing model config field(s): {', '.join(sorted(missing))}")
        return cls(**d).validate()


def block_prefix(i):
    return f"transformer.h.{i}."


def param_shapes(config):
    """Every parameter name -> shape, in nanoGPT's state_dict order (the tied head appears once, as wte)."""
    C = config.n_embd
    shapes = {"transformer.wte.weight": (config.vocab_size, C), "transformer.wpe.weight": (config.block_size, C)}

    def add(name, shape):
        shapes[name + ".weight"] = shape
        if config.bias:
            shapes[name + ".bias"] = shape[:1]

    for i in range(config.n_layer):
        p = block_prefix(i)
        add(p + "ln_1", (C,))
        add(p + "attn.c_attn", (3 * C, C))
        add(p + "attn.c_proj", (C, C))
        add(p + "ln_2", (C,))
        add(p + "mlp.c_fc", (4 * C, C))
        add(p + "mlp.c_proj", (C, 4 * C))
    add("transformer.ln_f", (C,))
    return shapes


def count_params(config, include_positions=True):
    """Number of parameters (the tied head is counted once, as the token embedding)."""
    n = sum(math.prod(s) for s in param_shapes(config).values())
    return n if include_positions else n - config.block_size * config.n_embd


def matmul_flops(config, batch_size):
    """Floating-point operations of one training step, counting matrix products only.   -> dict

    A product (m, n) @ (n, k) costs 2·m·n·k (a multiply and an add per term). Per token, the
    forward pass multiplies by every block weight and by the tied head (2 per weight), and
    each attention layer forms QKᵀ and AV over T positions (2·2·T·C: the whole T×T square,
    as nanoGPT and PaLM count it, although for T > 128 layers.attention_forward skips the
    blocks above the diagonal). The backward pass costs twice the forward (one product for
    dX, one for dW), so a step is 3 forwards over batch_size·block_size tokens.
    """
    C, T, L = config.n_embd, config.block_size, config.n_layer
    weights = L * 12 * C * C + config.vocab_size * C          # c_attn 3C², c_proj C², c_fc 4C², mlp c_proj 4C²; head
    forward_per_token = 2 * weights + L * 4 * T * C
    tokens = batch_size * T
    return {"forward_per_token": forward_per_token, "tokens_per_step": tokens,
            "per_step": 3 * forward_per_token * tokens}


def init_params(config, seed=0, dtype=np.float32):
    """GPT-2 init: weights N(0, 0.02), residual projections N(0, 0.02/√(2·n_layer)), LN gain 1, biases 0."""
    config.validate()
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if ".ln_" in name and name.endswith(".weight"):
            params[name] = np.ones(shape, dtype=dtype)
        elif name.endswith(".bias"):
            params[name] = np.zeros(shape, dtype=dtype)
        else:
            std = 0.02
            if name.endswith("c_proj.weight"):      # these add into the residual stream, once per sublayer
                std = 0.02 / math.sqrt(2 * config.n_layer)
            params[name] = (rng.standard_normal(shape) * std).astype(dtype)
    return params


# ----------------------------------------------------------------------------- forward / backward


def without_input(linear_cache):
    """A linear layer's cache with its input x dropped, for an input that is cheaper to recompute than to keep."""
    return (None,) + tuple(linear_cache[1:])


def with_input(linear_cache, x):
    """The cache again, with the recomputed input x put back."""
    return (x,) + tuple(linear_cache[1:])


def linear_by_name(params, name, x):
    """The linear layer `name` (e.g. transformer.h.0.mlp.c_fc) on x: y = x Wᵀ + b with W = name.weight, or
    y = (x Bᵀ) Aᵀ + b when params hold its factors name.weight_A, name.weight_B instead (lowrank.py), or
    y = x Wᵀ + (x Aᵀ) Bᵀ + b, W frozen, when they hold an adapter name.lora_A, name.lora_B (adapters.py)."""
    A, bias = params.get(name + ".weight_A"), params.get(name + ".bias")
    if A is not None:
        return lowrank_forward(x, A, params[name + ".weight_B"], bias)
    if name + ".lora_A" in params:
        return lora_linear_forward(x, params[name + ".weight"], params[name + ".lora_A"], params[name + ".lora_B"],
                                   bias)
    return L.linear_forward(x, params[name + ".weight"], bias)


def linear_backward_by_name(params, name, dy, cache):
    """The backward of linear_by_name(params, name, ·): (dx, {"W", "b"}) dense, (dx, {"A", "B", "b"}) factorized,
    (dx, {"lora_A", "lora_B", "b"}) with an adapter (its W frozen: no dW)."""
    if name + ".weight_A" in params:
        return lowrank_backward(dy, cache)
    if name + ".lora_A" in params:
        return lora_linear_backward(dy, cache)
    return L.linear_backward(dy, cache)


def recomputed_input(linear_cache, ln_cache):
    """The cache of a linear layer fed by a layer norm, its input put back from the norm's cache if it was dropped."""
    if linear_cache[0] is not None:
        return linear_cache
    return with_input(linear_cache, L.layernorm_output(ln_cache))


# Cheap activations are kept for the backward while a layer's (B,T,4C) array is at most this big (the
# CPU recipe: 0.8 MB a layer per thread), and recomputed in the backward when larger (baby GPT: 50 MB a
# layer per thread): GELU's output and slope, from GELU's input (2·B·T·4C numbers a layer held as
# B·T·4C, for one more GELU forward), and the two layer norms' outputs (2·B·T·C, from x̂: one multiply-add
# each). Baby GPT holds 0.9 GB less (predicted; 0.6 GB of it GELU's) for no time that shows through the
# host's noise.
RECOMPUTE_ABOVE_BYTES = 8 << 20


def forward(params, config, idx, targets=None, train=False, rng=None, for_backward=True):
    """logits = GPT(idx).   idx (B,T) ints -> (logits (B,T,V), loss or None, cache for backward)

    Dropout is applied only when train is True and an rng (np.random.Generator) is given.
    With for_backward=False (evaluation, sampling without the cache, analysis) the cache comes back
    as None and GELU skips the slope that only the backward needs.
    """
    B, T = idx.shape
    if T > config.block_size:
        raise TinyLMError(f"sequence of length {T} is longer than block_size {config.block_size}")
    p = config.dropout if train else 0.0
    rng = rng if train else None
    P = params
    get = P.get
    cache = {"blocks": []}
    recompute = B * T * 4 * config.n_embd * P["transformer.wte.weight"].itemsize > RECOMPUTE_ABOVE_BYTES

    x, cache["emb"] = L.embedding_forward(idx, P["transformer.wte.weight"], P["transformer.wpe.weight"])
    x, cache["emb_drop"] = L.dropout_forward(x, p, rng)
    for i in range(config.n_layer):
        pre = block_prefix(i)
        c = {}
        # attention sublayer: x + proj(attention(c_attn(ln_1(x))))
        h, c["ln_1"] = L.layernorm_forward(x, P[pre + "ln_1.weight"], get(pre + "ln_1.bias"))
        qkv, c["c_attn"] = linear_by_name(P, pre + "attn.c_attn", h)
        if recompute:
            c["c_attn"] = without_input(c["c_attn"])             # h again from ln_1's x̂ in the backward
        a, c["attn"] = L.attention_forward(qkv, config.n_head, p, rng)
        a, c["attn_proj"] = linear_by_name(P, pre + "attn.c_proj", a)
        a, c["attn_drop"] = L.dropout_forward(a, p, rng)
        x, _ = L.residual_forward(x, a)
        # MLP sublayer: x + c_proj(gelu(c_fc(ln_2(x))))
        h, c["ln_2"] = L.layernorm_forward(x, P[pre + "ln_2.weight"], get(pre + "ln_2.bias"))
        f, c["c_fc"] = linear_by_name(P, pre + "mlp.c_fc", h)
        if not for_backward:
            g = L.gelu_values_forward(f)
        elif recompute:   # keep GELU's input only: its slope and output (2·B·T·4C numbers) are recomputed
            c["c_fc"] = without_input(c["c_fc"])
            g, c["gelu_in"] = L.gelu_values_forward(f), f
        else:
            g, c["gelu"] = L.gelu_forward(f)
        m, c["mlp_proj"] = linear_by_name(P, pre + "mlp.c_proj", g)
        if recompute:
            c["mlp_proj"] = without_input(c["mlp_proj"])         # g again from GELU's input in the backward
        del h, g
        m, c["mlp_drop"] = L.dropout_forward(m, p, rng)
        x, _ = L.residual_forward(x, m)
        cache["blocks"].append(c)
    x, cache["ln_f"] = L.layernorm_forward(x, P["transformer.ln_f.weight"], get("transformer.ln_f.bias"))
    logits, cache["head"] = L.linear_forward(x, P["transformer.wte.weight"])   # head tied to wte

    loss = None
    if targets is not None:
        loss, cache["loss"] = L.cross_entropy_forward(logits, targets)
    return logits, loss, cache if for_backward else None


def backward(params, config, cache, dloss=1.0):
    """Gradients of dloss × the mean cross-entropy loss for every parameter: a dict with the keys (and shapes)
    of params, but for the frozen weight under an adapter, which has none. (dloss is this loss's weight in a
    sum of losses; 1 gives its own gradient.)"""
    grads = {}

    def put(prefix, g):
        if "A" in g:                                   # a factorized layer (lowrank.py)
            grads[prefix + ".weight_A"], grads[prefix + ".weight_B"] = g["A"], g["B"]
        elif "lora_A" in g:                            # an adapter on a frozen weight (adapters.py)
            grads[prefix + ".lora_A"], grads[prefix + ".lora_B"] = g["lora_A"], g["lora_B"]
        else:
            grads[prefix + ".weight"] = g.get("W", g.get("w"))
        if "b" in g:
            grads[prefix + ".bias"] = g["b"]

    dlogits = L.cross_entropy_backward(dloss, cache["loss"])
    dx, g = L.linear_backward(dlogits, cache["head"])
    dwte_head = g["W"]
    dx, g = L.layernorm_backward(dx, cache["ln_f"])
    put("transformer.ln_f", g)
    for i in reversed(range(config.n_layer)):
        pre = block_prefix(i)
        c = cache["blocks"][i]
        dx, dm = L.residual_backward(dx, None)
        dm = L.dropout_backward(dm, c["mlp_drop"])
        if "gelu" in c:
            proj_cache, gelu_cache = c["mlp_proj"], c["gelu"]
        else:   # GELU's output and slope recomputed here, one layer at a time, not kept from the forward
            g_out, gelu_cache = L.gelu_forward(c["gelu_in"])
            proj_cache = with_input(c["mlp_proj"], g_out)
            del g_out
        df, g = linear_backward_by_name(params, pre + "mlp.c_proj", dm, proj_cache)
        del proj_cache
        put(pre + "mlp.c_proj", g)
        df = L.gelu_backward_(df, gelu_cache)                    # in place: df is linear_backward's own new array
        del gelu_cache
        dh, g = linear_backward_by_name(params, pre + "mlp.c_fc", df, recomputed_input(c["c_fc"], c["ln_2"]))
        put(pre + "mlp.c_fc", g)
        dh, g = L.layernorm_backward(dh, c["ln_2"])
        put(pre + "ln_2", g)
        dx = dx + dh
        dx, da = L.residual_backward(dx, None)
        da = L.dropout_backward(da, c["attn_drop"])
        da, g = linear_backward_by_name(params, pre + "attn.c_proj", da, c["attn_proj"])
        put(pre + "attn.c_proj", g)
        dqkv = L.attention_backward(da, c["attn"])
        dh, g = linear_backward_by_name(params, pre + "attn.c_attn", dqkv, recomputed_input(c["c_attn"], c["ln_1"]))
        put(pre + "attn.c_attn", g)
        dh, g = L.layernorm_backward(dh, c["ln_1"])
        put(pre + "ln_1", g)
        dx = dx + dh
    dx = L.dropout_backward(dx, cache["emb_drop"])
    g = L.embedding_backward(dx, cache["emb"])
    grads["transformer.wte.weight"] = g["wte"] + dwte_head
    grads["transformer.wpe.weight"] = g["wpe"]
    frozen = {k[:-len(".lora_A")] + ".weight" for k in params if k.endswith(".lora_A")}
    return {k: grads[k] for k in params if k not in frozen}


def loss_and_grads(params, config, idx, targets, train=False, rng=None, dloss=1.0):
    """(loss, grads of dloss × loss) for one batch: the forward then the backward."""
    _, loss, cache = forward(params, config, idx, targets, train=train, rng=rng)
    return loss, backward(params, config, cache, dloss)


def loss_and_grads_parallel(params, config, idx, targets, train=False, rng=None, workers=None):
    """loss_and_grads computed as `workers` slices of the batch on as many threads (default: one per core).

    The loss is a mean over the N = B·T positions, so with slices of n_i positions
    loss = Σ (n_i/N) loss_i  and  grads = Σ (n_i/N) grads_i:  the same numbers as
    loss_and_grads up to float rounding. Slice i's backward starts from dloss = n_i/N, so its
    gradients come out weighted and are simply added. Each slice runs the plain forward and backward
    on its own thread with one BLAS thread (see parallel.py). With dropout, slice i draws
    its masks from a generator seeded by rng, so runs are reproducible but the masks differ
    from loss_and_grads'. Falls back to loss_and_grads where it cannot help.
    """
    from . import parallel
    parallel.keep_freed_memory()            # reuse the step's freed arrays instead of faulting in fresh pages
    B = idx.shape[0]
    workers = min(workers or parallel.usable_cores(), B)
    if workers < 2 or not parallel.blas_available():
        return loss_and_grads(params, config, idx, targets, train=train, rng=rng)
    bounds = np.linspace(0, B, workers + 1).round().astype(int)
    use_rng = train and rng is not None and config.dropout > 0
    seeds = rng.integers(0, 2**63, size=workers) if use_rng else [None] * workers
    weights = [float(w) for w in np.diff(bounds) / B]
    jobs = [(params, config, idx[a:b], targets[a:b], train, np.random.default_rng(s) if use_rng else None, w)
            for a, b, s, w in zip(bounds[:-1], bounds[1:], seeds, weights)]
    results = parallel.run_parallel(loss_and_grads, jobs)
    loss = float(sum(w * l for w, (l, _) in zip(weights, results)))
    grads = results[0][1]

    def add_slices(names):                 # grads[k] = Σ_i w_i grads_i[k], in place (each already carries its w_i)
        for name in names:
            for _, other in results[1:]:
                grads[name] += other[name]

    parallel.for_each_split(add_slices, grads, workers=workers)
    return loss, grads


# ----------------------------------------------------------------------------- generation with a KV cache


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
        layer W = A B (lowrank.py) gives the pair (M₁, M₂) = (the same for B with no bias, passing σ or 1
        through; [A, c]ᵀ), used as (v M₁) M₂: [x, σ] M₁ = [x B'ᵀ + σ B b, σ], then that M₂ is the A (x B'ᵀ +
        σ B b)ᵀ + σ c of the dense form."""
        c = get(name + ".bias")
        if name + ".weight_A" not in P:
            W = P[name + ".weight"]
            if name + ".lora_A" in P:                   # an unmerged adapter (adapters.py): fold it in
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
    A factorized layer (lowrank.py) is two products through its rank-r middle (matvec_into).
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
    tokens = [int(t) for t in prompt]
    if not tokens:
        raise TinyLMError("the prompt must contain at least one token")
    dtype = params["transformer.wte.weight"].dtype
    if not use_cache:
        for _ in range(max_new_tokens):
            context = tokens[-config.block_size:]
            logits, _, _ = forward(params, config, np.array([context]), for_backward=False)
            last = logits[0, -1]
            if trace is not None:
                trace.append((context, last))
            tokens.append(int(pick_next(last)))
            yield tokens[-1]
        return

    def prefill(context):
        kv = new_kv_cache(config, 1, dtype)
        return kv, forward_cached(params, config, np.array([context]), kv, last_only=True)[0, -1]

    dw = decoding_weights(params, config)
    context = tokens[-config.block_size:]
    kv, last = prefill(context)
    for step in range(max_new_tokens):
        if trace is not None:
            trace.append((list(context), last))
        tokens.append(int(pick_next(last)))
        yield tokens[-1]
        if step == max_new_tokens - 1:
            break
        context.append(tokens[-1])
        if len(context) > config.block_size:
            context = context[-refill_window(config):]
            kv, last = prefill(context)
        else:
            last = decode_next(dw, kv, tokens[-1])


def generate_rows(params, config, prompt, rows, max_new_tokens, pick_next, use_cache=True, trace=None):
    """generate() for `rows` sequences drawn side by side from one prompt: yield (rows,) token ids a step,
    drawn by pick_next(logits (rows, V)) -> (rows,) ints.

    The sequences stay the same length, so they share one KV cache with a row each, its refills and
    decode_rows: a step's NumPy calls are paid once for all rows, and each row gets the numbers
    generate() gives it alone, up to float rounding (BLAS may sum a many-row product in another order;
    the tests hold them to 1e-10 in float64). If trace is a list,
    (contexts (rows, t), logits (rows, V)) is appended per step. One BLAS thread, as for generate().
    """
    prompt = np.asarray([int(t) for t in prompt], dtype=np.int64)
    if prompt.size == 0:
        raise TinyLMError("the prompt must contain at least one token")
    if rows < 1:
        raise TinyLMError(f"rows must be at least 1, got {rows}")
    dtype = params["transformer.wte.weight"].dtype
    context = np.repeat(prompt[None, -config.block_size:], rows, axis=0)        # (rows, t)

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
