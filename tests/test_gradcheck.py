"""Every backward agrees with central finite differences in float64, and the checker itself can fail."""
import pytest

import numpy as np

from tinylm.cli import gradcheck
from tinylm.core import layers as core_layers
from tinylm.fast import layers
from tinylm.core import gpt2 as G
from tinylm.core import llama
from tinylm.core.gpt2 import GPTConfig


@pytest.mark.parametrize("layer,name,err", gradcheck.layer_checks(seed=0) + gradcheck.layer_checks(seed=0, layers=core_layers),
                         ids=lambda v: str(v))
def test_layer_backward_matches_finite_differences(layer, name, err):
    assert err < gradcheck.TOLERANCE, f"{layer}.{name}: relative error {err:.2e}"


@pytest.mark.parametrize("bias,dropout", [(True, 0.0), (False, 0.0), (True, 0.2)])
def test_whole_model_gradient_matches_finite_differences(bias, dropout):
    config = GPTConfig(block_size=4, vocab_size=7, n_layer=2, n_head=2, n_embd=8, dropout=dropout, bias=bias)
    results = gradcheck.model_check(config, seed=1, train=dropout > 0)
    assert len(results) == len(G.param_shapes(config))
    worst = max(results, key=lambda r: r[1])
    assert worst[1] < gradcheck.TOLERANCE, worst


@pytest.mark.parametrize("bias", [True, False])
def test_core_model_gradient_matches_finite_differences(bias):
    config = GPTConfig(block_size=4, vocab_size=7, n_layer=2, n_head=2, n_embd=8, bias=bias)
    results = gradcheck.model_check(config, seed=1, core=True)
    assert len(results) == len(G.param_shapes(config))
    assert max(e for _, e in results) < gradcheck.TOLERANCE


def test_core_layer_checks_cover_llamas_layers():
    checked = {(layer, name) for layer, name, _ in gradcheck.layer_checks(seed=0, layers=core_layers)}
    assert {("core rmsnorm", "x"), ("core rmsnorm", "w"), ("core rope", "x"), ("core swiglu", "g"), ("core swiglu", "u"),
            ("core attention, G=2", "q"), ("core attention, G=2", "k"), ("core attention, G=2", "v")} <= checked


@pytest.mark.parametrize("n_kv_head,tie", [(1, False), (2, True)])
def test_core_llama_gradient_matches_finite_differences(n_kv_head, tie):
    config = llama.LlamaConfig(block_size=4, vocab_size=7, n_layer=2, n_head=2, n_kv_head=n_kv_head, n_embd=8,
                               ffn_hidden=12, tie_embeddings=tie)
    results = gradcheck.model_check(config, seed=1, core=True)
    assert [name for name, _ in results] == list(llama.param_shapes(config))
    assert max(e for _, e in results) < gradcheck.TOLERANCE


@pytest.mark.parametrize("n_kv_head,tie,dropout", [(1, False, 0.0), (2, True, 0.2)])
def test_fast_llama_gradient_matches_finite_differences(n_kv_head, tie, dropout):
    config = llama.LlamaConfig(block_size=4, vocab_size=7, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=8,
                               ffn_hidden=12, tie_embeddings=tie, dropout=dropout)
    results = gradcheck.model_check(config, seed=2, train=dropout > 0)
    assert [name for name, _ in results] == list(llama.param_shapes(config))
    assert max(e for _, e in results) < gradcheck.TOLERANCE


@pytest.mark.parametrize("layer,row,wrong", [
    ("rmsnorm", "core rmsnorm", lambda real: lambda dy, c: (real(dy, c)[0] + dy, real(dy, c)[1])),   # a term too many
    ("rope", "core rope", lambda real: lambda dy, c: real(dy, (c[0], -c[1]))),       # the forward turn, not its inverse
    ("swiglu", "core swiglu", lambda real: lambda dy, c: (dy * c[1] * c[2], real(dy, c)[1])),       # silu's slope as σ
    ("grouped_attention", "core attention, G=2",                                     # dv averaged over the group, not summed
     lambda real: lambda dy, c: (lambda dq, dk, dv: (dq, dk, dv / c[1]))(*real(dy, c)))])
def test_checker_catches_a_wrong_llama_backward(monkeypatch, layer, row, wrong):
    """Each of Llama's backwards, broken, is flagged as a layer and through the whole core Llama."""
    monkeypatch.setattr(core_layers, layer + "_backward", wrong(getattr(core_layers, layer + "_backward")))
    assert max(e for l, _, e in gradcheck.layer_checks(seed=0, layers=core_layers) if l == row) > 1e-3
    config = llama.LlamaConfig(block_size=4, vocab_size=7, n_layer=1, n_head=2, n_kv_head=1, n_embd=8, ffn_hidden=12)
    assert max(e for _, e in gradcheck.model_check(config, seed=0, max_entries=20, core=True)) > 1e-3


def test_checker_catches_a_wrong_core_backward(monkeypatch):
    """core's layer norm backward without the mean of g: flagged as a layer and through the whole core model."""
    def wrong(dy, cache):
        dx, grads = real(dy, cache)
        return dx + np.mean(dy, axis=-1, keepdims=True), grads      # a term the true dx does not have
    real = core_layers.layernorm_backward
    monkeypatch.setattr(core_layers, "layernorm_backward", wrong)
    errors = {(l, n): e for l, n, e in gradcheck.layer_checks(seed=0, layers=core_layers)}
    assert errors[("core layernorm", "x")] > 1e-3
    config = GPTConfig(block_size=4, vocab_size=7, n_layer=1, n_head=2, n_embd=8, bias=True)
    assert max(e for _, e in gradcheck.model_check(config, seed=0, max_entries=20, core=True)) > 1e-3


def test_checker_catches_a_wrong_backward(monkeypatch):
    """A gelu backward missing one term must be flagged: the checker is not vacuous."""
    def wrong_slope_(x, s, g, t):                   # slope = s: the term 2 x s (1 − s) u' left out
        pass
    monkeypatch.setattr(layers, "gelu_slope_", wrong_slope_)   # where every GELU backward's slope comes from
    errors = {(l, n): e for l, n, e in gradcheck.layer_checks(seed=0)}
    assert errors[("gelu", "x")] > 1e-3
    config = GPTConfig(block_size=4, vocab_size=7, n_layer=1, n_head=2, n_embd=8, bias=True)
    assert max(e for _, e in gradcheck.model_check(config, seed=0, max_entries=20)) > 1e-3


def test_gradcheck_command_passes(capsys):
    assert gradcheck.main([]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "attention" in out and "transformer.wte.weight" in out
    assert "core attention" in out and "whole model, core" in out
    assert "core rope" in out and "whole model, core Llama" in out and "model.layers.1.mlp.down_proj.weight" in out
    assert "rope, in place" in out and "swiglu, [g u]" in out and "whole model, fast Llama" in out
