"""The factorized linear layer y = (x Bᵀ) Aᵀ + b: its gradients, its equality with the dense product, its names."""
import numpy as np
import pytest

from tinylm import gradcheck
from tinylm import lowrank as LR
from tinylm.errors import TinyLMError
from tinylm.layers import linear_forward
from tinylm.model import GPTConfig, param_shapes


def test_lowrank_gradients_match_finite_differences():
    errors = {n: e for l, n, e in gradcheck.layer_checks(seed=3) if l == "lowrank linear"}
    assert set(errors) == {"x", "A", "B", "b"}
    assert max(errors.values()) < gradcheck.TOLERANCE, errors


def test_checker_catches_a_wrong_lowrank_backward(monkeypatch):
    real = LR.lowrank_backward

    def wrong(dy, cache):                        # dB without the input: a plausible slip
        dx, g = real(dy, cache)
        g["B"] = g["B"] * 1.01
        return dx, g
    monkeypatch.setattr(LR, "lowrank_backward", wrong)
    errors = {n: e for l, n, e in gradcheck.layer_checks(seed=3) if l == "lowrank linear"}
    assert errors["B"] > 1e-3


@pytest.mark.parametrize("bias", [True, False])
def test_lowrank_equals_dense_product(bias):
    rng = np.random.default_rng(0)
    x, A, B = rng.standard_normal((2, 3, 6)), rng.standard_normal((5, 2)), rng.standard_normal((2, 6))
    b = rng.standard_normal(5) if bias else None
    y, _ = LR.lowrank_forward(x, A, B, b)
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
