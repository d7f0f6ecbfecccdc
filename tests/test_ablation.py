"""benchmarks/ablation.py: the model whose parts switch one at a time is right (finite differences, every switch
combination) and its endpoints are the real models (core/gpt2.py and core/llama.py, loss and gradients)."""
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import ablation as A
from tinylm.cli.gradcheck import numerical_gradient, relative_error
from tinylm.core import gpt2 as G
from tinylm.core import llama as LL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = {"n_layer": 2, "n_head": 4, "n_embd": 16, "block_size": 8, "vocab_size": 11}


def batch(seed=0, B=2, T=6):
    rng = np.random.default_rng(seed)
    return rng.integers(0, CFG["vocab_size"], (B, T)), rng.integers(0, CFG["vocab_size"], (B, T))


def perturbed(params, seed=1):
    """Norm gains off 1 and larger weights, so that every path carries a gradient worth checking."""
    rng = np.random.default_rng(seed)
    return {k: p + rng.standard_normal(p.shape) * (0.3 if p.ndim == 1 else 0.2) for k, p in params.items()}


SWITCHES = [dict(zip(("positions", "norm", "mlp", "tied", "n_kv_head"), combo)) for combo in itertools.product(
    ("learned", "rotary"), ("layer", "rms"), ("gelu", "swiglu"), (True, False), (None, 2))]


@pytest.mark.parametrize("sw", SWITCHES, ids=lambda sw: "-".join(str(v) for v in sw.values()))
def test_every_switch_combination_passes_finite_differences(sw):
    P = perturbed(A.init(CFG, sw, seed=0, dtype=np.float64))
    x, y = batch()
    _, cache = A.forward(P, CFG, sw, x, y)
    grads = A.backward(P, CFG, sw, cache)
    assert set(grads) == set(P)
    f = lambda: A.forward(P, CFG, sw, x, y)[0]
    rng = np.random.default_rng(2)
    for name, p in P.items():
        numeric = numerical_gradient(f, p, max_entries=6, rng=rng)
        probed = ~np.isnan(numeric)
        assert relative_error(grads[name][probed], numeric[probed]) < 1e-6, name


def gpt2_names(cfg):
    """core/gpt2.py's name -> the ablation model's (c_attn is q, k, v stacked by rows)."""
    names = {"transformer.wte.weight": "wte", "transformer.wpe.weight": "wpe", "transformer.ln_f.weight": "norm_f"}
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        names.update({p + "ln_1.weight": f"h{i}.norm1", p + "attn.c_proj.weight": f"h{i}.o",
                      p + "ln_2.weight": f"h{i}.norm2", p + "mlp.c_fc.weight": f"h{i}.fc",
                      p + "mlp.c_proj.weight": f"h{i}.proj"})
    return names


def llama_names(cfg):
    names = {"model.embed_tokens.weight": "wte", "model.norm.weight": "norm_f", "lm_head.weight": "head"}
    for i in range(cfg["n_layer"]):
        p = f"model.layers.{i}."
        names.update({p + "input_layernorm.weight": f"h{i}.norm1", p + "post_attention_layernorm.weight": f"h{i}.norm2",
                      **{p + f"self_attn.{n}_proj.weight": f"h{i}.{n}" for n in "qkvo"},
                      **{p + f"mlp.{n}_proj.weight": f"h{i}.{n}" for n in ("gate", "up", "down")}})
    return names


def test_at_gpt2s_settings_it_is_core_gpt2():
    config = G.GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=4, n_embd=16, bias=False)
    core = perturbed(G.init_params(config, seed=0, dtype=np.float64))
    names = gpt2_names(CFG)
    P = {names[k]: v for k, v in core.items() if k in names}
    for i in range(CFG["n_layer"]):
        P[f"h{i}.q"], P[f"h{i}.k"], P[f"h{i}.v"] = np.split(core[f"transformer.h.{i}.attn.c_attn.weight"], 3)
    assert set(P) == set(A.shapes(CFG, A.GPT2))
    x, y = batch()
    _, loss, cache = G.forward(core, config, x, y)
    core_grads = G.backward(core, config, cache)
    ours, cache = A.forward(P, CFG, A.GPT2, x, y)
    grads = A.backward(P, CFG, A.GPT2, cache)
    assert abs(ours - loss) < 1e-12
    for k, name in names.items():
        np.testing.assert_allclose(grads[name], core_grads[k], rtol=0, atol=1e-12)
    for i in range(CFG["n_layer"]):
        c_attn = np.concatenate([grads[f"h{i}.{n}"] for n in "qkv"])
        np.testing.assert_allclose(c_attn, core_grads[f"transformer.h.{i}.attn.c_attn.weight"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_kv_head", [2, 4])
def test_at_the_llamas_settings_it_is_core_llama(n_kv_head):
    config = LL.LlamaConfig(block_size=8, vocab_size=11, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=16)
    sw = dict(A.LLAMA, n_kv_head=n_kv_head)
    core = perturbed(LL.init_params(config, seed=0, dtype=np.float64))
    names = llama_names(CFG)
    P = {names[k]: v for k, v in core.items()}
    assert set(P) == set(A.shapes(CFG, sw))
    x, y = batch()
    _, loss, cache = LL.forward(core, config, x, y)
    core_grads = LL.backward(core, config, cache)
    ours, cache = A.forward(P, CFG, sw, x, y)
    grads = A.backward(P, CFG, sw, cache)
    assert abs(ours - loss) < 1e-12
    for k, name in names.items():
        np.testing.assert_allclose(grads[name], core_grads[k], rtol=0, atol=1e-12)


def test_parameter_counts_follow_the_switches():
    C, V, L = 128, 65, 4
    cfg = dict(A.RECIPE, vocab_size=V)
    gpt2 = A.count(cfg, A.GPT2)
    assert gpt2 == G.count_params(G.GPTConfig(vocab_size=V))            # the recipe's GPT-2, bias off
    assert A.count(cfg, dict(A.GPT2, tied=False)) == gpt2 + V * C        # an untied head: one more V×C
    assert A.count(cfg, dict(A.GPT2, positions="rotary")) == gpt2 - 64 * C
    assert A.count(cfg, dict(A.GPT2, n_kv_head=2)) == gpt2 - L * 2 * (C // 2) * C   # k and v halved
    assert A.count(cfg, A.LLAMA) == LL.count_params(LL.LlamaConfig(vocab_size=V, n_kv_head=2))


def test_quick_run_prints_the_table():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ablation", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    rows = [l for l in proc.stdout.splitlines() if l.startswith("| ") and not l.startswith("| variant")]
    assert [r.split(" | ")[0][2:] for r in rows] == [label for label, _ in A.variants()]
    losses = [float(r.split(" | ")[3]) for r in rows]
    assert all(3.0 < v < 4.5 for v in losses)          # 30 steps from ln 65 ≈ 4.17: trained, not diverged
    assert rows[0].endswith("| +0.0000 |")
