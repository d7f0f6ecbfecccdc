"""Low-rank adapters (LoRA, PiSSA): a frozen matrix W plus a trained product s·B A, s = α/R.

    W' = W + s·B A        W (out, in) frozen, B (out, R), A (R, in) trained

Two ways to run it, the same function:
- merged (`lora_forward`, `merged_params`): the adapter is a layer on the weight, W' = W + s·B A, and
  its backward turns the model's dW' = dyᵀx into dA = s·Bᵀ dW', dB = s·dW' Aᵀ. What --merge writes,
  and what sampling and evaluation run on.
- unmerged (`lora_linear_forward`, `adapter_params`): the layer itself is y = x Wᵀ + (x Aᵀ)(s·B)ᵀ, and
  its backward gives dA and dB from thin products and no dW at all: W is frozen, so the step skips
  the gradient of every target matrix (a fifth of the CPU recipe's step with every block matrix a
  target; the embeddings', layer norms' and untargeted matrices' gradients are still computed, and
  dropped). What training runs on.

Two starting points (`init_adapter`):
- 'lora': A uniform in ±1/√in, B = 0, so W' = W at step 0 and the update starts in a random subspace.
- 'pissa': the top-R singular triplets of W, W ≈ U_R Σ_R V_Rᵀ: B = U_R (Σ_R/s)^½, A = (Σ_R/s)^½ V_Rᵀ
  (with s = 1 these are PiSSA's U_R Σ_R^½ and Σ_R^½ V_Rᵀ), and the frozen part becomes the residual
  W − s·B A. W' is again W at step 0, but training moves the principal subspace itself.

Adapter parameters are named after their target: `transformer.h.0.attn.c_attn.weight` gets
`transformer.h.0.attn.c_attn.lora_A` (R, in) and `transformer.h.0.attn.c_attn.lora_B` (out, R); a Llama's
`model.layers.0.self_attn.q_proj.weight` gets `model.layers.0.self_attn.q_proj.lora_A` and `.lora_B`. The
targets are any of GPT-2's four block matrices or the Llama's seven (q, k, v, o_proj; gate, up, down_proj).
"""
import numpy as np

from tinylm.errors import TinyLMError

INITS = ("lora", "pissa")
BLOCK_MATRICES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LLAMA_BLOCK_MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class AdapterError(TinyLMError):
    """Adapter settings that cannot work with this model."""


def adapter_names(target):
    """The (A, B) parameter names of the adapter on `target` ('….weight')."""
    stem = target[:-len(".weight")]
    return stem + ".lora_A", stem + ".lora_B"


def kinds_of(shapes):
    """The block matrices' kinds of this model: GPT-2's four, or the Llama's seven (its names start model.layers.)."""
    return LLAMA_BLOCK_MATRICES if "model.embed_tokens.weight" in shapes else BLOCK_MATRICES


def block_matrix_names(shapes):
    """Every linear weight inside the blocks (the default targets), in model order."""
    return [k for k in shapes if k.startswith(("transformer.h.", "model.layers.")) and k.endswith(".weight")
            and k[:-len(".weight")].endswith(kinds_of(shapes))]


def resolve_targets(spec, shapes):
    """'all' or a comma list of matrix kinds (c_attn, attn.c_proj, mlp.c_fc, c_proj, …; a Llama's q_proj, k_proj,
    v_proj, o_proj, gate_proj, up_proj, down_proj, with or without self_attn. or mlp.) or full names -> names."""
    candidates = block_matrix_names(shapes)
    kinds = kinds_of(shapes)
    tokens = [t.strip() for t in str(spec).split(",") if t.strip()]
    if not tokens:
        raise AdapterError(f"--lora_targets is empty; give 'all' or a comma list such as {kinds[0]},{kinds[2]}")
    chosen = set()
    for token in tokens:
        if token == "all":
            hits = candidates
        else:
            hits = [k for k in candidates if k == token or k.endswith("." + token + ".weight")
                    or k == token + ".weight"]
        if not hits:
            short = "c_attn, c_proj, c_fc" if kinds is BLOCK_MATRICES else ", ".join(k.split(".")[1] for k in kinds)
            raise AdapterError(f"--lora_targets: {token!r} names no block matrix; use 'all' or any of "
                               f"{', '.join(kinds)} (or {short}), or a full name such as {candidates[0]}")
        chosen.update(hits)
    return [k for k in candidates if k in chosen]


