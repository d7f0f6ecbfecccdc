"""AdamW, the schedule and clipping against their formulas."""
import math

import numpy as np

from tinylm.optim import adamw_init, adamw_step, clip_by_global_norm, global_norm, learning_rate_at


def test_adamw_matches_the_formula_over_several_steps():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
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
