"""Curvature: the top eigenvalues of the loss Hessian from Hessian-vector products of the explicit gradients.

H v ≈ (∇L(θ + εv) − ∇L(θ − εv)) / 2ε, in float64 on one fixed batch. The central difference is
exact for a quadratic and has error O(ε²‖∇³L‖) otherwise; in float64 with ε ≈ 1e-4 for a unit v
that is far below the eigenvalues we look for, while the rounding error (~1e-16/ε) stays negligible.
Lanczos (linalg.lanczos_top_eigs) then needs one HVP per iteration, two forward+backward passes.
"""
import math

import numpy as np
from tqdm import tqdm

from tinylm.analysis import linalg
from tinylm.errors import TinyLMError
from tinylm.fast.arch import fast_model
from tinylm.core.optim import learning_rate_at


def flatten(tensors, names):
    """Concatenate the named arrays into one float64 vector.   -> (dim,)"""
    return np.concatenate([np.asarray(tensors[n], dtype=np.float64).ravel() for n in names])


def unflatten(vec, like, names):
    """The inverse of flatten: a dict of float64 arrays shaped as like[name]."""
    out, i = {}, 0
    for n in names:
        size = like[n].size
        out[n] = vec[i:i + size].reshape(like[n].shape)
        i += size
    return out


def model_grad_fn(params, config, x, y):
    """(θ₀ (dim,), names, grad(θ) -> ∇L(θ) (dim,)) for the model's loss on the fixed batch x, y (B,T), in float64."""
    names = list(params)
    p64 = {n: np.asarray(params[n], dtype=np.float64) for n in names}
    theta0 = flatten(p64, names)

    def grad(theta):
        _, g = fast_model(config).loss_and_grads(unflatten(theta, p64, names), config, x, y)
        return flatten(g, names)

    return theta0, names, grad


def hvp(grad, theta, v, eps=1e-4):
    """H v ≈ (∇L(θ + εv̂) − ∇L(θ − εv̂)) ‖v‖ / 2ε with v̂ = v/‖v‖ (a step of length ε whatever ‖v‖).   -> (dim,)"""
    norm = float(np.linalg.norm(v))
    if norm == 0:
        return np.zeros_like(theta)
    u = v / norm
    return (grad(theta + eps * u) - grad(theta - eps * u)) * (norm / (2 * eps))


def top_eigenvalues(grad, theta, k=1, n_iter=None, eps=1e-4, seed=0, precondition=None, progress=False, desc="hessian"):
    """Largest k eigenvalues of H (or of P^-½ H P^-½ when precondition = diag P (dim,) is given) by Lanczos.   -> (vals (k,), vecs (dim, k))"""
    dim = len(theta)
    n_iter = min(dim, n_iter or 2 * k + 10)
    bar = tqdm(total=n_iter, desc=desc, unit="hvp", disable=not progress, leave=False)
    scale = None if precondition is None else 1.0 / np.sqrt(precondition)

    def matvec(v):
        bar.update(1)
        if scale is None:
            return hvp(grad, theta, v, eps)
        return scale * hvp(grad, theta, scale * v, eps)

    try:
        return linalg.lanczos_top_eigs(matvec, dim, k, n_iter=n_iter, seed=seed)
    finally:
        bar.close()


def adam_preconditioner(opt_state, names, beta2, eps=1e-8):
    """Adam's diagonal preconditioner P = √v̂ + ε, v̂ = v / (1 − β₂ᵗ): the step is lr·P⁻¹m̂.   -> (dim,)"""
    t = max(int(opt_state["t"]), 1)
    v = flatten(opt_state["v"], names) / (1.0 - beta2**t)
    return np.sqrt(v) + eps


def analyze_curvature(params, config, x, y, train_args, step, opt_state=None, k=3, n_iter=None, progress=True):
    """Top Hessian eigenvalues on one batch, against the edge-of-stability thresholds.   -> dict

    Gradient descent with step size η is stable on a quadratic only while λ_max < 2/η. For Adam the
    relevant matrix is the preconditioned P⁻¹H (similar to P^-½ H P^-½), whose threshold with
    momentum β₁ is (2 + 2β₁)/((1 − β₁)η) (Cohen et al. 2022, "Adaptive gradient methods at the edge
    of stability"); it is computed when the checkpoint holds Adam's second moments.
    """
    theta, names, grad = model_grad_fn(params, config, x, y)
    try:
        vals, _ = top_eigenvalues(grad, theta, k, n_iter, progress=progress, desc="hessian")
    except ValueError as e:       # the Krylov space closed early: every Hessian-vector product was (nearly) zero
        largest = float(np.max(np.abs(theta)))
        why = (f"its finite differences take steps of 1e-4, lost beside weights as large as {largest:.3g}"
               if largest * 1e-15 > 1e-4 * 1e-3 else "the loss is flat along every direction tried")
        raise TinyLMError(f"curvature: the Hessian has fewer than {k} directions of curvature to measure on this "
                          f"batch ({e}): {why}; leave curvature out of --only") from None
    peak = float(train_args.get("learning_rate", math.nan))
    lr_now = math.nan
    if all(key in train_args for key in ("min_lr", "warmup_iters", "lr_decay_iters")) and step is not None:
        lr_now = learning_rate_at(int(step), peak, train_args["min_lr"], train_args["warmup_iters"], train_args["lr_decay_iters"])
    out = {"n_params": len(theta), "batch_tokens": int(x.size), "eigenvalues": vals,
           "learning_rate": peak, "lr_at_step": lr_now,
           "gd_threshold_2_over_lr": 2.0 / peak if peak > 0 else math.nan,
           "gd_threshold_at_step": 2.0 / lr_now if lr_now > 0 else math.nan}
    if opt_state is not None:
        beta1, beta2 = float(train_args.get("beta1", 0.9)), float(train_args.get("beta2", 0.99))
        P = adam_preconditioner(opt_state, names, beta2)
        pvals, _ = top_eigenvalues(grad, theta, 1, n_iter, precondition=P, progress=progress, desc="hessian (Adam)")
        out["adam_preconditioned_top"] = float(pvals[0])
        lr = lr_now if lr_now > 0 else peak
        out["adam_threshold"] = (2 + 2 * beta1) / ((1 - beta1) * lr) if lr > 0 else math.nan
    return out