def check_rank(rank, targets, shapes):
    """R must be at least 1 and at most min(out, in) of every target."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise AdapterError(f"--lora_rank must be a positive integer, got {rank}")
    for name in targets:
        full = min(shapes[name])
        if rank > full:
            raise AdapterError(f"--lora_rank {rank} is above the rank of {name} {tuple(shapes[name])}, "
                               f"which is at most {full}; choose --lora_rank <= {full}")


def adapter_shapes(targets, rank, shapes):
    """{adapter parameter name: shape} for these targets."""
    out = {}
    for name in targets:
        rows, cols = shapes[name]
        a, b = adapter_names(name)
        out[a], out[b] = (rank, cols), (rows, rank)
    return out


def scale_of(lora):
    """s = α/R; α = 0 stands for α = R (s = 1)."""
    alpha = lora["alpha"] or lora["rank"]
    return float(alpha) / lora["rank"]


def count_adapter_params(lora, shapes):
    return sum(int(np.prod(s)) for s in adapter_shapes(lora["targets"], lora["rank"], shapes).values())


# ----------------------------------------------------------------------------- the layer


def lora_forward(W, A, B, s):
    """W' = W + s·B A.   W (out, in), A (R, in), B (out, R) -> W' (out, in)"""
    W_used = (s * B) @ A                 # s on the thin factor: no full-size temporary for it
    W_used += W
    return W_used, (A, B, s)


def lora_backward(dW, cache):
    """dA = s·Bᵀ dW';  dB = s·dW' Aᵀ  (dW' (out, in) the gradient of the matrix the model used)."""
    A, B, s = cache
    return {"A": (s * B).T @ dW, "B": dW @ (s * A).T}


# ----------------------------------------------------------------------------- the model's view


def init_adapter(W, rank, s, kind, rng):
    """(frozen W, A, B) for one target, so that frozen + s·B A equals W."""
    rows, cols = W.shape
    if kind == "lora":
        A = rng.uniform(-1.0, 1.0, size=(rank, cols)) / np.sqrt(cols)
        return W, A.astype(W.dtype), np.zeros((rows, rank), dtype=W.dtype)
    if kind != "pissa":
        raise AdapterError(f"--lora_init must be one of {', '.join(INITS)}, got {kind!r}")
    U, S, Vt = np.linalg.svd(W.astype(np.float64), full_matrices=False)
    root = np.sqrt(S[:rank] / s)
    B = U[:, :rank] * root                      # U_R (Σ_R/s)^½
    A = root[:, None] * Vt[:rank]               # (Σ_R/s)^½ V_Rᵀ
    residual = W.astype(np.float64) - s * (B @ A)
    return residual.astype(W.dtype), A.astype(W.dtype), B.astype(W.dtype)


def init_adapters(params, lora, seed=0):
    """(frozen params, adapters): every target's base weight replaced by its frozen part."""
    rng = np.random.default_rng([seed, 16])
    s = scale_of(lora)
    frozen, adapters = dict(params), {}
    for name in lora["targets"]:
        a, b = adapter_names(name)
        frozen[name], adapters[a], adapters[b] = init_adapter(params[name], lora["rank"], s, lora["init"], rng)
    return frozen, adapters


def merged_params(frozen, adapters, lora):
    """The parameters the model runs on: frozen + s·B A at every target (the adapters' forward).

    One thread: dealt to two by target, these small products and sums came out slower here (0.54 against
    0.46 ms a step at R = 16, 0.43 against 0.22 at R = 4), the threads' hand-off costing more than they share."""
    s = scale_of(lora)
    params = dict(frozen)
    for name in lora["targets"]:
        a, b = adapter_names(name)
        params[name] = lora_forward(frozen[name], adapters[a], adapters[b], s)[0]
    return params


def adapter_grads(grads, adapters, lora):
    """The adapters' gradients from the model's gradients of the merged matrices (the adapters' backward)."""
    s = scale_of(lora)
    out = {}
    for name in lora["targets"]:
        a, b = adapter_names(name)
        g = lora_backward(grads[name], (adapters[a], adapters[b], s))
        out[a], out[b] = g["A"], g["B"]
    return out


def adapter_params(frozen, adapters, lora):
    """The parameters training runs on: the frozen weights, and at every target its A and s·B under the
    adapter's names, which the model runs as lora_linear_forward (no merged matrix is made)."""
    s = scale_of(lora)
    params = dict(frozen)
    for name in lora["targets"]:
        a, b = adapter_names(name)
        params[a], params[b] = adapters[a], (adapters[b] if s == 1.0 else s * adapters[b])
    return params


def adapter_grads_unmerged(grads, lora):
    """The adapters' gradients from the model's gradients on adapter_params: dA as it is, dB = s·d(s·B)."""
    s = scale_of(lora)
    out = {}
    for name in lora["targets"]:
        a, b = adapter_names(name)
        out[a], out[b] = grads[a], (grads[b] if s == 1.0 else s * grads[b])
    return out


def check_lora_meta(lora, shapes, where):
    """The 'lora' entry of a checkpoint's metadata, checked against the model: rank, α, targets, init."""
    if not isinstance(lora, dict):
        raise AdapterError(f"{where}: adapter settings are not an object")
    rank, alpha, targets, kind = (lora.get(k) for k in ("rank", "alpha", "targets", "init"))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha) or alpha < 0:
        raise AdapterError(f"{where}: adapter alpha {alpha!r} is not a number >= 0")
    if kind not in INITS:
        raise AdapterError(f"{where}: adapter init {kind!r} is not one of {', '.join(INITS)}")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{where}: adapter targets are not a list of names")
    known = set(block_matrix_names(shapes))
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise AdapterError(f"{where}: adapter target {unknown[0]!r} is not a block matrix of this model")
    try:
        check_rank(rank, targets, shapes)
    except AdapterError as e:
        raise AdapterError(f"{where}: {e}") from None
    return {"rank": int(rank), "alpha": float(alpha), "targets": list(targets), "init": kind}
