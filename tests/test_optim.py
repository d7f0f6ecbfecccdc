"""AdamW, the schedule and clipping against their formulas."""
import math

import numpy as np
import pytest

from tinylm.core.optim import adamw_init, adamw_step, clip_by_global_norm, clip_factor, global_norm, learning_rate_at


@pytest.mark.parametrize("eps", [1e-8, 0.3])      # a large ε too, so that where ε enters is tested
def test_adamw_matches_the_formula_over_several_steps(eps):
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    ref = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    state = adamw_init(params)
    lr, b1, b2, wd = 0.01, 0.9, 0.99, 0.1
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


def test_grad_scale_is_clipping_folded_into_the_update():
    """adamw_step(grads, grad_scale=s) must move θ, m and v exactly as clipping the gradients by s in place
    and then stepping would (to rounding), and leave grads as they were."""
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal((3, 4)), "g": rng.standard_normal(4)}
    clipped = {k: v.copy() for k, v in params.items()}
    state, state_clipped = adamw_init(params), adamw_init(clipped)
    for t in range(4):
        grads = {k: 5 * rng.standard_normal(v.shape) for k, v in params.items()}
        before = {k: g.copy() for k, g in grads.items()}
        scale = clip_factor(global_norm(grads), 1.0)
        assert scale < 0.5                                   # the clipping really does something here
        adamw_step(params, grads, state, 0.01, grad_scale=scale)
        for k in grads:
            np.testing.assert_array_equal(grads[k], before[k])
        clip_by_global_norm(before, 1.0)
        adamw_step(clipped, before, state_clipped, 0.01)
        for k in params:
            for a, b in ((params[k], clipped[k]), (state["m"][k], state_clipped["m"][k]),
                         (state["v"][k], state_clipped["v"][k])):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)
    assert clip_factor(0.5, 1.0) == 1.0 and clip_factor(2.0, 0.0) == 1.0 and math.isclose(clip_factor(4.0, 1.0), 0.25, rel_tol=1e-6)


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


def test_the_fast_adamw_is_cores_adamw():
    """fast/optim.py's folded, threaded AdamW moves θ, m and v as core's textbook AdamW does (float64, to
    rounding), with and without clipping's factor and weight decay, over steps where the bias corrections matter."""
    from tinylm.fast import optim as fast_optim
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((6, 5)), "b": rng.standard_normal(5), "e": rng.standard_normal((4, 3))}
    mine = {k: v.copy() for k, v in params.items()}
    state, fast_state = adamw_init(params), adamw_init(mine)
    for step in range(5):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        scale = 0.5 if step % 2 else 1.0
        adamw_step(params, grads, state, 0.01, weight_decay=0.1, grad_scale=scale)
        fast_optim.adamw_step(mine, grads, fast_state, 0.01, weight_decay=0.1, grad_scale=scale, workers=2)
        for k in params:
            np.testing.assert_allclose(mine[k], params[k], rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(fast_state["m"][k], state["m"][k], rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(fast_state["v"][k], state["v"][k], rtol=1e-12, atol=1e-14)
    assert fast_state["t"] == state["t"] == 5
