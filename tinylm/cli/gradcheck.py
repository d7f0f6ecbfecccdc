"""Check every hand-written backward against central finite differences, in float64.

    python -m tinylm.gradcheck          # a table of relative errors, layer by layer and for the whole model

It checks the reading path (core/layers.py, core/gpt2.py, core/llama.py) and what training runs (fast/: its layers,
dropout, row blocks, factorized and adapter layers, the whole fast GPT-2 and Llama), each against its own finite
differences.

For a layer y = f(x, θ) we take the scalar L = Σ y ⊙ R with a fixed random R, so that
dL/dy = R: the backward fed R must give the same dL/dx and dL/dθ as
(L(x + εe) − L(x − εe)) / 2ε, entry by entry. The error reported is
‖analytic − numeric‖ / max(‖analytic‖ + ‖numeric‖, tiny): a norm-wise relative error.
"""
import argparse
import sys

import numpy as np

from tinylm.core import layers as CL
from tinylm.fast import layers as FAST_LAYERS
from tinylm.fast import linears as FL
from tinylm.lowrank import factorized as LR
from tinylm.fast import model as M
from tinylm.fast import llama as FAST_LLAMA
from tinylm.core import gpt2 as G
from tinylm.core import llama as LLAMA
from tinylm.fast.linears import lora_linear_backward, lora_linear_forward
from tinylm.lowrank.adapters import adapter_grads_unmerged, adapter_params, block_matrix_names, init_adapters, lora_backward, lora_forward

TOLERANCE = 1e-6


def relative_error(a, b):
    """‖a − b‖ / (‖a‖ + ‖b‖), 0 when both are 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denom = np.linalg.norm(a) + np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / denom) if denom > 0 else 0.0


def numerical_gradient(f, x, eps=1e-6, max_entries=None, rng=None):
    """Central differences of the scalar f() with respect to the array x, perturbed in place.

    With max_entries, only that many randomly chosen entries are probed; the others are NaN.
    Returns an array shaped like x.
    """
    grad = np.full(x.shape, np.nan)
    flat = x.reshape(-1)            # a view: writing into it perturbs x
    indices = np.arange(flat.size)
    if max_entries is not None and flat.size > max_entries:
        indices = (rng or np.random.default_rng(0)).choice(flat.size, max_entries, replace=False)
    gflat = grad.reshape(-1)
    for i in indices:
        old = flat[i]
        flat[i] = old + eps
        plus = f()
        flat[i] = old - eps
        minus = f()
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * eps)
    return grad


def compare(analytic, numeric):
    """Relative error over the entries that were probed (those not NaN in numeric)."""
    probed = ~np.isnan(numeric)
    return relative_error(np.asarray(analytic)[probed], numeric[probed])


def check_function(forward, backward, inputs, seed=0):
    """Check one layer. forward(**inputs) -> (out, cache); backward(R, cache) -> grads.

    backward's result is mapped to input names by `backward` itself: it must return a dict
    {input name: gradient}. Returns {input name: relative error}.
    """
    rng = np.random.default_rng(seed)
    out, cache = forward(**inputs)
    R = rng.standard_normal(np.shape(out))
    analytic = backward(R, cache)

    def loss():
        return float(np.sum(forward(**inputs)[0] * R))

    return {name: compare(analytic[name], numerical_gradient(loss, inputs[name])) for name in analytic}


def layer_checks(seed=0, layers=FAST_LAYERS):
    """Every layer of `layers` (fast/layers.py, or core/layers.py, whose layers take the same arguments), with
    small random float64 inputs; for the fast path also dropout, row blocks and the factorized and adapter
    layers. Returns [(layer, input, error)], core's layers named "core …"."""
    L = layers
    fast = layers is FAST_LAYERS
    rng = np.random.default_rng(seed)
    B, T, C, H, V = 2, 5, 8, 2, 7
    randn = lambda *s: rng.standard_normal(s)
    results = []

    def record(layer, errors):
        results.extend((layer if fast else "core " + layer, name, err) for name, err in errors.items())

    idx = rng.integers(0, V, size=(B, T))
    idx[0, :2] = 3                       # a repeated token exercises the scatter-add
    record("embedding", check_function(
        lambda wte, wpe: L.embedding_forward(idx, wte, wpe),
        lambda d, c: L.embedding_backward(d, c),
        {"wte": randn(V, C), "wpe": randn(T + 2, C)}))

    def lin_back(d, c):
        dx, g = L.linear_backward(d, c)
        return {"x": dx, "W": g["W"], "b": g["b"]}
    record("linear", check_function(L.linear_forward, lin_back, {"x": randn(B, T, C), "W": randn(3, C), "b": randn(3)}))

    if fast:
        fast_only_layer_checks(record, randn, B, T, C)

    def ln_back(d, c):
        dx, g = L.layernorm_backward(d, c)
        return {"x": dx, "w": g["w"], "b": g["b"]}
    record("layernorm", check_function(L.layernorm_forward, ln_back, {"x": randn(B, T, C), "w": randn(C), "b": randn(C)}))
    record("gelu", check_function(L.gelu_forward, lambda d, c: {"x": L.gelu_backward(d, c)}, {"x": 2 * randn(B, T, C)}))
    record("attention", check_function(
        lambda qkv: L.attention_forward(qkv, H), lambda d, c: {"qkv": L.attention_backward(d, c)},
        {"qkv": randn(B, T, 3 * C)}))
    if fast:
        fast_only_attention_checks(record, randn, B, T, C, H)
    if fast:
        fast_llama_layer_checks(record, randn, B, T, C)
    else:
        llama_layer_checks(record, randn, L, B, T, C)
    targets = rng.integers(0, V, size=(B, T))
    record("cross_entropy", check_function(
        lambda logits: L.cross_entropy_forward(logits, targets),
        lambda d, c: {"logits": L.cross_entropy_backward(d, c)}, {"logits": randn(B, T, V)}))
    return results


