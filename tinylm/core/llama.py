"""A Llama in plain NumPy: the config, the parameters, forward beside backward, and generation.

The same transformer as gpt2.py with four changes, each a piece of linear algebra: rotary position
embeddings turn each (q, k) pair of coordinates by an angle set by the position (no wpe); RMSNorm
rescales to a fixed norm without first removing the mean; SwiGLU gates one linear map by another;
grouped-query attention shares each key/value head among several query heads. No biases anywhere.
Parameters live in a flat dict under Hugging Face's LlamaForCausalLM state_dict names
(model.embed_tokens.weight, model.layers.{i}.self_attn.q_proj.weight, …, lm_head.weight), so a
checkpoint is a Llama other tools can load by name. Shapes: B, T, C = n_embd, V = vocab_size,
H = n_head query heads and Hkv = n_kv_head key/value heads of width D = C/H, F = ffn_hidden.
Read `forward` and `backward` side by side: the backward walks the same blocks in reverse.
"""
import dataclasses
import math

import numpy as np

from tinylm.core import layers as L
from tinylm.core.gpt2 import check_shared_fields, config_from_dict, grads_by_name, linear
from tinylm.errors import TinyLMError, brief


def default_ffn_hidden(n_embd):
    """Llama's MLP width: 2/3 of 4C (three matrices cost what GPT-2's two 4C ones do), up to a multiple of 32."""
    hidden = 2 * (4 * n_embd) // 3
    return 32 * math.ceil(hidden / 32)


