"""KV-cached generation equals uncached forwards; the sampling filters do what they say."""
import numpy as np
import pytest

from tinylm.fast import model as M
from tinylm.core import gpt2 as G
from tinylm.fast import decode as D
from tinylm.errors import TinyLMError
from tinylm.core.sampling import check_sampling_args, next_token_distribution, sample_next


def small_model(block_size=8):
    config = G.GPTConfig(block_size=block_size, vocab_size=11, n_layer=2, n_head=2, n_embd=16, bias=True)
    params = G.init_params(config, seed=0, dtype=np.float64)
    rng = np.random.default_rng(0)
    for k in params:
        params[k] += 0.2 * rng.standard_normal(params[k].shape)   # sharper than init, so steps differ
    return config, params


def test_cached_and_uncached_logits_agree_while_context_fits():
    config, params = small_model(block_size=16)
    prompt = np.array([1, 2, 3])
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    trace_c, trace_u = [], []
    n = config.block_size - len(prompt) + 1          # last step's context is exactly block_size
    toks_c = list(D.generate(params, config, prompt, n, lambda z: int(rng_a.choice(11)), True, trace_c))
    toks_u = list(D.generate(params, config, prompt, n, lambda z: int(rng_b.choice(11)), False, trace_u))
    assert toks_c == toks_u
    for (ctx_c, lc), (ctx_u, lu) in zip(trace_c, trace_u):
        assert ctx_c == ctx_u
        np.testing.assert_allclose(lc, lu, rtol=1e-10, atol=1e-10)


def test_every_cached_step_past_the_block_equals_a_forward_over_the_rules_context():
    config, params = small_model(block_size=8)
    rng = np.random.default_rng(1)
    trace = []
    tokens = list(D.generate(params, config, [4, 5], 40, lambda z: int(rng.choice(11)), True, trace))
    assert len(tokens) == 40
    window = D.refill_window(config)
    full = [4, 5] + tokens
    lengths = []
    for step, (context, logits) in enumerate(trace):
        assert context == full[step + 2 - len(context): step + 2]      # a suffix of the text so far
        assert window <= len(context) <= config.block_size or step + 2 < window
        reference, _, _ = M.forward(params, config, np.array([context]))
        np.testing.assert_allclose(logits, reference[0, -1], rtol=1e-10, atol=1e-10)
        lengths.append(len(context))
    assert max(lengths) == config.block_size and window in lengths      # the window did slide


@pytest.mark.parametrize("use_cache", [True, False])
def test_sequences_drawn_side_by_side_are_each_what_generate_draws_alone(use_cache):
    """generate_rows (one cache with a row per sequence, decode_rows) gives every row the contexts, logits and
    tokens generate gives that sequence by itself, through the cache's refills (40 tokens, block of 8)."""
    config, params = small_model(block_size=8)
    rows, n = 3, 40
    draws = np.random.default_rng(2).integers(0, 11, size=(n, rows))   # each row's tokens, fixed in advance
    steps = iter(draws)
    trace = []
    together = np.array(list(D.generate_rows(params, config, [4, 5], rows, n, lambda logits: next(steps),
                                             use_cache, trace)))
    assert together.shape == (n, rows) and (together == draws).all()
    for r in range(rows):
        mine, alone = iter(draws[:, r]), []
        assert list(D.generate(params, config, [4, 5], n, lambda z: int(next(mine)), use_cache, alone)) \
            == list(draws[:, r])
        for (contexts, logits), (context, want) in zip(trace, alone):
            assert list(contexts[r]) == list(context)
            np.testing.assert_allclose(logits[r], want, rtol=1e-10, atol=1e-10)


def test_decode_rows_is_forward_cached_row_by_row_for_dense_and_factorized_layers():
    from tinylm.lowrank.compress import compress_model, ranks_for
    config, params = small_model(block_size=16)
    factorized = compress_model(params, config, ranks_for(config, rank=("int", 3)), "svd", None)[0]
    assert any(k.endswith(".weight_A") for k in factorized)
    idx = np.random.default_rng(3).integers(0, 11, size=(4, 12))
    for p in (params, factorized):
        want = D.forward_cached(p, config, idx, D.new_kv_cache(config, 4, np.float64))
        kv = D.new_kv_cache(config, 4, np.float64)
        D.forward_cached(p, config, idx[:, :5], kv)
        dw = D.decoding_weights(p, config)
        for t in range(5, 12):
            np.testing.assert_allclose(D.decode_rows(dw, kv, idx[:, t]), want[:, t], rtol=1e-10, atol=1e-10)
        with pytest.raises(TinyLMError):
            for _ in range(5):                   # 12 + 5 > block_size
                D.decode_rows(dw, kv, idx[:, 0])


def test_generate_rows_refuses_no_rows_and_an_empty_prompt():
    config, params = small_model()
    with pytest.raises(TinyLMError, match="rows"):
        next(D.generate_rows(params, config, [1], 0, 5, np.argmax))
    with pytest.raises(TinyLMError, match="prompt"):
        next(D.generate_rows(params, config, [], 2, 5, np.argmax))


def test_cache_beats_recomputation_in_work_not_just_in_tests():
    config, params = small_model(block_size=8)
    kv = D.new_kv_cache(config, 1, np.float64)
    D.forward_cached(params, config, np.array([[1, 2, 3]]), kv)
    assert kv["len"] == 3
    with pytest.raises(TinyLMError):
        D.forward_cached(params, config, np.array([[1] * 6]), kv)   # 3 + 6 > block_size


def test_temperature_zero_is_greedy():
    logits = np.array([0.1, 3.0, -1.0, 2.9])
    assert all(sample_next(logits, 0.0, rng=np.random.default_rng(i)) == 1 for i in range(5))


def test_top_k_keeps_only_the_k_largest():
    p = next_token_distribution(np.array([1.0, 5.0, 3.0, 4.0, 2.0]), 1.0, top_k=2)
    assert set(np.flatnonzero(p)) == {1, 3}
    assert np.isclose(p.sum(), 1.0)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert set(np.flatnonzero(next_token_distribution(logits, 1.0, top_p=0.5))) == {0}
    assert set(np.flatnonzero(next_token_distribution(logits, 1.0, top_p=0.79))) == {0, 1}
    assert set(np.flatnonzero(next_token_distribution(logits, 1.0, top_p=0.81))) == {0, 1, 2}
    assert np.count_nonzero(next_token_distribution(logits, 1.0, top_p=1.0)) == 4


def test_temperature_sharpens_and_flattens():
    logits = np.array([1.0, 2.0, 3.0])
    cold = next_token_distribution(logits, 0.5)
    hot = next_token_distribution(logits, 2.0)
    assert cold[2] > next_token_distribution(logits, 1.0)[2] > hot[2]


@pytest.mark.parametrize("t,k,p", [(-1, None, None), (1.0, 0, None), (1.0, None, 0.0), (1.0, None, 1.5)])
def test_invalid_sampling_settings_are_refused(t, k, p):
    with pytest.raises(TinyLMError):
        check_sampling_args(t, k, p)