def llama_layer_checks(record, randn, L, B, T, C):
    """The layers Llama adds: RMSNorm, rotary embeddings, SwiGLU, attention with K/V heads shared in pairs."""
    def rms_back(d, c):
        dx, g = L.rmsnorm_backward(d, c)
        return {"x": dx, "w": g["w"]}
    record("rmsnorm", check_function(L.rmsnorm_forward, rms_back, {"x": randn(B, T, C), "w": randn(C)}))
    positions = np.arange(T) + 3
    record("rope", check_function(lambda x: L.rope_forward(x, positions, 100.0),
                                  lambda d, c: {"x": L.rope_backward(d, c)}, {"x": randn(B, 2, T, 4)}))

    def swiglu_back(d, c):
        dg, du = L.swiglu_backward(d, c)
        return {"g": dg, "u": du}
    record("swiglu", check_function(L.swiglu_forward, swiglu_back, {"g": 2 * randn(B, T, C), "u": randn(B, T, C)}))
    record("attention, G=2", check_function(      # 4 query heads, 2 K/V heads
        L.grouped_attention_forward, lambda d, c: dict(zip("qkv", L.grouped_attention_backward(d, c))),
        {"q": randn(B, 4, T, 3), "k": randn(B, 2, T, 3), "v": randn(B, 2, T, 3)}))


def fast_llama_layer_checks(record, randn, B, T, C):
    """The fast path's Llama layers: RMSNorm, the rotation done in place (on a copy here), SwiGLU on [g u]."""
    L = FAST_LAYERS

    def rms_back(d, c):
        dx, g = L.rmsnorm_backward(d, c)
        return {"x": dx, "w": g["w"]}
    record("rmsnorm", check_function(L.rmsnorm_forward, rms_back, {"x": randn(B, T, C), "w": randn(C)}))
    turn, back = L.rope_phases(T, 4, 2, 100.0, np.dtype(np.float64), 3)     # 2 heads of 4, positions 3 … T + 2
    record("rope, in place", check_function(lambda x: (L.rope_(x.copy(), turn), None),
                                            lambda d, c: {"x": L.rope_(d.copy(), back)}, {"x": randn(B, T, 8)}))
    record("swiglu, [g u]", check_function(L.swiglu_forward, lambda d, c: {"gu": L.swiglu_backward(d, c)},
                                           {"gu": 2 * randn(B, T, 2 * C)}))


def fast_only_layer_checks(record, randn, B, T, C):
    """The fast path's layers that core does not have: factorized, dropout, residual, the adapter's two forms."""
    L = FAST_LAYERS

    def lowrank_back(d, c):
        dx, g = FL.lowrank_backward(d, c)
        return {"x": dx, "A": g["A"], "B": g["B"], "b": g["b"]}
    record("lowrank linear", check_function(FL.lowrank_forward, lowrank_back,
                                            {"x": randn(B, T, C), "A": randn(3, 2), "B": randn(2, C), "b": randn(3)}))

    record("dropout", check_function(
        lambda x: L.dropout_forward(x, 0.3, np.random.default_rng(1)),   # same mask at every call
        lambda d, c: {"x": L.dropout_backward(d, c)}, {"x": randn(B, T, C)}))

    def res_back(d, c):
        dx, dfx = L.residual_backward(d, c)
        return {"x": dx, "fx": dfx}
    record("residual", check_function(L.residual_forward, res_back, {"x": randn(B, T, C), "fx": randn(B, T, C)}))

    record("lora adapter", check_function(
        lambda W, A, B: lora_forward(W, A, B, 0.7), lambda d, c: lora_backward(d, c),
        {"W": randn(6, C), "A": randn(3, C), "B": randn(6, 3)}))
    frozen_W = randn(6, C)

    def lora_linear_back(d, c):
        dx, g = lora_linear_backward(d, c)
        return {"x": dx, "A": g["lora_A"], "B": g["lora_B"], "b": g["b"]}
    record("lora linear, W fixed", check_function(
        lambda x, A, B, b: lora_linear_forward(x, frozen_W, A, B, b), lora_linear_back,
        {"x": randn(B, T, C), "A": randn(3, C), "B": randn(6, 3), "b": randn(6)}))


