"""AdamW, the schedule and clipping against their formulas."""
import math

import numpy as np

import pytest

from tinylm.optim import (Packed, adamw_init, adamw_state, adamw_step, clip_by_global_norm, global_norm,
                          learning_rate_at, pack)


def test_adamw_matches_the_formula_over_several_steps():
    rng = np.random.default_rng(0)
    params = pack({"b": rng.standard_normal(4), "w": rng.standard_normal((3, 4))})
    ref = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    state = adamw_init(params)
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.99, 1e-8, 0.1
    for t in range(1, 6):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        adamw_step(params, {k: g.copy() for k, g in grads.items()}, state, lr, b1, b2, eps, wd)
        for k in ref:
            m[k] = b1 * m[k] + (1 - b1) * grads[k]
            v2[k] = b2 * v2[k] + (1 - b2) * grads[k] ** 2
            decay = wd if ref[k].ndim >= 2 else 0.0            # biases and gains are not decayed
            ref[k] = ref[k] * (1 - lr * decay)
            ref[k] -= lr * (m[k] / (1 - b1 ** t)) / (np.sqrt(v2[k] / (1 - b2 ** t)) + eps)
    for k in ref:
        np.testing.assert_allclose(params[k], ref[k], rtol=1e-12, atol=1e-12)


def test_schedule_warms_up_then_decays_to_min_lr():
    f = lambda s: learning_rate_at(s, 1e-3, 1e-4, 100, 2000)
    assert f(0) < f(50) < f(99) <= 1e-3
    assert math.isclose(f(100), 1e-3)
    assert math.isclose(f(2000), 1e-4) and math.isclose(f(5000), 1e-4)
    assert math.isclose(f(1050), (1e-3 + 1e-4) / 2)
    assert all(f(s) >= f(s + 1) for s in range(100, 2000))


def test_clipping_scales_to_the_max_norm_and_leaves_small_gradients_alone():
    grads = {"a": np.full((2, 2), 3.0), "b": np.full(2, 4.0)}
    norm = clip_by_global_norm(grads, 1.0)
    assert math.isclose(norm, math.sqrt(4 * 9 + 2 * 16))
    assert math.isclose(global_norm(grads), 1.0, rel_tol=1e-5)
    small = {"a": np.array([0.1, 0.2])}
    clip_by_global_norm(small, 1.0)
    assert np.array_equal(small["a"], [0.1, 0.2])


def test_pack_lays_the_arrays_end_to_end_matrices_first_and_keeps_names_and_order():
    rng = np.random.default_rng(1)
    arrays = {"ln.weight": rng.standard_normal(5), "w1": rng.standard_normal((2, 3)), "b": rng.standard_normal(3),
              "w2": rng.standard_normal((4, 2))}
    packed = pack(arrays)
    assert isinstance(packed, Packed) and list(packed) == list(arrays)          # the dict's own order
    assert packed.layout == ("w1", "w2", "ln.weight", "b") and packed.n_decay == 6 + 8
    np.testing.assert_array_equal(packed.vector, np.concatenate([arrays[k].ravel() for k in packed.layout]))
    for k, a in arrays.items():
        np.testing.assert_array_equal(packed[k], a)
        assert packed[k].shape == a.shape and np.shares_memory(packed[k], packed.vector)
    packed.vector[:] = 0.0                                                      # the names are views, not copies
    assert all(not packed[k].any() for k in packed)
    assert pack(arrays, np.float32).vector.dtype == np.float32


def test_adamw_needs_packed_params_and_its_moments_follow_their_layout():
    params = {"w": np.ones((2, 2)), "b": np.zeros(2)}
    with pytest.raises(TypeError, match="pack"):
        adamw_init(params)
    packed = pack(params)
    state = adamw_state(packed, 7, m={"w": np.full((2, 2), 2.0), "b": np.full(2, 3.0)},
                        v={"b": np.full(2, 5.0), "w": np.full((2, 2), 4.0)})    # any key order: placed by name
    assert state["t"] == 7 and state["m"].layout == state["v"].layout == packed.layout
    np.testing.assert_array_equal(state["m"].vector, [2, 2, 2, 2, 3, 3])
    np.testing.assert_array_equal(state["v"].vector, [4, 4, 4, 4, 5, 5])
    with pytest.raises(TypeError, match="pack"):
        adamw_step(params, params, state, 0.1)


def test_adamw_on_two_threads_gives_the_same_numbers_as_on_one():
    rng = np.random.default_rng(2)
    arrays = {"w": rng.standard_normal((300, 300)).astype(np.float32), "b": rng.standard_normal(300).astype(np.float32)}
    runs = []
    for workers in (1, 2):
        params = pack(arrays)
        state = adamw_init(params)
        grad_rng = np.random.default_rng(3)
        for _ in range(3):
            grads = {k: grad_rng.standard_normal(a.shape).astype(np.float32) for k, a in arrays.items()}
            adamw_step(params, grads, state, 1e-2, workers=workers)           # plain-dict gradients are packed
        runs.append((params.vector.copy(), state["m"].vector.copy(), state["v"].vector.copy()))
    for one, two in zip(*runs):
        np.testing.assert_array_equal(one, two)
    assert not np.array_equal(runs[0][0], pack(arrays).vector)


def test_clipping_a_packed_gradient_scales_its_vector():
    grads = pack({"a": np.full((2, 2), 3.0), "b": np.full(2, 4.0)})
    norm = clip_by_global_norm(grads, 1.0)
    assert math.isclose(norm, math.sqrt(4 * 9 + 2 * 16))
    assert math.isclose(float(np.linalg.norm(grads.vector)), 1.0, rel_tol=1e-5)
    assert math.isclose(global_norm(grads), 1.0, rel_tol=1e-5)
