"""The fast Llama (tinylm/fast/llama.py, fast/llama_decode.py) held equal to core's (tinylm/core/llama.py) in
float64: logits, loss and every gradient, tied and untied, with and without shared key/value heads, on one
thread and on several, with dropout against finite differences; greedy tokens with and without the cache;
and the sliding cache: every cached step against a forward written out in full, with no refill."""
import math

import numpy as np
import pytest

from tinylm.cli.gradcheck import numerical_gradient
from tinylm.core import arch
from tinylm.core import gpt2
from tinylm.core import layers as CL
from tinylm.core import llama as core
from tinylm.errors import TinyLMError
from tinylm.fast import arch as fast_arch
from tinylm.fast import decode
from tinylm.fast import llama as fast
from tinylm.fast import llama_decode as LD
from tinylm.fast import model as gpt2_fast

TOL = 1e-10


def rel_error(a, b):
    """max|a − b| / max|b|."""
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def config_of(n_kv_head=2, tie=False, n_layer=2, block_size=8, dropout=0.0):
    return core.LlamaConfig(block_size=block_size, vocab_size=11, n_layer=n_layer, n_head=4, n_kv_head=n_kv_head,
                            n_embd=16, ffn_hidden=24, tie_embeddings=tie, dropout=dropout)


def perturbed_params(config, seed=0, scale=0.1):
    """init_params in float64 with every entry moved (RMSNorm gains of exactly 1 would hide a dropped gain)."""
    rng = np.random.default_rng(seed)
    return {k: v + scale * rng.standard_normal(v.shape) for k, v in core.init_params(config, seed, np.float64).items()}


def batch(config, B=3, T=None, seed=1):
    rng = np.random.default_rng(seed)
    T = T or config.block_size
    return rng.integers(0, config.vocab_size, size=(B, T)), rng.integers(0, config.vocab_size, size=(B, T))


# ----------------------------------------------------------------------------- training: fast equals core


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_fast_llama_equals_core(tie, n_kv_head):
    config = config_of(n_kv_head, tie)
    params = perturbed_params(config, seed=n_kv_head + 10 * tie)
    for T in (config.block_size, 5):                     # a shorter sequence too: rotary tables are sliced by T
        idx, targets = batch(config, T=T)
        logits, loss, cache = fast.forward(params, config, idx, targets)
        grads = fast.backward(params, config, cache)
        core_logits, core_loss, core_cache = core.forward(params, config, idx, targets)
        expected = core.backward(params, config, core_cache)
        assert rel_error(logits, core_logits) < TOL
        assert abs(loss - core_loss) < TOL * core_loss
        assert list(grads) == list(params)
        for name in params:
            assert grads[name].shape == params[name].shape
            assert rel_error(grads[name], expected[name]) < TOL, name
        assert ("lm_head.weight" in grads) == (not tie)


def test_threads_give_one_threads_numbers():
    config = config_of(2)
    params = perturbed_params(config, seed=3)
    idx, targets = batch(config, B=5)
    loss, grads = fast.loss_and_grads(params, config, idx, targets)
    for workers in (2, 3):
        loss_p, grads_p = fast.loss_and_grads_parallel(params, config, idx, targets, workers=workers)
        assert abs(loss_p - loss) < TOL * loss
        assert list(grads_p) == list(grads)
        for name in grads:
            assert rel_error(grads_p[name], grads[name]) < TOL, name
    assert fast_arch.fast_model(config) is fast and fast_arch.decoder(config) is LD
    assert fast_arch.fast_model(gpt2.GPTConfig()) is gpt2_fast and fast_arch.decoder(gpt2.GPTConfig()) is decode


def test_dropout_gradient_matches_finite_differences_and_is_reproducible():
    """With the masks fixed (a generator seeded the same for every forward), the loss is a smooth function of
    the weights, and the backward is its gradient."""
    config = core.LlamaConfig(block_size=4, vocab_size=5, n_layer=1, n_head=2, n_kv_head=1, n_embd=4,
                              ffn_hidden=6, dropout=0.3)
    params = perturbed_params(config, seed=4, scale=0.5)
    idx, targets = batch(config, B=2, seed=5)

    def loss_of():
        return fast.forward(params, config, idx, targets, train=True, rng=np.random.default_rng(9))[1]

    loss, grads = fast.loss_and_grads(params, config, idx, targets, train=True, rng=np.random.default_rng(9))
    assert loss != core.forward(params, config, idx, targets)[1]            # dropout did something
    for name, p in params.items():
        assert rel_error(grads[name], numerical_gradient(loss_of, p)) < 1e-6, name
    # the same generator state, the same masks: training runs repeat bit for bit, threaded too
    one = fast.loss_and_grads_parallel(params, config, idx, targets, True, np.random.default_rng(7), workers=2)
    two = fast.loss_and_grads_parallel(params, config, idx, targets, True, np.random.default_rng(7), workers=2)
    assert one[0] == two[0] and all(np.array_equal(one[1][k], two[1][k]) for k in params)
    # evaluation (train=False) has no dropout: core's numbers
    assert abs(fast.forward(params, config, idx, targets, rng=np.random.default_rng(7))[1]
               - core.forward(params, config, idx, targets)[1]) < TOL