def fast_only_attention_checks(record, randn, B, T, C, H):
    """The fast attention's other paths: dropout on the weights, and row blocks (the path of T > 128)."""
    L = FAST_LAYERS
    record("attention+dropout", check_function(
        lambda qkv: L.attention_forward(qkv, H, 0.2, np.random.default_rng(2)),
        lambda d, c: {"qkv": L.attention_backward(d, c)}, {"qkv": randn(B, T, 3 * C)}))
    record("attention, row blocks", check_function(   # blocks of 2 rows: the path of T > 128
        lambda qkv: L.attention_forward(qkv, H, 0.2, np.random.default_rng(3), row_block=2),
        lambda d, c: {"qkv": L.attention_backward(d, c)}, {"qkv": randn(B, T, 3 * C)}))


FACTORIZED_CHECK = {f"transformer.h.0.{n}": 3 for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
FACTORIZED_CHECK["transformer.h.1.mlp.c_fc"] = 3
LLAMA_FACTORIZED_CHECK = {f"model.layers.0.{n}": 3 for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                            "mlp.down_proj")}
LLAMA_FACTORIZED_CHECK["model.layers.1.mlp.gate_proj"] = 3        # beside a dense up_proj: the group run apart


def model_check(config, seed=0, max_entries=None, train=False, ranks=None, core=False):
    """Whole-model gradient of the loss for every parameter. Returns [(param name, error)].

    ranks {layer name: r} stores those linear layers as random factorized layers of rank r (lowrank/).
    With core, the model checked is core/gpt2.py's (dense, no dropout), or core/llama.py's for a LlamaConfig;
    else the fast path's (fast/model.py, or fast/llama.py for a LlamaConfig).
    """
    model = LLAMA if isinstance(config, LLAMA.LlamaConfig) else G
    fast = FAST_LLAMA if model is LLAMA else M
    rng = np.random.default_rng(seed)
    params = model.init_params(config, seed=seed, dtype=np.float64)
    for name, r in (ranks or {}).items():
        out, inp = params[name + ".weight"].shape
        params = LR.factor_params(params, name, 0.1 * rng.standard_normal((out, r)), rng.standard_normal((r, inp)))
    for k in params:     # the init has norm gains 1 and biases 0: perturb so no term hides behind a constant
        params[k] += 0.1 * rng.standard_normal(params[k].shape)
    T = config.block_size
    idx = rng.integers(0, config.vocab_size, size=(2, T))
    targets = rng.integers(0, config.vocab_size, size=(2, T))

    def run():
        if core:
            return model.forward(params, config, idx, targets)
        return fast.forward(params, config, idx, targets, train=train, rng=np.random.default_rng(seed + 1))

    _, _, cache = run()
    grads = (model.backward if core else fast.backward)(params, config, cache)
    results = []
    for name, p in params.items():
        numeric = numerical_gradient(lambda: run()[1], p, max_entries=max_entries, rng=rng)
        results.append((name, compare(grads[name], numeric)))
    return results


