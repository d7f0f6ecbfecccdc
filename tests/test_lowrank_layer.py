"""The factorized linear layer y = (x Bᵀ) Aᵀ + b: its gradients, its equality with the dense product, its names."""
import numpy as np
import pytest

from tinylm.cli import gradcheck
from tinylm.fast import linears as FL
from tinylm.lowrank import factorized as LR
from tinylm.errors import TinyLMError
from tinylm.fast.layers import linear_forward
from tinylm.core.gpt2 import GPTConfig, param_shapes


def test_lowrank_gradients_match_finite_differences():
    errors = {n: e for l, n, e in gradcheck.layer_checks(seed=3) if l == "lowrank linear"}
    assert set(errors) == {"x", "A", "B", "b"}
    assert max(errors.values()) < gradcheck.TOLERANCE, errors


def test_checker_catches_a_wrong_lowrank_backward(monkeypatch):
    real = FL.lowrank_backward

    def wrong(dy, cache):                        # dB without the input: a plausible slip
        dx, g = real(dy, cache)
        g["B"] = g["B"] * 1.01
        return dx, g
    monkeypatch.setattr(FL, "lowrank_backward", wrong)
    errors = {n: e for l, n, e in gradcheck.layer_checks(seed=3) if l == "lowrank linear"}
    assert errors["B"] > 1e-3


@pytest.mark.parametrize("bias", [True, False])
def test_lowrank_equals_dense_product(bias):
    rng = np.random.default_rng(0)
    x, A, B = rng.standard_normal((2, 3, 6)), rng.standard_normal((5, 2)), rng.standard_normal((2, 6))
    b = rng.standard_normal(5) if bias else None
    y, _ = FL.lowrank_forward(x, A, B, b)
    y_dense, _ = linear_forward(x, A @ B, b)
    assert y.shape == (2, 3, 5)
    np.testing.assert_allclose(y, y_dense, rtol=1e-12, atol=1e-12)


def test_names_shapes_and_dense_params():
    config = GPTConfig(block_size=4, vocab_size=7, n_layer=1, n_head=2, n_embd=8)
    shapes = param_shapes(config)
    name = "transformer.h.0.mlp.c_fc"
    fs = LR.factorized_shapes(shapes, {name: 3})
    assert fs[name + ".weight_A"] == (32, 3) and fs[name + ".weight_B"] == (3, 8) and name + ".weight" not in fs
    assert list(fs).index(name + ".weight_A") == list(shapes).index(name + ".weight")   # same place in the order
    rng = np.random.default_rng(1)
    params = {k: rng.standard_normal(s) for k, s in fs.items()}
    assert LR.ranks_of(params) == {name: 3}
    dense = LR.dense_params(params)
    assert list(dense) == list(shapes)
    np.testing.assert_allclose(dense[name + ".weight"], params[name + ".weight_A"] @ params[name + ".weight_B"])
    for bad in (0, 9, -1, 2.5, True):
        with pytest.raises(TinyLMError):
            LR.factorized_shapes(shapes, {name: bad})
    with pytest.raises(TinyLMError):
        LR.factorized_shapes(shapes, {"transformer.wte": 2})


# ----------------------------------------------------------------------------- the model with factorized layers

from tinylm.fast import model as M  # noqa: E402
from tinylm.core import gpt2 as G
from tinylm.fast import decode as D


@pytest.mark.parametrize("recompute", [False, True])
def test_factorized_model_gradients_match_finite_differences(monkeypatch, recompute):
    if recompute:      # the path of big batches: layer inputs dropped from the cache and recomputed
        monkeypatch.setattr(M, "RECOMPUTE_ABOVE_BYTES", 0)
    config = GPTConfig(block_size=4, vocab_size=7, n_layer=2, n_head=2, n_embd=8, bias=True)
    results = dict(gradcheck.model_check(config, seed=2, ranks=gradcheck.FACTORIZED_CHECK, max_entries=40))
    assert "transformer.h.0.attn.c_attn.weight_B" in results and "transformer.h.0.attn.c_attn.weight" not in results
    assert max(results.values()) < gradcheck.TOLERANCE, results


def factorized_model(bias, seed=0, dtype=np.float64):
    config = GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=8, bias=bias)
    rng = np.random.default_rng(seed)
    params = G.init_params(config, seed=seed, dtype=dtype)
    for k in params:
        params[k] += (0.1 * rng.standard_normal(params[k].shape)).astype(dtype)
    for name, r in gradcheck.FACTORIZED_CHECK.items():
        out, inp = params[name + ".weight"].shape
        params = LR.factor_params(params, name, rng.standard_normal((out, r)).astype(dtype),
                                  (0.3 * rng.standard_normal((r, inp))).astype(dtype))
    return config, params


@pytest.mark.parametrize("bias", [True, False])
def test_factorized_model_runs_as_its_dense_product(bias):
    """forward, forward_cached and the one-token decoder (decode_next) of a factorized model give the
    logits of the dense model whose weights are the products A B."""
    config, params = factorized_model(bias)
    dense = LR.dense_params(params)
    idx = np.random.default_rng(1).integers(0, config.vocab_size, size=(1, 8))
    want = M.forward(dense, config, idx, for_backward=False)[0]
    np.testing.assert_allclose(M.forward(params, config, idx, for_backward=False)[0], want, rtol=1e-10, atol=1e-10)
    kv = D.new_kv_cache(config, 1, np.float64)
    np.testing.assert_allclose(D.forward_cached(params, config, idx[:, :3], kv), want[:, :3], rtol=1e-10, atol=1e-10)
    dw = D.decoding_weights(params, config)
    assert isinstance(dw["layers"][0][0], tuple) and not isinstance(dw["layers"][1][0], tuple)
    for t in range(3, 8):
        np.testing.assert_allclose(D.decode_next(dw, kv, int(idx[0, t])), want[0, t], rtol=1e-9, atol=1e-9)


def test_factorized_generate_cached_equals_uncached():
    config, params = factorized_model(True)
    greedy = lambda logits: int(np.argmax(logits))
    cached = list(D.generate(params, config, [1, 2], 6, greedy))      # within one block: the same contexts
    uncached = list(D.generate(params, config, [1, 2], 6, greedy, use_cache=False))
    assert cached == uncached