def test_the_stacked_products_name_their_gradients_by_hugging_faces_names():
    """q, k, v are one product and gate, up another: their stacked gradient is cut back at the right rows
    (a change in one weight moves only its own gradient's rows)."""
    config = config_of(1)
    params = perturbed_params(config, seed=6)
    idx, targets = batch(config)
    grads = fast.loss_and_grads(params, config, idx, targets)[1]
    pre = core.block_prefix(1)
    for name in fast.QKV + fast.GATE_UP:
        assert grads[pre + name + ".weight"].shape == params[pre + name + ".weight"].shape
    assert grads[pre + "self_attn.k_proj.weight"].shape == (4, 16)          # one K/V head of width 4


def test_config_dicts_load_as_their_arch():
    llama_config = config_of(2, tie=True)
    assert arch.config_from_dict(llama_config.to_dict()) == llama_config
    assert arch.model_of(llama_config) is core and arch.arch_of(llama_config) == "llama"
    gpt = gpt2.GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8)
    assert "arch" not in gpt.to_dict()
    assert arch.config_from_dict(gpt.to_dict()) == gpt and arch.model_of(gpt) is gpt2
    assert arch.config_from_dict({**gpt.to_dict(), "arch": "gpt2"}) == gpt
    for bad in ({**gpt.to_dict(), "arch": "mamba"}, {**gpt.to_dict(), "arch": ["llama"]}, [1]):
        with pytest.raises(TinyLMError):
            arch.config_from_dict(bad)
    with pytest.raises(TinyLMError, match="n_kv_head"):
        arch.config_from_dict({**llama_config.to_dict(), "n_kv_head": 3})


# ----------------------------------------------------------------------------- generation


def greedy(logits):
    return int(np.argmax(logits))


@pytest.mark.parametrize("n_kv_head", [2, 4])
def test_greedy_tokens_with_and_without_the_cache_are_core_generates_within_the_first_block(n_kv_head):
    config = config_of(n_kv_head)
    params = perturbed_params(config, seed=7, scale=0.5)
    prompt = [3, 1, 4]
    n = config.block_size - len(prompt) + 1                      # the last step's context is exactly one block
    ours = list(core.generate(params, config, prompt, 3 * config.block_size, greedy))
    cached = list(LD.generate(params, config, prompt, n, greedy, use_cache=True))
    uncached = list(LD.generate(params, config, prompt, 3 * config.block_size, greedy, use_cache=False))
    assert len(set(ours[:n])) > 1                                 # not one token repeated: a real check
    assert cached == ours[:n]
    assert uncached == ours                                       # without the cache: core's last-block rule, always


def test_the_cache_is_sized_by_the_tokens_drawn_not_a_huge_block_size():
    # a Llama's block_size bounds no array of its own: 10¹⁸ positions allocated the cache and crashed
    config = config_of(block_size=16)
    params = perturbed_params(config, seed=7, scale=0.5)
    huge = core.LlamaConfig(**{**config.__dict__, "block_size": 10 ** 18})
    prompt = [3, 1, 4]
    assert LD.new_kv_cache(huge, 2, np.float64, positions=9)["k"].shape == (2, 2, 2, 9, 4)
    assert LD.new_kv_cache(config, 2, np.float64, positions=10 ** 9)["k"].shape == (2, 2, 2, 16, 4)
    want = list(LD.generate(params, config, prompt, 13, greedy))
    assert list(LD.generate(params, huge, prompt, 13, greedy)) == want and len(set(want)) > 1


def sliding_window_logits(params, config, idx, start=0):
    """The last position's logits (V,) of the model over the whole sequence idx (N,) at positions start …
    start + N − 1, where in every layer each position attends to itself and the block_size − 1 positions
    before it: core's layers, with a band instead of the causal triangle. Written out here, independent of the
    decoder, as the definition of what a sliding cache computes."""
    P, N, H, Hkv = params, len(idx), config.n_head, config.n_kv_head
    D, positions = config.n_embd // H, np.arange(start, start + N)
    query, key = np.arange(N)[:, None], np.arange(N)[None, :]
    band = (key <= query) & (key > query - config.block_size)
    norm = lambda name, x: CL.rmsnorm_forward(x, P[name + ".weight"], config.norm_eps)[0]     # noqa: E731
    x = P["model.embed_tokens.weight"][np.asarray(idx)][None]
    for i in range(config.n_layer):
        W = lambda name: P[core.block_prefix(i) + name + ".weight"]                          # noqa: E731
        h = norm(core.block_prefix(i) + "input_layernorm", x)
        q = CL.rope_forward(CL.split_heads(h @ W("self_attn.q_proj").T, H), positions, config.rope_theta)[0]
        k = CL.rope_forward(CL.split_heads(h @ W("self_attn.k_proj").T, Hkv), positions, config.rope_theta)[0]
        v = CL.split_heads(h @ W("self_attn.v_proj").T, Hkv)
        k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)
        scores = np.where(band, q @ k.transpose(0, 1, 3, 2) / math.sqrt(D), -np.inf)
        x = x + CL.merge_heads(CL.softmax(scores) @ v) @ W("self_attn.o_proj").T
        h = norm(core.block_prefix(i) + "post_attention_layernorm", x)
        x = x + CL.swiglu_forward(h @ W("mlp.gate_proj").T, h @ W("mlp.up_proj").T)[0] @ W("mlp.down_proj").T
    return (norm("model.norm", x) @ P[core.head_name(config)].T)[0, -1]