def adapter_check(config, init="pissa", seed=0, max_entries=None):
    """Whole-model gradient of the loss for every adapter (rank 2 on every block matrix, GPT-2's four or the Llama's
    seven by the config), through the unmerged layers training runs (the merged form is checked as a layer, and held equal to this one in
    tests/test_finetune.py). Returns [(name, error)]."""
    model = LLAMA if isinstance(config, LLAMA.LlamaConfig) else G
    fast = FAST_LLAMA if model is LLAMA else M
    rng = np.random.default_rng(seed)
    params = model.init_params(config, seed=seed, dtype=np.float64)
    for k in params:
        params[k] += 0.1 * rng.standard_normal(params[k].shape)
    lora = {"rank": 2, "alpha": 3.0, "targets": block_matrix_names(params), "init": init}
    frozen, adapters = init_adapters(params, lora, seed=seed)
    for k in adapters:   # LoRA's B = 0 would hide A's gradient: move both off their start
        adapters[k] += 0.1 * rng.standard_normal(adapters[k].shape)
    T = config.block_size
    idx = rng.integers(0, config.vocab_size, size=(2, T))
    targets = rng.integers(0, config.vocab_size, size=(2, T))
    run = lambda: fast.forward(adapter_params(frozen, adapters, lora), config, idx, targets)   # as training runs it
    grads = adapter_grads_unmerged(fast.backward(adapter_params(frozen, adapters, lora), config, run()[2]), lora)
    return [(name, compare(grads[name], numerical_gradient(lambda: run()[1], a, max_entries=max_entries, rng=rng)))
            for name, a in adapters.items()]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tinylm.gradcheck",
                                 description="Check every backward pass against finite differences (float64).")
    ap.add_argument("--seed", type=int, default=0, help="seed for the random inputs and parameters (default: 0)")
    args = ap.parse_args(argv)
    worst = 0.0
    print(f"{'layer':<22}{'input':<10}{'relative error':>16}")
    for layer, name, err in layer_checks(args.seed, CL) + layer_checks(args.seed):
        worst = max(worst, err)
        print(f"{layer:<22}{name:<10}{err:>16.2e}")
    for bias in (True, False):
        config = G.GPTConfig(block_size=4, vocab_size=7, n_layer=2, n_head=2, n_embd=8, bias=bias)
        print(f"\nwhole model, core (the reading path), bias={bias}")
        for name, err in model_check(config, args.seed, core=True):
            worst = max(worst, err)
            print(f"  {name:<48}{err:>16.2e}")
    for n_kv_head, tie in ((1, False), (2, True)):
        config = LLAMA.LlamaConfig(block_size=4, vocab_size=7, n_layer=2, n_head=2, n_kv_head=n_kv_head, n_embd=8,
                                   ffn_hidden=12, tie_embeddings=tie)
        print(f"\nwhole model, core Llama, n_kv_head={n_kv_head} of n_head=2, tie_embeddings={tie}")
        for name, err in model_check(config, args.seed, core=True):
            worst = max(worst, err)
            print(f"  {name:<48}{err:>16.2e}")
    for bias, dropout in ((True, 0.0), (False, 0.0), (True, 0.1)):
        config = G.GPTConfig(block_size=4, vocab_size=7, n_layer=2, n_head=2, n_embd=8, dropout=dropout, bias=bias)
        print(f"\nwhole model, fast path, bias={bias}, dropout={dropout}")
        for name, err in model_check(config, args.seed, train=dropout > 0):
            worst = max(worst, err)
            print(f"  {name:<48}{err:>16.2e}")
    config = LLAMA.LlamaConfig(block_size=4, vocab_size=7, n_layer=2, n_head=4, n_kv_head=2, n_embd=8,
                               ffn_hidden=12, dropout=0.1)
    print("\nwhole model, fast Llama, n_kv_head=2 of n_head=4, dropout=0.1")
    for name, err in model_check(config, args.seed, train=True):
        worst = max(worst, err)
        print(f"  {name:<48}{err:>16.2e}")
    config = G.GPTConfig(block_size=4, vocab_size=7, n_layer=2, n_head=2, n_embd=8, bias=True)
    print("\nwhole model, bias=True, every linear layer of block 0 and h.1.mlp.c_fc factorized (rank 3)")
    for name, err in model_check(config, args.seed, ranks=FACTORIZED_CHECK):
        worst = max(worst, err)
        print(f"  {name:<48}{err:>16.2e}")
    config = LLAMA.LlamaConfig(block_size=4, vocab_size=7, n_layer=2, n_head=4, n_kv_head=2, n_embd=8, ffn_hidden=12)
    print("\nwhole model, fast Llama, the seven matrices of layer 0 and layer 1's gate_proj factorized (rank 3)")
    for name, err in model_check(config, args.seed, ranks=LLAMA_FACTORIZED_CHECK):
        worst = max(worst, err)
        print(f"  {name:<48}{err:>16.2e}")
    gpt2 = G.GPTConfig(block_size=4, vocab_size=7, n_layer=2, n_head=2, n_embd=8, dropout=0.0, bias=True)
    for config in (gpt2, config):
        for init in ("lora", "pissa"):
            print(f"\nwhole model{', fast Llama,' if config is not gpt2 else ''} through {init} adapters (rank 2 on "
                  f"every block matrix)")
            for name, err in adapter_check(config, init, args.seed):
                worst = max(worst, err)
                print(f"  {name:<48}{err:>16.2e}")
    ok = worst < TOLERANCE
    print(f"\nworst relative error {worst:.2e}: {'PASS' if ok else 'FAIL'} (tolerance {TOLERANCE:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
