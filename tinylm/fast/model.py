"""core/gpt2.py's forward and backward, made fast for training: the same parameter dict and the same numbers.

What it adds to core, each for speed or for training: dropout; fast/layers.py's attention by row blocks and
in-place passes; activations recomputed in the backward when they are large (RECOMPUTE_ABOVE_BYTES); the
factorized and LoRA forms of a linear layer (fast/linears.py); a batch split over threads
(loss_and_grads_parallel). tests/test_core_model.py holds logits, loss and every gradient equal to core's.
The config, the parameter names and shapes, and init are core's (imported from core/gpt2.py).
"""
import numpy as np

from tinylm.core.gpt2 import block_prefix
from tinylm.fast import layers as L
from tinylm.errors import TinyLMError
from tinylm.fast.linears import lora_linear_backward, lora_linear_forward, lowrank_backward, lowrank_forward
from tinylm.fast import parallel


# ----------------------------------------------------------------------------- forward / backward


def without_input(linear_cache):
    """A linear layer's cache with its input x dropped, for an input that is cheaper to recompute than to keep."""
    return (None,) + tuple(linear_cache[1:])


def with_input(linear_cache, x):
    """The cache again, with the recomputed input x put back."""
    return (x,) + tuple(linear_cache[1:])


def linear_by_name(params, name, x):
    """The linear layer `name` (e.g. transformer.h.0.mlp.c_fc) on x: y = x Wᵀ + b with W = name.weight, or
    y = (x Bᵀ) Aᵀ + b when params hold its factors name.weight_A, name.weight_B instead (fast/linears.py), or
    y = x Wᵀ + (x Aᵀ) Bᵀ + b, W frozen, when they hold an adapter name.lora_A, name.lora_B (lowrank/adapters.py)."""
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
        if "A" in g:                                   # a factorized layer (fast/linears.py)
            grads[prefix + ".weight_A"], grads[prefix + ".weight_B"] = g["A"], g["B"]
        elif "lora_A" in g:                            # an adapter on a frozen weight (lowrank/adapters.py)
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


def loss_and_grads_parallel(params, config, idx, targets, train=False, rng=None, workers=None,
                            model_loss_and_grads=None):
    """loss_and_grads computed as `workers` slices of the batch on as many threads (default: one per core).

    model_loss_and_grads is the model's own (params, config, idx, targets, train, rng, dloss) -> (loss, grads):
    this module's loss_and_grads (GPT-2's) when None; fast/llama.py passes Llama's.

    The loss is a mean over the N = B·T positions, so with slices of n_i positions
    loss = Σ (n_i/N) loss_i  and  grads = Σ (n_i/N) grads_i:  the same numbers as
    loss_and_grads up to float rounding. Slice i's backward starts from dloss = n_i/N, so its
    gradients come out weighted and are simply added. Each slice runs the plain forward and backward
    on its own thread with one BLAS thread (see parallel.py). With dropout, slice i draws
    its masks from a generator seeded by rng, so runs are reproducible but the masks differ
    from loss_and_grads'. Falls back to loss_and_grads where it cannot help.
    """
    model_loss_and_grads = model_loss_and_grads or loss_and_grads
    parallel.keep_freed_memory()            # reuse the step's freed arrays instead of faulting in fresh pages
    B = idx.shape[0]
    workers = min(workers or parallel.usable_cores(), B)
    if workers < 2 or not parallel.blas_available():
        return model_loss_and_grads(params, config, idx, targets, train=train, rng=rng)
    bounds = np.linspace(0, B, workers + 1).round().astype(int)
    use_rng = train and rng is not None and config.dropout > 0
    seeds = rng.integers(0, 2**63, size=workers) if use_rng else [None] * workers
    weights = [float(w) for w in np.diff(bounds) / B]
    jobs = [(params, config, idx[a:b], targets[a:b], train, np.random.default_rng(s) if use_rng else None, w)
            for a, b, s, w in zip(bounds[:-1], bounds[1:], seeds, weights)]
    results = parallel.run_parallel(model_loss_and_grads, jobs)
    loss = float(sum(w * l for w, (l, _) in zip(weights, results)))
    grads = results[0][1]

    def add_slices(names):                 # grads[k] = Σ_i w_i grads_i[k], in place (each already carries its w_i)
        for name in names:
            for _, other in results[1:]:
                grads[name] += other[name]

    parallel.for_each_split(add_slices, grads, workers=workers)
    return loss, grads
