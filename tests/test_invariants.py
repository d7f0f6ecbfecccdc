"""Properties the linear algebra promises, checked on the real layers and model."""
import math

import numpy as np
import pytest

from tinylm.fast import layers as L
from tinylm.fast import model as M
from tinylm.core import gpt2 as G
from tinylm.fast import decode as D


def test_attention_weights_are_causal_and_rows_sum_to_one():
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((2, 6, 3 * 8))
    _, cache = L.attention_forward(qkv, n_head=2)
    att = cache[3]                                   # (B, H, T, T)
    assert np.allclose(att.sum(axis=-1), 1.0)
    upper = np.triu(np.ones((6, 6), bool), k=1)
    assert np.all(att[..., upper] == 0.0)
    assert np.all(att[..., ~upper] > 0.0)


def test_layernorm_output_has_zero_mean_unit_variance_before_gain():
    rng = np.random.default_rng(1)
    x = 3.0 + 5.0 * rng.standard_normal((4, 7, 16))
    y, _ = L.layernorm_forward(x, np.ones(16), None)
    assert np.allclose(y.mean(axis=-1), 0.0, atol=1e-12)
    assert np.allclose(y.var(axis=-1), 1.0, atol=1e-4)      # eps 1e-5 shrinks it a hair


def test_future_tokens_never_change_earlier_logits():
    config = G.GPTConfig(block_size=12, vocab_size=10, n_layer=2, n_head=2, n_embd=16, bias=True)
    params = G.init_params(config, seed=3, dtype=np.float64)
    rng = np.random.default_rng(2)
    idx = rng.integers(0, 10, size=(1, 12))
    base, _, _ = M.forward(params, config, idx)
    for t in range(12):
        changed = idx.copy()
        changed[0, t] = (changed[0, t] + 1) % 10
        logits, _, _ = M.forward(params, config, changed)
        assert np.array_equal(logits[0, :t], base[0, :t]), t
        assert not np.allclose(logits[0, t:], base[0, t:])     # ...and do change later ones


def test_loss_at_initialization_is_close_to_log_vocab():
    config = G.GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32)
    params = G.init_params(config, seed=0)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 65, size=(8, 32))
    _, loss, _ = M.forward(params, config, idx, rng.integers(0, 65, size=(8, 32)))
    assert abs(loss - math.log(65)) < 0.05


def test_parameter_names_and_shapes_are_nanogpts():
    config = G.GPTConfig(block_size=64, vocab_size=65, n_layer=2, n_head=4, n_embd=32, bias=True)
    shapes = G.param_shapes(config)
    assert shapes["transformer.wte.weight"] == (65, 32)
    assert shapes["transformer.wpe.weight"] == (64, 32)
    assert shapes["transformer.h.1.attn.c_attn.weight"] == (96, 32)
    assert shapes["transformer.h.1.attn.c_proj.weight"] == (32, 32)
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == (128, 32)
    assert shapes["transformer.h.0.mlp.c_proj.weight"] == (32, 128)
    assert shapes["transformer.h.0.mlp.c_fc.bias"] == (128,)
    assert "lm_head.weight" not in shapes                     # tied: stored once, as wte
    no_bias = G.param_shapes(G.GPTConfig(n_layer=1, bias=False))
    assert not any(k.endswith(".bias") for k in no_bias)


def test_gpt2_init_statistics():
    config = G.GPTConfig(block_size=64, vocab_size=500, n_layer=8, n_head=4, n_embd=128, bias=True)
    p = G.init_params(config, seed=0)
    assert abs(p["transformer.wte.weight"].std() - 0.02) < 0.001
    assert abs(p["transformer.h.0.attn.c_proj.weight"].std() - 0.02 / math.sqrt(16)) < 0.0005
    assert np.all(p["transformer.h.0.ln_1.weight"] == 1) and np.all(p["transformer.h.0.mlp.c_fc.bias"] == 0)
    assert p["transformer.wte.weight"].dtype == np.float32
    assert G.init_params(config, dtype=np.float64)["transformer.wte.weight"].dtype == np.float64


def test_float32_and_float64_forward_agree():
    config = G.GPTConfig(block_size=16, vocab_size=20, n_layer=2, n_head=2, n_embd=16)
    p64 = G.init_params(config, seed=0, dtype=np.float64)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    idx = np.random.default_rng(0).integers(0, 20, size=(2, 16))
    l64, _, _ = M.forward(p64, config, idx)
    l32, _, _ = M.forward(p32, config, idx)
    assert l32.dtype == np.float32
    assert np.allclose(l32, l64, atol=1e-5)


def test_trace_forward_matches_forward_and_keeps_the_insides():
    config = G.GPTConfig(block_size=8, vocab_size=10, n_layer=3, n_head=2, n_embd=16, bias=True)
    params = G.init_params(config, seed=0, dtype=np.float64)
    idx = np.random.default_rng(0).integers(0, 10, size=(2, 8))
    rec = D.trace_forward(params, config, idx)
    logits, _, cache = M.forward(params, config, idx)
    np.testing.assert_allclose(rec["logits"], logits, atol=1e-12)
    assert len(rec["residual"]) == 4 and rec["residual"][0].shape == (2, 8, 16)
    for att, c in zip(rec["attention"], cache["blocks"]):
        np.testing.assert_allclose(att, c["attn"][3], atol=1e-12)


@pytest.mark.parametrize("generator", [np.random.PCG64, np.random.MT19937, np.random.Philox])
def test_dropout_keeps_each_entry_with_the_probability_it_divides_by(generator):
    rng = np.random.Generator(generator(7))
    n = 1 << 20
    for p in (0.1, 0.2, 0.5):
        keep, q = L.bernoulli_mask((n // 4, 4), p, rng)
        assert keep.shape == (n // 4, 4) and keep.dtype == bool
        assert q == 1 - round(p * 65536) / 65536 and abs(q - (1 - p)) <= 2 ** -17
        sigma = math.sqrt(q * (1 - q) / n)
        assert abs(keep.mean() - q) < 5 * sigma                      # the rate it claims
        both = (keep[:, :-1] & keep[:, 1:]).mean()                    # neighbours (the same 64-bit draw) independent
        assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / (n * 3 // 4))
        x = np.ones(n, dtype=np.float32)
        y, (mask, scale) = L.dropout_forward(x, p, rng)
        assert scale == 1 / q and set(np.unique(y).tolist()) == {0.0, float(np.float32(1 / q))}
        assert abs(y.mean() - 1.0) < 5 * sigma / q                    # E[x ⊙ m / q] = x
    keep, q = L.bernoulli_mask((n,), 1 - 2 ** -20, rng)               # p this close to 1 still keeps some
    assert q == 2 ** -16 and keep.any()
    assert L.bernoulli_mask((0, 3), 0.2, rng)[0].shape == (0, 3)
    assert L.bernoulli_mask((3, 5, 7), 0.2, rng)[0].shape == (3, 5, 7)
    a = L.bernoulli_mask((1001,), 0.3, np.random.Generator(generator(3)))[0]
    assert np.array_equal(a, L.bernoulli_mask((1001,), 0.3, np.random.Generator(generator(3)))[0])   # seeded: repeatable
    assert not np.array_equal(a, L.bernoulli_mask((1001,), 0.3, rng)[0])