def count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("tie", [False, True])
def test_every_cached_step_is_a_sliding_window_forward_with_no_refill(monkeypatch, tie):
    """Past the first block the cache slides: position p's key and value overwrite those of p − block_size, and
    nothing is recomputed (one prefill, one forward, for 40 tokens from a block of 8). Every step equals the
    sliding-window forward over the whole text (float64, 1e-9); its positions may start anywhere, since
    rotary scores depend on offsets only. It is not a fresh forward over the last block alone: from the
    second layer on, a cached key carries what its own position saw (checked below to differ)."""
    config = config_of(2, tie=tie)
    params = perturbed_params(config, seed=8, scale=0.3)
    prefills, forwards = count_calls(monkeypatch, LD, "prefill"), count_calls(monkeypatch, LD, "forward")
    rng = np.random.default_rng(2)
    trace, prompt = [], [4, 5, 6]
    tokens = list(LD.generate(params, config, prompt, 40, lambda z: int(rng.choice(11)), True, trace))
    assert len(prefills) == len(forwards) == 1
    text = prompt + tokens
    differs = 0
    for step, (context, logits) in enumerate(trace):
        seen = text[:len(prompt) + step]
        assert context == seen[-config.block_size:]
        reference = sliding_window_logits(params, config, seen)
        assert rel_error(logits, reference) < 1e-9, step
        if step % 10 == 0:
            assert rel_error(sliding_window_logits(params, config, seen, start=1000), reference) < 1e-9
        fresh = core.forward(params, config, np.array([context]))[0][0, -1]
        differs += rel_error(logits, fresh) > 1e-6
        if len(seen) <= config.block_size:
            assert rel_error(logits, fresh) < 1e-9                # within the first block, the same thing
    assert differs > 20


def test_with_one_layer_every_cached_step_is_a_forward_over_the_last_block():
    """One layer has no second-hand keys: a slid key is the key a fresh forward over the last block_size tokens
    computes, turned by a different but equally offset angle, so each step is that forward (from position 0)."""
    config = config_of(2, n_layer=1)
    params = perturbed_params(config, seed=9, scale=0.3)
    rng = np.random.default_rng(3)
    trace = []
    list(LD.generate(params, config, [1, 2], 30, lambda z: int(rng.choice(11)), True, trace))
    for context, logits in trace:
        assert rel_error(logits, core.forward(params, config, np.array([context]))[0][0, -1]) < 1e-9


@pytest.mark.parametrize("use_cache", [True, False])
def test_sequences_drawn_side_by_side_are_each_what_generate_draws_alone(use_cache):
    config = config_of(2)
    params = perturbed_params(config, seed=10, scale=0.3)
    rows, n = 3, 30
    draws = np.random.default_rng(4).integers(0, 11, size=(n, rows))
    steps = iter(draws)
    trace_rows = []
    list(LD.generate_rows(params, config, [7, 8], rows, n, lambda z: next(steps), use_cache, trace_rows))
    for r in range(rows):
        column = iter(draws[:, r])
        trace = []
        list(LD.generate(params, config, [7, 8], n, lambda z: int(next(column)), use_cache, trace))
        for (contexts, logits_rows), (context, logits) in zip(trace_rows, trace):
            assert contexts[r].tolist() == context
            assert rel_error(logits_rows[r], logits) < 1e-10


def test_generation_refuses_an_empty_prompt_and_no_rows():
    config = config_of(2)
    params = perturbed_params(config)
    with pytest.raises(TinyLMError):
        list(LD.generate(params, config, [], 3, greedy))
    with pytest.raises(TinyLMError):
        list(LD.generate_rows(params, config, [1], 0, 3, greedy))


def test_float32_sampling_matches_float64():
    """What sample.py runs (float32 weights) computes the float64 logits to float32's precision."""
    config = config_of(2)
    params = perturbed_params(config, seed=11, scale=0.3)
    params32 = {k: v.astype(np.float32) for k, v in params.items()}
    trace64, trace32 = [], []
    for p, trace in ((params, trace64), (params32, trace32)):
        picks = iter(np.random.default_rng(5).integers(0, 11, size=20))       # the same tokens for both
        list(LD.generate(p, config, [1, 2, 3], 20, lambda z: int(next(picks)), True, trace))
    for (_, a), (_, b) in zip(trace64, trace32):
        assert b.dtype == np.float32 and rel_error(b, a) < 1e-4
