"""The fast paths compute the same numbers as the plain ones: threaded batch split, in-place softmax, scatter-add."""
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from tinylm.cli import gradcheck
from tinylm.fast import layers as L
from tinylm.fast import model as M
from tinylm.core import gpt2 as G
from tinylm.fast import decode as D
from tinylm.fast import parallel


def tiny(bias=True, dropout=0.0, dtype=np.float64, seed=0):
    config = G.GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=16, bias=bias, dropout=dropout)
    params = G.init_params(config, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed)
    for k in params:
        params[k] += (0.1 * rng.standard_normal(params[k].shape)).astype(dtype)
    return config, params


@pytest.mark.parametrize("B", [2, 3, 5])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_threaded_split_gives_the_single_threaded_gradients(B, dtype, tol):
    if not parallel.blas_available():
        pytest.skip("BLAS thread count cannot be set here: the threaded path falls back to the plain one")
    config, params = tiny(dtype=dtype)
    rng = np.random.default_rng(1)
    idx, targets = rng.integers(0, 11, size=(2, B, 8))
    loss1, g1 = M.loss_and_grads(params, config, idx, targets)
    loss2, g2 = M.loss_and_grads_parallel(params, config, idx, targets, workers=2)
    assert abs(loss1 - loss2) <= tol * abs(loss1)
    assert set(g1) == set(g2)
    for k in g1:
        assert g2[k].dtype == dtype
        assert gradcheck.relative_error(g1[k], g2[k]) < tol, k


def test_threaded_split_matches_finite_differences_in_float64():
    config, params = tiny()
    rng = np.random.default_rng(2)
    idx, targets = rng.integers(0, 11, size=(2, 3, 8))
    _, grads = M.loss_and_grads_parallel(params, config, idx, targets, workers=2)
    for name in ("transformer.wte.weight", "transformer.h.1.mlp.c_fc.weight", "transformer.h.0.attn.c_attn.bias"):
        numeric = gradcheck.numerical_gradient(lambda: M.forward(params, config, idx, targets)[1], params[name],
                                               max_entries=30, rng=rng)
        assert gradcheck.compare(grads[name], numeric) < gradcheck.TOLERANCE, name


def test_threaded_split_with_dropout_is_reproducible_and_leaves_params_alone():
    config, params = tiny(dropout=0.2, dtype=np.float32)
    before = {k: v.copy() for k, v in params.items()}
    idx, targets = np.random.default_rng(3).integers(0, 11, size=(2, 4, 8))
    runs = [M.loss_and_grads_parallel(params, config, idx, targets, train=True, rng=np.random.default_rng(7))
            for _ in range(2)]
    assert runs[0][0] == runs[1][0]
    for k in params:
        np.testing.assert_array_equal(runs[0][1][k], runs[1][1][k])
        np.testing.assert_array_equal(params[k], before[k])
    plain, _ = M.loss_and_grads(params, config, idx, targets, train=False)
    assert runs[0][0] != plain                       # dropout did act


def test_one_worker_is_the_plain_path():
    config, params = tiny()
    idx, targets = np.random.default_rng(4).integers(0, 11, size=(2, 2, 8))
    l1, g1 = M.loss_and_grads(params, config, idx, targets)
    l2, g2 = M.loss_and_grads_parallel(params, config, idx, targets, workers=1)
    assert l1 == l2 and all(np.array_equal(g1[k], g2[k]) for k in g1)


def test_blas_thread_count_is_restored():
    before = parallel.blas_thread_count()
    with parallel.blas_threads(1) as ok:
        if ok:
            assert parallel.blas_thread_count() == 1
    assert parallel.blas_thread_count() == before


def test_in_place_causal_softmax_equals_the_textbook_one():
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((2, 3, 4, 6))
    for offset in (0, 2):
        Tq, Tk = scores.shape[-2:]
        future = np.arange(Tk)[None, :] > np.arange(Tq)[:, None] + offset
        e = np.exp(np.where(future, -np.inf, scores) - np.where(future, -np.inf, scores).max(-1, keepdims=True))
        ref = e / e.sum(-1, keepdims=True)
        np.testing.assert_allclose(L.causal_softmax(scores, offset), ref, rtol=1e-12, atol=1e-15)
        assert not np.isnan(scores).any()           # causal_softmax leaves its input alone