@dataclasses.dataclass
class LlamaConfig:
    """The shape of a Llama. n_kv_head defaults to n_head (no sharing); ffn_hidden to default_ffn_hidden(n_embd):
    2/3 of 4·n_embd rounded up to a multiple of 32. arch is always "llama" (GPT-2's configs have no such field)."""
    block_size: int = 64      # longest context, in tokens
    vocab_size: int = 65      # number of distinct tokens
    n_layer: int = 4          # transformer blocks
    n_head: int = 4           # query heads per block
    n_kv_head: int = None     # key/value heads per block, each shared by n_head/n_kv_head query heads
    n_embd: int = 128         # width of the residual stream, C
    ffn_hidden: int = None    # width of the SwiGLU MLP, F
    rope_theta: float = 10000.0   # the rotary angles' base: pair j turns by θ^(−2j/D) per position
    norm_eps: float = 1e-5    # ε of RMSNorm
    tie_embeddings: bool = False  # the output head is the token embedding, stored once
    dropout: float = 0.0      # applied in training, by the fast path (tinylm/fast/llama.py)
    arch: str = "llama"

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.ffn_hidden is None and isinstance(self.n_embd, (int, np.integer)) and not isinstance(self.n_embd, bool):
            self.ffn_hidden = default_ffn_hidden(self.n_embd)

    def validate(self):
        """Raise TinyLMError naming the first field that cannot work; return self."""
        check_shared_fields(self, ("block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden"))
        if self.n_head % self.n_kv_head:
            raise TinyLMError(f"--n_head ({self.n_head}) must be divisible by --n_kv_head ({self.n_kv_head})")
        if (self.n_embd // self.n_head) % 2:
            raise TinyLMError(f"--n_embd / --n_head, the head width, must be even for rotary pairs, got "
                              f"{self.n_embd // self.n_head}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise TinyLMError(f"--{name} must be a positive finite number, got {brief(value)}")
        if not isinstance(self.tie_embeddings, bool):
            raise TinyLMError(f"--tie_embeddings must be true or false, got {brief(self.tie_embeddings)}")
        if self.arch != "llama":
            raise TinyLMError(f"arch must be 'llama' for a LlamaConfig, got {brief(self.arch)}")
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return config_from_dict(cls, d)


def block_prefix(i):
    return f"model.layers.{i}."


def is_block_matrix(name, shape):
    """A 2-D array inside a block: the attention and MLP weights. Muon steps these."""
    return name.startswith("model.layers.") and len(shape) == 2


def param_shapes(config):
    """Every parameter name -> shape, in Hugging Face's state_dict order (a tied head appears once, as embed_tokens)."""
    C, F, D = config.n_embd, config.ffn_hidden, config.n_embd // config.n_head
    shapes = {"model.embed_tokens.weight": (config.vocab_size, C)}
    for i in range(config.n_layer):
        p = block_prefix(i)
        shapes[p + "self_attn.q_proj.weight"] = (config.n_head * D, C)
        shapes[p + "self_attn.k_proj.weight"] = (config.n_kv_head * D, C)
        shapes[p + "self_attn.v_proj.weight"] = (config.n_kv_head * D, C)
        shapes[p + "self_attn.o_proj.weight"] = (C, config.n_head * D)
        shapes[p + "mlp.gate_proj.weight"] = (F, C)
        shapes[p + "mlp.up_proj.weight"] = (F, C)
        shapes[p + "mlp.down_proj.weight"] = (C, F)
        shapes[p + "input_layernorm.weight"] = (C,)
        shapes[p + "post_attention_layernorm.weight"] = (C,)
    shapes["model.norm.weight"] = (C,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, C)
    return shapes


def count_tensors(config):
    """len(param_shapes(config)) from the config alone, as gpt2.count_tensors: nine a block, the embedding, the final
    norm, and the head unless it is tied (a loader refuses a config claiming 10⁸ layers before building any list)."""
    return 9 * config.n_layer + 2 + (not config.tie_embeddings)


def iter_param_shapes(config):
    """(name, shape) of param_shapes(config), in its order, one at a time, as gpt2.iter_param_shapes: a loader names
    the first tensors a file lacks at once even for a config that claims 10⁸ layers. Block i is block 0 renamed."""
    one = param_shapes(dataclasses.replace(config, n_layer=1))
    first = block_prefix(0)
    yield "model.embed_tokens.weight", one["model.embed_tokens.weight"]
    for i in range(config.n_layer):
        yield from ((block_prefix(i) + k[len(first):], s) for k, s in one.items() if k.startswith(first))
    yield from ((k, s) for k, s in one.items() if k != "model.embed_tokens.weight" and not k.startswith(first))


def count_params(config, include_positions=True):
    """Number of parameters (a tied head counted once). Rotary positions have no parameters, so
    include_positions, kept for gpt2.count_params' signature, changes nothing."""
    return sum(math.prod(s) for s in param_shapes(config).values())


def matmul_flops(config, batch_size):
    """Floating-point operations of one training step, counting matrix products only, as gpt2.matmul_flops counts
    them: 2 per weight per token for the block matrices and the head, 2·2·T·C per token for each attention's
    QKᵀ and AV, and a backward of twice the forward.   -> dict"""
    C, T, F, D = config.n_embd, config.block_size, config.ffn_hidden, config.n_embd // config.n_head
    per_block = 2 * C * config.n_head * D + 2 * C * config.n_kv_head * D + 3 * C * F   # q, o; k, v; gate, up, down
    forward_per_token = 2 * (config.n_layer * per_block + config.vocab_size * C) + config.n_layer * 4 * T * C
    tokens = batch_size * T
    return {"forward_per_token": forward_per_token, "tokens_per_step": tokens,
            "per_step": 3 * forward_per_token * tokens}


def init_params(config, seed=0, dtype=np.float32):
    """Weights N(0, 0.02), o_proj and down_proj N(0, 0.02/√(2·n_layer)) as GPT-2 does, RMSNorm gains 1."""
    config.validate()
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if len(shape) == 1:                              # the RMSNorm gains
            params[name] = np.ones(shape, dtype=dtype)
        else:
            std = 0.02
            if name.endswith(("o_proj.weight", "down_proj.weight")):   # these add into the residual stream
                std = 0.02 / math.sqrt(2 * config.n_layer)
            params[name] = (rng.standard_normal(shape) * std).astype(dtype)
    return params


# ----------------------------------------------------------------------------- forward / backward


def rmsnorm(P, config, name, x):
    """The RMSNorm `name` (e.g. model.layers.0.input_layernorm) with its gain name.weight."""
    return L.rmsnorm_forward(x, P[name + ".weight"], config.norm_eps)


def block_forward(P, config, pre, x):
    """x + attn(norm(x)), then that + mlp(norm(that)); pre names the block.   x (B,T,C) -> (B,T,C)"""
    c = {}
    positions = np.arange(x.shape[1])
    h, c["input_layernorm"] = rmsnorm(P, config, pre + "input_layernorm", x)
    q, c["self_attn.q_proj"] = linear(P, pre + "self_attn.q_proj", h)           # (B,T,H·D)
    k, c["self_attn.k_proj"] = linear(P, pre + "self_attn.k_proj", h)           # (B,T,Hkv·D)
    v, c["self_attn.v_proj"] = linear(P, pre + "self_attn.v_proj", h)           # (B,T,Hkv·D)
    q, c["rope_q"] = L.rope_forward(L.split_heads(q, config.n_head), positions, config.rope_theta)
    k, c["rope_k"] = L.rope_forward(L.split_heads(k, config.n_kv_head), positions, config.rope_theta)
    a, c["attn"] = L.grouped_attention_forward(q, k, L.split_heads(v, config.n_kv_head))   # (B,H,T,D)
    a, c["self_attn.o_proj"] = linear(P, pre + "self_attn.o_proj", L.merge_heads(a))
    x = x + a                                                                  # the residual stream carries x on
    h, c["post_attention_layernorm"] = rmsnorm(P, config, pre + "post_attention_layernorm", x)
    g, c["mlp.gate_proj"] = linear(P, pre + "mlp.gate_proj", h)                 # (B,T,F)
    u, c["mlp.up_proj"] = linear(P, pre + "mlp.up_proj", h)                     # (B,T,F)
    m, c["swiglu"] = L.swiglu_forward(g, u)
    m, c["mlp.down_proj"] = linear(P, pre + "mlp.down_proj", m)
    return x + m, c


def block_backward(dx, c, pre, config):
    """block_forward's steps in reverse.   dx (B,T,C) -> (dx (B,T,C), the block's grads by parameter name)"""
    grads = {}

    def back(name, dy, layer_backward=L.linear_backward):
        """dy back through the layer `name` of this block; its weight's gradient is kept in grads."""
        d, g = layer_backward(dy, c[name])
        grads.update(grads_by_name(pre + name, g))
        return d

    # x + m passes dx unchanged to both x and m
    dg, du = L.swiglu_backward(back("mlp.down_proj", dx), c["swiglu"])
    dh = back("mlp.gate_proj", dg) + back("mlp.up_proj", du)         # h fed both projections: the gradients add
    dx = dx + back("post_attention_layernorm", dh, L.rmsnorm_backward)
    da = L.split_heads(back("self_attn.o_proj", dx), config.n_head)
    dq, dk, dv = L.grouped_attention_backward(da, c["attn"])
    dq, dk = L.rope_backward(dq, c["rope_q"]), L.rope_backward(dk, c["rope_k"])
    dh = (back("self_attn.q_proj", L.merge_heads(dq)) + back("self_attn.k_proj", L.merge_heads(dk))
          + back("self_attn.v_proj", L.merge_heads(dv)))
    return dx + back("input_layernorm", dh, L.rmsnorm_backward), grads


def head_name(config):
    """The output head's weight: the token embedding itself when tied."""
    return "model.embed_tokens.weight" if config.tie_embeddings else "lm_head.weight"


def forward(params, config, idx, targets=None):
    """logits = Llama(idx).   idx (B,T) ints, targets (B,T) or None -> (logits (B,T,V), loss or None, cache)"""
    T = idx.shape[1]
    if T > config.block_size:
        raise TinyLMError(f"sequence of length {T} is longer than block_size {config.block_size}")
    P = params
    cache = {"blocks": []}
    x, cache["emb"] = L.embedding_forward(idx, P["model.embed_tokens.weight"])   # no wpe: positions are rotations
    for i in range(config.n_layer):
        x, c = block_forward(P, config, block_prefix(i), x)
        cache["blocks"].append(c)
    x, cache["norm"] = rmsnorm(P, config, "model.norm", x)
    logits, cache["head"] = L.linear_forward(x, P[head_name(config)])           # (B,T,V)
    loss = None
    if targets is not None:
        loss, cache["loss"] = L.cross_entropy_forward(logits, targets)
    return logits, loss, cache


def backward(params, config, cache):
    """Gradients of forward's mean cross-entropy loss: a dict with exactly params' keys and shapes."""
    if "loss" not in cache:
        raise TinyLMError("backward needs the cache of a forward given targets")
    dlogits = L.cross_entropy_backward(1.0, cache["loss"])
    dx, g = L.linear_backward(dlogits, cache["head"])
    dhead = g["W"]
    dx, g = L.rmsnorm_backward(dx, cache["norm"])
    grads = grads_by_name("model.norm", g)
    for i in reversed(range(config.n_layer)):
        dx, g = block_backward(dx, cache["blocks"][i], block_prefix(i), config)
        grads.update(g)
    grads["model.embed_tokens.weight"] = L.embedding_backward(dx, cache["emb"])["wte"]
    if config.tie_embeddings:
        grads["model.embed_tokens.weight"] += dhead          # the embedding is also the head: the two parts add
    else:
        grads["lm_head.weight"] = dhead
    return {k: grads[k] for k in params}


# ----------------------------------------------------------------------------- generation


def generate(params, config, prompt, max_new_tokens, pick_next):
    """Yield max_new_tokens token ids one at a time, each pick_next(logits (V,)) -> int of the next token.

    prompt: 1-D token ids (at least one). As gpt2.generate: each step runs the whole forward on the last
    block_size tokens, with no key-value cache. A window's positions start at 0: with rotary embeddings only
    offsets reach the scores, so starting where the window really starts would give the same logits.
    """
    tokens = [int(t) for t in prompt]
    if not tokens:
        raise TinyLMError("the prompt must contain at least one token")
    for _ in range(max_new_tokens):
        logits, _, _ = forward(params, config, np.array([tokens[-config.block_size:]]))
        tokens.append(int(pick_next(logits[0, -1])))
        yield tokens[-1]
