"""GPT-2 in plain NumPy: the config, the parameters, forward beside backward, and generation.

Parameters live in a flat dict under nanoGPT's state_dict names (transformer.wte.weight,
transformer.h.{i}.attn.c_attn.weight, …; `.bias` beside each weight when config.bias), so a
checkpoint is a GPT-2 other tools can load by name. A linear weight is (out, in): y = x Wᵀ + b.
The output head is tied to the token embedding wte. Shapes: B sequences, T tokens, C = n_embd,
V = vocab_size. There is no dropout here: training adds it on the fast path (tinylm/fast/model.py),
which computes the same functions faster and is held equal to this model by tests.
Read `forward` and `backward` side by side: the backward walks the same blocks in reverse.
"""
import dataclasses
import math

import numpy as np

from tinylm.core import layers as L
from tinylm.errors import TinyLMError, brief, shorten


@dataclasses.dataclass
class GPTConfig:
    """The shape of the model; field names are nanoGPT's."""
    block_size: int = 64      # longest context, in tokens
    vocab_size: int = 65      # number of distinct tokens
    n_layer: int = 4          # transformer blocks
    n_head: int = 4           # attention heads per block
    n_embd: int = 128         # width of the residual stream, C
    dropout: float = 0.0      # applied in training, by the fast path (tinylm/fast/model.py)
    bias: bool = False        # biases in the linear layers and layer norms

    def validate(self):
        """Raise TinyLMError naming the first field that cannot work; return self."""
        check_shared_fields(self, ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"))
        if not isinstance(self.bias, bool):
            raise TinyLMError(f"bias must be true or false, got {brief(self.bias)}")
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return config_from_dict(cls, d)


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


def linear(P, name, x):
    """The linear layer `name` (e.g. transformer.h.0.mlp.c_fc): x name.weightᵀ + name.bias (if any)."""
    return L.linear_forward(x, P[name + ".weight"], P.get(name + ".bias"))


def layernorm(P, name, x):
    """The layer norm `name` (e.g. transformer.h.0.ln_1) with its gain name.weight and shift name.bias (if any)."""
    return L.layernorm_forward(x, P[name + ".weight"], P.get(name + ".bias"))


def grads_by_name(name, grads):
    """A layer's gradients ({"W" or "w", "b"}) under its parameters' names: name.weight, name.bias."""
    out = {name + ".weight": grads["W"] if "W" in grads else grads["w"]}
    if "b" in grads:
        out[name + ".bias"] = grads["b"]
    return out


def block_forward(P, config, pre, x):
    """x + attn(ln_1(x)), then that + mlp(ln_2(that)); pre names the block.   x (B,T,C) -> (B,T,C)"""
    c = {}
    h, c["ln_1"] = layernorm(P, pre + "ln_1", x)
    qkv, c["attn.c_attn"] = linear(P, pre + "attn.c_attn", h)            # (B,T,3C)
    a, c["attn"] = L.attention_forward(qkv, config.n_head)
    a, c["attn.c_proj"] = linear(P, pre + "attn.c_proj", a)
    x = x + a                                                            # the residual stream carries x on
    h, c["ln_2"] = layernorm(P, pre + "ln_2", x)
    f, c["mlp.c_fc"] = linear(P, pre + "mlp.c_fc", h)                    # (B,T,4C)
    g, c["gelu"] = L.gelu_forward(f)
    m, c["mlp.c_proj"] = linear(P, pre + "mlp.c_proj", g)
    return x + m, c


def block_backward(dx, c, pre):
    """block_forward's steps in reverse.   dx (B,T,C) -> (dx (B,T,C), the block's grads by parameter name)

    d<name> is the gradient of block_forward's array <name>.
    """
    grads = {}

    def back(name, dy, layer_backward=L.linear_backward):
        """The layer `name`'s backward: returns its input's gradient, keeps its parameters' under their names."""
        d_in, layer_grads = layer_backward(dy, c[name])
        grads.update(grads_by_name(pre + name, layer_grads))
        return d_in

    dg = back("mlp.c_proj", dx)                  # x + m passes dx unchanged to both x and m
    df = L.gelu_backward(dg, c["gelu"])
    dh = back("mlp.c_fc", df)
    dh = back("ln_2", dh, L.layernorm_backward)
    dx = dx + dh                                 # x reached the output two ways: straight on, and through the MLP
    da = back("attn.c_proj", dx)
    dqkv = L.attention_backward(da, c["attn"])
    dh = back("attn.c_attn", dqkv)
    dh = back("ln_1", dh, L.layernorm_backward)
    return dx + dh, grads


def forward(params, config, idx, targets=None):
    """logits = GPT-2(idx).   idx (B,T) ints, targets (B,T) or None -> (logits (B,T,V), loss or None, cache)"""
    T = idx.shape[1]
    if T > config.block_size:
        raise TinyLMError(f"sequence of length {T} is longer than block_size {config.block_size}")
    P = params
    cache = {"blocks": []}
    x, cache["emb"] = L.embedding_forward(idx, P["transformer.wte.weight"], P["transformer.wpe.weight"])
    for i in range(config.n_layer):
        x, c = block_forward(P, config, block_prefix(i), x)
        cache["blocks"].append(c)
    x, cache["ln_f"] = layernorm(P, "transformer.ln_f", x)
    logits, cache["head"] = L.linear_forward(x, P["transformer.wte.weight"])    # head tied to wte: (B,T,V)
    loss = None
    if targets is not None:
        loss, cache["loss"] = L.cross_entropy_forward(logits, targets)
    return logits, loss, cache


def backward(params, config, cache):
    """Gradients of forward's mean cross-entropy loss: a dict with exactly params' keys and shapes."""
    if "loss" not in cache:
        raise TinyLMError("backward needs the cache of a forward given targets")
    dlogits = L.cross_entropy_backward(1.0, cache["loss"])
    dx, pg = L.linear_backward(dlogits, cache["head"])
    dwte_head = pg["W"]                           # wte is also the head: this part joins the embedding's below
    dx, pg = L.layernorm_backward(dx, cache["ln_f"])
    grads = grads_by_name("transformer.ln_f", pg)
    for i in reversed(range(config.n_layer)):
        dx, block_grads = block_backward(dx, cache["blocks"][i], block_prefix(i))
        grads.update(block_grads)
    pg = L.embedding_backward(dx, cache["emb"])
    grads["transformer.wte.weight"] = pg["wte"] + dwte_head
    grads["transformer.wpe.weight"] = pg["wpe"]
    return {k: grads[k] for k in params}


# ----------------------------------------------------------------------------- generation


def generate(params, config, prompt, max_new_tokens, pick_next):
    """Yield max_new_tokens token ids one at a time, each pick_next(logits (V,)) -> int of the next token.

    prompt: 1-D token ids (at least one). Each step runs the whole forward on the last block_size tokens:
    no key-value cache, so every step recomputes what the step before already knew (the fast path keeps it).
    """
    tokens = [int(t) for t in prompt]
    if not tokens:
        raise TinyLMError("the prompt must contain at least one token")
    for _ in range(max_new_tokens):
        logits, _, _ = forward(params, config, np.array([tokens[-config.block_size:]]))
        tokens.append(int(pick_next(logits[0, -1])))
        yield tokens[-1]


# ----------------------------------------------------------------------------- bookkeeping


def is_block_matrix(name, shape):
    """A 2-D array inside a block: the attention and MLP weights (or their low-rank factors). Muon steps these."""
    return name.startswith("transformer.h.") and len(shape) == 2


def count_params(config, include_positions=True):
    """Number of parameters (the tied head is counted once, as the token embedding)."""
    n = sum(math.prod(s) for s in param_shapes(config).values())
    return n if include_positions else n - config.block_size * config.n_embd


def matmul_flops(config, batch_size):
    """Floating-point operations of one training step, counting matrix products only.   -> dict

    A product (m, n) @ (n, k) costs 2·m·n·k (a multiply and an add per term). Per token, the
    forward pass multiplies by every block weight and by the tied head (2 per weight), and
    each attention layer forms QKᵀ and AV over T positions (2·2·T·C: the whole T×T square,
    as nanoGPT and PaLM count it, although for T > 128 the fast path's attention skips the
    blocks above the diagonal). The backward pass costs twice the forward (one product for
    dX, one for dW), so a step is 3 forwards over batch_size·block_size tokens.
    """
    C, T, n_layer = config.n_embd, config.block_size, config.n_layer
    weights = n_layer * 12 * C * C + config.vocab_size * C          # c_attn 3C², c_proj C², c_fc 4C², mlp c_proj 4C²; head
    forward_per_token = 2 * weights + n_layer * 4 * T * C
    tokens = batch_size * T
    return {"forward_per_token": forward_per_token, "tokens_per_step": tokens,
            "per_step": 3 * forward_per_token * tokens}


def count_tensors(config):
    """len(param_shapes(config)), from the config alone: a loader compares it with what a file holds before it
    builds the list, so a config claiming 10⁸ layers costs nothing to refuse. (Built from param_shapes of
    0 and 1 layers, so the two cannot disagree.)"""
    outside = len(param_shapes(dataclasses.replace(config, n_layer=0)))
    per_block = len(param_shapes(dataclasses.replace(config, n_layer=1))) - outside
    return outside + config.n_layer * per_block


def iter_param_shapes(config):
    """(name, shape) of param_shapes(config), in its order, one at a time: the first names come at once even for a
    config that claims 10⁸ layers (a loader names what a file lacks this way). Block i is block 0 renamed."""
    one = param_shapes(dataclasses.replace(config, n_layer=1))
    first = block_prefix(0)
    outside = [(k, s) for k, s in one.items() if not k.startswith(first)]
    yield from outside[:2]                                   # wte, wpe
    for i in range(config.n_layer):
        for k, s in one.items():
            if k.startswith(first):
                yield block_prefix(i) + k[len(first):], s
    yield from outside[2:]                                   # ln_f


def config_from_dict(cls, d):
    """A config dataclass `cls` (GPTConfig, LlamaConfig) from a dict, e.g. checkpoint metadata, refusing
    unknown or missing fields."""
    if not isinstance(d, dict):
        raise TinyLMError("model config must be a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise TinyLMError(f"unknown model config field(s): {shorten(', '.join(sorted(map(str, unknown))))}")
    missing = names - set(d)
    if missing:
        raise TinyLMError(f"missing model config field(s): {', '.join(sorted(missing))}")
    return cls(**d).validate()


def check_shared_fields(config, integer_fields):
    """What GPTConfig and LlamaConfig check alike: the integer_fields positive integers, n_embd divisible by
    n_head, dropout in [0, 1). Raises TinyLMError naming the flag."""
    for name in integer_fields:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise TinyLMError(f"--{name} must be a positive integer, got {brief(value)}")
    if config.n_embd % config.n_head:
        raise TinyLMError(f"--n_embd ({config.n_embd}) must be divisible by --n_head ({config.n_head})")
    if not isinstance(config.dropout, (int, float)) or not 0.0 <= config.dropout < 1.0:
        raise TinyLMError(f"--dropout must be in [0, 1), got {brief(config.dropout)}")