def test_scatter_add_rows_equals_add_at():
    rng = np.random.default_rng(6)
    idx = rng.integers(0, 9, size=50)
    rows = rng.standard_normal((50, 4))
    ref = np.zeros((12, 4))
    np.add.at(ref, idx, rows)
    np.testing.assert_allclose(L.scatter_add_rows(idx, rows, 12), ref, rtol=1e-12, atol=1e-12)


def test_float32_stays_float32_through_the_step():
    config, params = tiny(dtype=np.float32)
    idx, targets = np.random.default_rng(8).integers(0, 11, size=(2, 2, 8))
    logits, loss, cache = M.forward(params, config, idx, targets)
    assert logits.dtype == np.float32
    assert all(g.dtype == np.float32 for g in M.backward(params, config, cache).values())


@pytest.mark.parametrize("bias", [False, True])
def test_one_token_decoding_equals_forward_cached(bias):
    config, params = tiny(bias=bias)
    dw = D.decoding_weights(params, config)
    kv_fast, kv_plain = D.new_kv_cache(config, 1, np.float64), D.new_kv_cache(config, 1, np.float64)
    D.forward_cached(params, config, np.array([[3, 1]]), kv_fast)
    D.forward_cached(params, config, np.array([[3, 1]]), kv_plain)
    for token in (4, 0, 10, 7, 2, 9):                  # fills the cache to block_size
        fast = D.decode_next(dw, kv_fast, token)
        plain = D.forward_cached(params, config, np.array([[token]]), kv_plain)[0, -1]
        np.testing.assert_allclose(fast, plain, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(kv_fast["k"], kv_plain["k"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(kv_fast["v"], kv_plain["v"], rtol=1e-12, atol=1e-14)
    with pytest.raises(M.TinyLMError):
        D.decode_next(dw, kv_fast, 1)                  # the cache is full


def test_a_weighted_loss_gives_weighted_gradients():
    config, params = tiny()
    idx, targets = np.random.default_rng(12).integers(0, 11, size=(2, 3, 8))
    loss, grads = M.loss_and_grads(params, config, idx, targets)
    loss_w, grads_w = M.loss_and_grads(params, config, idx, targets, dloss=0.25)   # how each thread's slice is weighted
    assert loss_w == loss
    for k in grads:
        np.testing.assert_array_equal(grads_w[k], 0.25 * grads[k])                 # a power of 2: exact


@pytest.mark.parametrize("start,t", [(0, 5), (3, 4), (0, 1), (6, 2)])
def test_prefill_of_the_last_position_only_gives_its_logits_and_every_key(start, t):
    config, params = tiny()
    tokens = np.random.default_rng(start + t).integers(0, 11, size=(1, start + t))
    kv_last, kv_all = D.new_kv_cache(config, 1, np.float64), D.new_kv_cache(config, 1, np.float64)
    for kv in (kv_last, kv_all):
        if start:
            D.forward_cached(params, config, tokens[:, :start], kv)
    last = D.forward_cached(params, config, tokens[:, start:], kv_last, last_only=True)
    every = D.forward_cached(params, config, tokens[:, start:], kv_all)
    assert last.shape == (1, 1, config.vocab_size)
    np.testing.assert_allclose(last, every[:, -1:], rtol=1e-12, atol=1e-12)
    assert kv_last["len"] == kv_all["len"] == start + t
    np.testing.assert_array_equal(kv_last["kv"], kv_all["kv"])     # later tokens see the same keys and values


def test_one_token_decoding_in_float32_stays_close():
    config, params = tiny(dtype=np.float32)
    dw = D.decoding_weights(params, config)
    kv = D.new_kv_cache(config, 1, np.float32)
    D.forward_cached(params, config, np.array([[3, 1, 4]]), kv)
    fast = D.decode_next(dw, kv, 5)
    assert fast.dtype == np.float32
    reference, _, _ = M.forward(params, config, np.array([[3, 1, 4, 5]]))
    np.testing.assert_allclose(fast, reference[0, -1], rtol=1e-4, atol=1e-5)


def test_sampling_draw_is_rng_choice():
    from tinylm.core.sampling import draw, next_token_distribution
    gen = np.random.default_rng(9)
    for _ in range(200):
        p = next_token_distribution(gen.standard_normal(65) * 3, 0.8, top_k=int(gen.integers(1, 80)))
        seed = int(gen.integers(0, 2**32))
        assert draw(p, np.random.default_rng(seed)) == np.random.default_rng(seed).choice(p.size, p=p)


def held_bytes(cache):
    """Bytes of the distinct arrays a forward's cache holds (views counted once, by their base)."""
    seen, total, stack = set(), 0, [cache]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, np.ndarray):
            base = item if item.base is None else item.base
            if id(base) not in seen:
                seen.add(id(base))
                total += base.nbytes
    return total


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_activations_recomputed_in_the_backward_give_the_same_gradients_and_are_not_held(monkeypatch, bias, dtype):
    config, params = tiny(bias=bias, dtype=dtype)
    idx, targets = np.random.default_rng(10).integers(0, 11, size=(2, 3, 8))
    _, kept = M.loss_and_grads(params, config, idx, targets)
    held_kept = held_bytes(M.forward(params, config, idx, targets)[2])
    monkeypatch.setattr(M, "RECOMPUTE_ABOVE_BYTES", 0)    # as for baby GPT's large activations
    _, recomputed = M.loss_and_grads(params, config, idx, targets)
    for k in kept:
        np.testing.assert_array_equal(kept[k], recomputed[k])
    B, T, C = 3, 8, config.n_embd   # per layer: GELU's output + slope (2·BT4C) held as its input (BT4C); two norms' outputs
    saved = config.n_layer * (B * T * 4 * C + 2 * B * T * C) * np.dtype(dtype).itemsize
    assert held_kept - held_bytes(M.forward(params, config, idx, targets)[2]) == saved


def test_gelu_is_gpt2s_tanh_form_and_quiet_for_very_negative_inputs():
    x = np.linspace(-30, 30, 2001)
    reference = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(L.gelu_forward(x)[0], reference, rtol=1e-12, atol=1e-12)
    with np.errstate(over="raise", invalid="raise", divide="raise"):   # underflow to 0 is fine
        y, _ = L.gelu_forward(x.astype(np.float32))       # e^{−2u} overflows to inf on purpose
    np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-6)


def test_model_with_attention_in_row_blocks_gives_the_same_loss_and_gradients(monkeypatch):
    config, params = tiny()                                          # T = 8: one block by default
    idx, targets = np.random.default_rng(6).integers(0, 11, size=(2, 3, 8))
    loss, grads = M.loss_and_grads(params, config, idx, targets)
    monkeypatch.setattr(L, "ATTENTION_ROW_BLOCK", 3)                 # blocks [0,3) [3,6) [6,8)
    for loss_b, grads_b in (M.loss_and_grads(params, config, idx, targets),
                            M.loss_and_grads_parallel(params, config, idx, targets, workers=2)):
        assert abs(loss_b - loss) < 1e-12
        for k in grads:
            np.testing.assert_allclose(grads_b[k], grads[k], rtol=1e-10, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("row_block", [1, 2, 3, 7])
def test_attention_in_row_blocks_gives_the_same_numbers_and_zeros_above_the_blocks(row_block):
    rng = np.random.default_rng(5)
    qkv = rng.standard_normal((3, 7, 3 * 8))
    dy = rng.standard_normal((3, 7, 8))
    y, cache = L.attention_forward(qkv, 2, row_block=7)                  # one block: the whole square
    y_b, cache_b = L.attention_forward(qkv, 2, row_block=row_block)
    np.testing.assert_allclose(y_b, y, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(cache_b[3], cache[3], rtol=1e-13, atol=1e-13)
    assert np.all(cache_b[3][..., np.triu(np.ones((7, 7), bool), k=1)] == 0.0)
    np.testing.assert_allclose(L.attention_backward(dy, cache_b), L.attention_backward(dy, cache), rtol=1e-12, atol=1e-12)
    assert len(cache_b[-1]) == -(-7 // row_block)


def test_parallel_split_helpers():
    groups = parallel.split_by_size(list("abcde"), [5, 4, 3, 2, 1], 2)
    assert sorted(sum(groups, [])) == list("abcde") and len(groups) == 2
    for size, calls in ((40_000, 2), (4_000, 1)):        # 40 small arrays: one call, on this thread
        seen, groups = [], []
        arrays = {f"p{i}": np.zeros(size) for i in range(3 if size > 10_000 else 40)}
        parallel.for_each_split(lambda names: (seen.extend(names), groups.append(names)), arrays, workers=2)
        assert sorted(seen) == sorted(arrays) and len(groups) == calls, (size, groups)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_in_chunks_gives_the_same_numbers(monkeypatch, dtype):
    x = (3 * np.random.default_rng(11).standard_normal((7, 13))).astype(dtype)
    dy = np.random.default_rng(12).standard_normal((7, 13)).astype(dtype)
    y, cache = L.gelu_forward(x)
    dx = L.gelu_backward(dy, cache)
    monkeypatch.setattr(L, "GELU_CHUNK", 10)               # several chunks and a short last one
    y2, cache2 = L.gelu_forward(x)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(L.gelu_backward(dy, cache2), dx)
    np.testing.assert_array_equal(L.gelu_values_forward(x), y)
    d = dy.copy()
    assert L.gelu_backward_(d, cache2) is d                # in place: dy becomes dx
    np.testing.assert_array_equal(d, dx)


REUSE_SCRIPT = """
import resource, sys, threading
import numpy as np
from tinylm.fast import parallel
assert parallel.keep_freed_memory(**({} if sys.argv[1] == "default" else {"pad_bytes": int(sys.argv[1])}))
faults = []
def work():
    n = 50 << 18                                    # 50 MB of float32, as baby GPT's activations a thread
    first = np.ones(n, np.float32)
    second = np.ones(n, np.float32)                 # too big to share a 64 MB heap with the first
    del second
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    second = np.ones(n, np.float32)
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(faults[0])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_a_worker_threads_freed_large_arrays_are_reused_not_faulted_in_again():
    def faults(pad_bytes):
        run = subprocess.run([sys.executable, "-c", REUSE_SCRIPT, pad_bytes], capture_output=True, text=True, check=True)
        return int(run.stdout)
    without_pad = faults("0")     # glibc unmaps the second array's heap once it is free: ~540 faults here
    if without_pad < 10:        # (with transparent huge pages always on, a fresh 50 MB costs ~25)
        pytest.skip(f"this malloc faulted only {without_pad} pages in again even without the pad")
    assert faults("default") * 10 < without_pad


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or parallel.usable_cores() < 2, reason="needs Linux and 2 cores")
def test_each_worker_thread_runs_on_a_core_of_its_own():
    import threading
    both_running = threading.Barrier(2, timeout=10)      # so that the pool really runs two threads

    def where():
        both_running.wait()
        return threading.current_thread().name, os.sched_getaffinity(0)

    (name_a, cores_a), (name_b, cores_b) = parallel.run_parallel(where, [(), ()])
    assert name_a != name_b
    assert len(cores_a) == len(cores_b) == 1 and cores_a != cores_b
    assert cores_a | cores_b <= os.sched_getaffinity(0)      # cores this process may use; this thread is not pinned


def test_a_forward_for_no_backward_gives_the_same_numbers_without_gelus_slope(monkeypatch):
    config, params = tiny(bias=True)
    idx, targets = np.random.default_rng(11).integers(0, 11, size=(2, 3, 8))
    logits, loss, _ = M.forward(params, config, idx, targets)

    def no_slope_wanted(x):
        raise AssertionError("a forward with no backward to follow worked out GELU's slope")

    monkeypatch.setattr(L, "gelu_forward", no_slope_wanted)
    logits2, loss2, cache = M.forward(params, config, idx, targets, for_backward=False)
    assert cache is None and loss2 == loss and np.array_equal(logits2, logits)


def test_threads_are_pinned_only_one_to_each_allowed_core(monkeypatch):
    """With the process allowed cores {3, 7}, two workers go to 3 and 7; one or three workers stay unpinned."""
    pinned = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {7, 3}, raising=False)
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: pinned.append((pid, cores)), raising=False)
    init = parallel._one_core_each(2)
    init()
    init()
    assert pinned == [(0, {3}), (0, {7})]
    assert parallel._one_core_each(1) is None and parallel._one_core_each(3) is None
