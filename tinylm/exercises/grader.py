"""Exercises graded against tinylm's own functions (tinylm/exercises/README.md says what each one asks).

    python -m tinylm.exercises list                 # the exercises, easy to hard
    python -m tinylm.exercises start N              # copy the starter to exercises/exN.py (never over a file)
    python -m tinylm.exercises check N [--file P]   # grade exercises/exN.py (or P)

`check` runs the learner's code in a child process (a fresh Python), never in its own: there it loads the
file from its path with importlib (any file name; their own code, nothing unpickled), calls the functions
the exercise names on random float64 inputs drawn from a fixed seed, and compares each result with a
reference: tinylm's layers (core's and the fast path's), the analysis' linear algebra, or numpy.linalg
computed here. The child sends each verdict to this process over a pipe of its own, and this process
prints one line per check: PASS or FAIL, the measured error and the tolerance. Exit status 0 only when
the child sent a verdict for every check and each passed; 1 when one fails; 2 (with one line on stderr)
for a missing file or function, an exception raised in the learner's code (its name and line), code that
runs past the time limit (--timeout, 60 s by default: `while True: pass`) or ends the child before its
last verdict (`os._exit(0)`), or an exercise that does not exist. What the child prints is shown as it
comes; it cannot print a verdict, only send one.

Each checker is a generator of results (ok, what was checked, error, tolerance, note), so a line is
printed as soon as its check is done.
"""
import argparse
import importlib.machinery
import importlib.util
import io
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings

import numpy as np

from tinylm.cli import gradcheck as G
from tinylm.core import layers as L
from tinylm.fast import model as M
from tinylm.core import gpt2 as GPT
from tinylm.fast import decode as D
from tinylm.analysis.interventions import gelu, layer_norm, linear
from tinylm.core.layers import softmax
from tinylm.errors import TinyLMError
from tinylm.files import check_regular
from tinylm.analysis.embeddings import head_subspace_overlaps
from tinylm.analysis.linalg import principal_angles, ridge_least_squares, truncate_rank
from tinylm.analysis.textdata import fixed_windows, resolve_data_path, validation_ids
from tinylm.cli.common import OneLineParser, run_cli
from tinylm.core.sampling import sample_next
from tinylm.io.checkpoint import load_checkpoint
from tinylm.lowrank.compress import layer_names, solve_triangular
from tinylm.lowrank.factorized import dense_params

HERE = os.path.dirname(os.path.abspath(__file__))
STARTERS = os.path.join(HERE, "starters")
SOLUTIONS = os.path.join(HERE, "solutions")


class ExerciseError(TinyLMError):
    """The learner's file cannot be graded (missing, lacking a function, raised): one line, exit status 2."""
    exit_code = 2


def default_file(n):
    return os.path.join("exercises", f"ex{n}.py")


# ----------------------------------------------------------------------------- the learner's code


def one_line(text):
    return " ".join(str(text).split())


def describe_exception(e, path):
    """'exercises/ex2.py line 14, in layernorm_backward: ValueError: ...': the learner's own frame, if any."""
    where = path
    if isinstance(e, SyntaxError) and e.lineno:
        where = f"{path} line {e.lineno}"
    else:
        mine = [f for f in traceback.extract_tb(e.__traceback__)
                if os.path.abspath(f.filename) == os.path.abspath(path)]
        if mine:
            where = f"{path} line {mine[-1].lineno}, in {mine[-1].name}"
    message = one_line(e.msg if isinstance(e, SyntaxError) else e)
    text = f"{where}: {type(e).__name__}" + (f": {message}" if message else "")
    if isinstance(e, NotImplementedError):
        text += " (still the starter's body: write this function)"
    return text


def check_learner_file(n, path):
    """ExerciseError unless path is a regular file (a FIFO would hang the load, a folder cannot be run)."""
    if not os.path.exists(path):
        hint = f"python -m tinylm.exercises start {n}" + ("" if path == default_file(n) else f" --file {path}")
        raise ExerciseError(f"no file {path}: write exercise {n} there, or copy the starter with: {hint}")
    check_regular(path, "exercise file", ExerciseError)


def load_learner(n, path):
    """The learner's file as a module, loaded from its path; its folder is on sys.path while it loads."""
    check_learner_file(n, path)
    name = f"tinylm_exercise_{n}"       # any file name: the loader is given, not guessed from a .py suffix
    spec = importlib.util.spec_from_file_location(name, path, loader=importlib.machinery.SourceFileLoader(name, path))
    module = importlib.util.module_from_spec(spec)
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)
    sys.modules[spec.name] = module             # as an import would: dataclasses in the file look their module up here
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        del sys.modules[spec.name]
        raise ExerciseError(f"loading {describe_exception(e, path)}") from e
    finally:
        sys.path.remove(folder)
    names = EXERCISES[n]["functions"]
    for name in names:
        if not callable(getattr(module, name, None)):
            raise ExerciseError(f"{path} has no function {name} (exercise {n} asks for {', '.join(names)})")
    return module


def learner_caller(module, path):
    """call(name, *args): the learner's function on copies of the arrays given (so it cannot spoil the
    checker's references); an exception becomes one line; each distinct warning is shown once as a note."""
    seen = set()

    def call(name, *args):
        args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = getattr(module, name)(*args)
            except (Exception, SystemExit) as e:
                raise ExerciseError(describe_exception(e, path)) from e
        for w in caught:
            note = f"note: {name} warned: {w.category.__name__}: {one_line(w.message)}"
            if note not in seen:
                seen.add(note)
                print(note)
        return out
    return call


def unpack(value, n, name, what):
    """value as a tuple of n things, or one line saying what came back instead."""
    if not isinstance(value, (tuple, list)) or len(value) != n:
        got = f"{len(value)} values" if isinstance(value, (tuple, list)) else type(value).__name__
        raise ExerciseError(f"{name} returned {got}; it should return {n}: {what}")
    return value


# ----------------------------------------------------------------------------- comparing results


def as_array(x, shape=None):
    """(float64 array, None) or (None, why it cannot be compared)."""
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        return None, f"got {type(x).__name__}, not an array of numbers"
    if shape is not None and a.shape != tuple(shape):
        return None, f"shape {a.shape}, expected {tuple(shape)}"
    if not np.all(np.isfinite(a)):
        return None, "NaN or inf in the result"
    return a, None


def close(what, got, want, tol):
    """Norm-wise relative error ‖got − want‖ / (‖got‖ + ‖want‖) (gradcheck.relative_error) against tol."""
    want = np.asarray(want, dtype=np.float64)
    a, why = as_array(got, want.shape)
    if a is None:
        return False, what, math.inf, tol, why
    err = G.relative_error(a, want)
    return err <= tol, what, err, tol, None


def small(what, err, tol, note=None):
    """A measured error (already computed; NaN or None means the result could not be measured) against tol."""
    if err is None or not np.isfinite(err):
        return False, what, math.inf, tol, note or "could not be measured"
    return float(err) <= tol, what, float(err), tol, note


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) if np.size(a) else 0.0


def random_orthonormal(rng, m, n):
    """An (m, n) matrix with orthonormal columns, uniformly random (QR of a Gaussian, signs fixed)."""
    Q, Rr = np.linalg.qr(rng.standard_normal((m, n)))
    return Q * np.sign(np.diag(Rr))


# ----------------------------------------------------------------------------- 1 softmax


def check_softmax(call, rng, opts):
    z = rng.standard_normal((4, 5, 7))
    y = call("softmax", z)
    yield close("softmax(z) = exp(z) / Σ exp(z) over the last axis (relative error)", y, softmax(z), 1e-12)
    a, why = as_array(y, z.shape)
    yield small("every row sums to 1 (max |Σ y − 1|)", None if a is None else max_abs(a.sum(-1), 1.0), 1e-12, why)
    big = 1000.0 * z + 500.0
    yield close("softmax(1000 z + 500): no overflow (relative error)", call("softmax", big), softmax(big), 1e-12)
    dy = rng.standard_normal(z.shape)
    dz = call("softmax_backward", dy, softmax(z))
    zz = z.copy()
    numeric = G.numerical_gradient(lambda: float(np.sum(softmax(zz) * dy)), zz)
    yield close("softmax_backward against central differences (relative error)", dz, numeric, G.TOLERANCE)
    s = softmax(z)
    yield close("softmax_backward = y ⊙ (dy − Σ dy ⊙ y) (relative error)", dz,
                s * (dy - np.sum(dy * s, -1, keepdims=True)), 1e-12)


# ----------------------------------------------------------------------------- 2 layer norm


def check_layernorm(call, rng, opts):
    x = rng.standard_normal((2, 3, 8)) * 2.0 + 0.5
    w, b = 1.0 + 0.5 * rng.standard_normal(8), rng.standard_normal(8)   # not 1 and 0: no term hides
    yield close("layernorm_forward equals core's layer norm (relative error)", call("layernorm_forward", x, w, b),
                layer_norm(x, w, b), 1e-12)
    dy = rng.standard_normal(x.shape)
    dx, dw, db = unpack(call("layernorm_backward", dy, x, w), 3, "layernorm_backward", "(dx, dw, db)")
    xx, ww, bb = x.copy(), w.copy(), b.copy()
    loss = lambda: float(np.sum(layer_norm(xx, ww, bb) * dy))      # L = Σ y ⊙ dy, so dL/dy = dy
    for name, got, arr in (("dx", dx, xx), ("dw", dw, ww), ("db", db, bb)):
        yield close(f"{name} against central differences in float64 (relative error)", got,
                    G.numerical_gradient(loss, arr), G.TOLERANCE)
    ref_dx, _ = L.layernorm_backward(dy, L.layernorm_forward(x, w, b)[1])
    yield close("dx equals tinylm.core.layers.layernorm_backward (relative error)", dx, ref_dx, 1e-10)


# ----------------------------------------------------------------------------- 3 attention


def causal_mask(T):
    return np.triu(np.full((T, T), -np.inf), k=1)


def check_attention(call, rng, opts):
    B, H, T, D = 2, 3, 6, 4
    qkv = rng.standard_normal((B, T, 3 * H * D))
    q, k, v = (np.ascontiguousarray(L.split_heads(a, H)) for a in np.split(qkv, 3, axis=-1))   # each (B,H,T,D)
    want_w = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(D) + causal_mask(T))
    att = call("attention_weights", q, k)
    yield close("attention_weights = softmax(Q Kᵀ/√D + mask) (relative error)", att, want_w, 1e-12)
    a, why = as_array(att, (B, H, T, T))
    future = np.triu(np.ones((T, T), bool), k=1)
    yield small("no weight on a later token (max |weight| above the diagonal)",
                None if a is None else float(np.max(np.abs(a[..., future]))), 0.0, why)
    y = call("causal_attention", q, k, v)
    core_y = L.split_heads(L.attention_forward(qkv, H)[0], H)
    yield close("causal_attention equals tinylm.core.layers.attention_forward (relative error)", y, core_y, 1e-10)
    k2, v2 = k.copy(), v.copy()
    k2[..., -1, :] += 10.0
    v2[..., -1, :] += 10.0
    y_a, why_a = as_array(y, (B, H, T, D))
    y_b, why_b = as_array(call("causal_attention", q, k2, v2), (B, H, T, D))
    yield small("changing the last token's key and value leaves earlier outputs alone (max change)",
                None if y_a is None or y_b is None else max_abs(y_a[..., :-1, :], y_b[..., :-1, :]), 1e-12,
                why_a or why_b)
    yield small("the first token sees only itself: y[..., 0, :] = v[..., 0, :] (max error)",
                None if y_a is None else max_abs(y_a[..., 0, :], v[..., 0, :]), 1e-12, why_a)


# ----------------------------------------------------------------------------- 4 random subspaces


def check_subspaces(call, rng, opts):
    triples = ((1, 1, 2), (3, 4, 12), (8, 8, 32), (5, 2, 7), (16, 16, 64))
    got = [call("expected_overlap", k, m, d) for k, m, d in triples]
    yield close("expected_overlap(k, m, d) = the closed form, on 5 (k, m, d) (relative error)", got,
                [k * m / d for k, m, d in triples], 1e-12)
    d, k, m = 12, 3, 4
    A, B = rng.standard_normal((d, k)), rng.standard_normal((d, m))      # not orthonormal: overlap must handle it
    cos = np.cos(principal_angles(A, B))
    yield close("overlap(A, B) = Σ cos²θ of linalg.principal_angles (relative error)", [call("overlap", A, B)],
                [np.sum(cos ** 2)], 1e-10)
    Q, why = as_array(call("random_subspace", d, k, np.random.default_rng(opts.seed)), (d, k))
    yield small("random_subspace(d, k, rng) has orthonormal columns (max |QᵀQ − I|)",
                None if Q is None else max_abs(Q.T @ Q, np.eye(k)), 1e-12, why)
    n_draws = 2000
    expected = float(call("expected_overlap", k, m, d))
    ones = np.linalg.qr(np.column_stack([np.ones(d), rng.standard_normal((d, m - 1))]))[0]
    for label, fixed in ((f"the first {m} axes", np.eye(d)[:, :m]), ("a subspace holding (1, …, 1)", ones)):
        draw = np.random.default_rng(opts.seed + 1)
        samples = np.array([float(call("overlap", call("random_subspace", d, k, draw), fixed)) for _ in range(n_draws)])
        se = samples.std() / math.sqrt(n_draws)
        yield small(f"mean overlap of {n_draws} random {k}-dim subspaces of R^{d} with {label} vs expected_overlap "
                    f"(|difference|; tolerance 4 standard errors)", abs(samples.mean() - expected), 4 * se)
    config = GPT.GPTConfig(block_size=8, vocab_size=5, n_layer=1, n_head=4, n_embd=32)
    baseline = head_subspace_overlaps(GPT.init_params(config, dtype=np.float64), config)["random_baseline"]
    D, C = config.n_embd // config.n_head, config.n_embd
    yield close("expected_overlap(D, D, C) / D is the baseline analyze.py draws for head subspaces (relative error)",
                [float(call("expected_overlap", D, D, C)) / D], [baseline], 1e-12)


# ----------------------------------------------------------------------------- 5 truncated SVD


def check_svd(call, rng, opts):
    m, n = 48, 16                                  # the shape of a c_fc weight (4C, C) at C = 16
    W = rng.standard_normal((m, n)) * np.geomspace(1.0, 0.05, n)
    s = np.linalg.svd(W, compute_uv=False)
    norm = np.linalg.norm(W)
    products = []
    for r in (1, 4, 15, 16):
        A, B = unpack(call("truncated_svd", W, r), 2, "truncated_svd", "(A, B) with W ≈ A @ B")
        a, why = as_array(A, (m, r))
        b, why_b = as_array(B, (r, n))
        why = why and f"A: {why}" or why_b and f"B: {why_b}"
        err = None if why else np.linalg.norm(W - a @ b)
        yield small(f"rank {r:2d}: ‖W − A B‖_F = √(Σ discarded σ²) (|difference| / ‖W‖_F)",
                    None if why else abs(err - math.sqrt(np.sum(s[r:] ** 2))) / norm, 1e-10, why)
        products.append((r, None if why else a @ b))
    worst = max((math.inf if p is None else G.relative_error(p, truncate_rank(W, r)["W_k"])) for r, p in products)
    yield small("A B equals analysis.linalg.truncate_rank's W_k at every rank (relative error)", worst, 1e-10)
    ey = [call("eckart_young_error", s, r) for r in range(n + 1)]
    yield close("eckart_young_error(s, r) for r = 0 … 16 (relative error)", ey,
                [math.sqrt(np.sum(s[r:] ** 2)) for r in range(n + 1)], 1e-12)
    if opts.ckpt:
        compressed_checkpoint(call, opts)


def compressed_checkpoint(call, opts):
    """With --ckpt: every block matrix of a trained model replaced by the learner's truncated_svd at a few
    fractions of its rank: the validation loss and a sample (same seed at every rank). Information, not checks."""
    config, params, tok, x, y = checkpoint_model(opts.ckpt, opts.seed)
    print(f"\n{opts.ckpt}: every block matrix replaced by your truncated_svd's A @ B")
    prompt = "ROMEO:"
    for frac in (1.0, 0.5, 0.25, 0.125):
        P = dict(params)
        for name in layer_names(config):
            W = params[name + ".weight"]
            r = max(1, int(round(frac * min(W.shape))))
            A, B = unpack(call("truncated_svd", W, r), 2, "truncated_svd", "(A, B)")
            P[name + ".weight"] = np.asarray(A, np.float64) @ np.asarray(B, np.float64)
        loss = M.forward(P, config, x, y, for_backward=False)[1]
        draw = np.random.default_rng(opts.seed)
        ids = D.generate(P, config, tok.encode(prompt), 80, lambda z: sample_next(z, temperature=0.8, rng=draw))
        sample = (prompt + tok.decode(list(ids))).replace("\n", " / ")
        print(f"  rank × {frac:<5}: val loss {loss:.4f}  {sample}")


# ----------------------------------------------------------------------------- 6 linear systems


def check_linear_systems(call, rng, opts):
    n = 9
    F = rng.standard_normal((n + 3, n))
    G = F.T @ F + 0.1 * np.eye(n)                     # symmetric positive definite
    Lg = call("cholesky", G)
    a, why = as_array(Lg, (n, n))
    yield small("cholesky(G) is lower triangular (max |entry above the diagonal|)",
                None if a is None else float(np.max(np.abs(np.triu(a, 1)))), 0.0, why)
    yield small("cholesky(G): L Lᵀ = G (max |L Lᵀ − G| / max |G|)",
                None if a is None else max_abs(a @ a.T, G) / np.max(np.abs(G)), 1e-12, why)
    yield close("cholesky(G) equals numpy.linalg.cholesky (relative error)", Lg, np.linalg.cholesky(G), 1e-10)
    Y = rng.standard_normal((n, 3))
    Lo = np.linalg.cholesky(G)
    for lower, T in ((True, Lo), (False, Lo.T)):
        kind = "lower" if lower else "upper"
        yield close(f"solve_triangular, {kind}: T Z = Y, equal to compress.solve_triangular (relative error)",
                    call("solve_triangular", T, Y, lower), solve_triangular(T, Y, lower), 1e-12)
    X = rng.standard_normal((40, n)) @ np.diag(np.geomspace(1.0, 0.01, n))      # columns of very different scale
    Yp = X @ rng.standard_normal((n, 2)) + 0.1 * rng.standard_normal((40, 2))
    lam = 1e-3
    W = call("ridge_probe", X, Yp, lam)
    yield close("ridge_probe equals analysis.linalg.ridge_least_squares (relative error)", W,
                ridge_least_squares(X, Yp, lam)["coef"], 1e-10)
    w, why = as_array(W, (n, 2))
    yield small("the normal equations hold: Xᵀ(Y − X W) = λ W (max |difference| / max |XᵀY|)",
                None if w is None else max_abs(X.T @ (Yp - X @ w), lam * w) / np.max(np.abs(X.T @ Yp)), 1e-12, why)


# ----------------------------------------------------------------------------- 7 polar factor


def check_polar(call, rng, opts):
    cases = []
    for m, n in ((8, 8), (24, 8)):                      # square and tall, condition number 10
        U, V = random_orthonormal(rng, m, n), random_orthonormal(rng, n, n)
        Mx = (U * np.geomspace(10.0, 1.0, n)) @ V.T
        cases.append(Mx)
    tols = {"polar_svd": (1e-10, 1e-10), "polar_eigh": (1e-10, 1e-8), "polar_newton_schulz": (1e-6, 1e-6)}
    got = {name: [] for name in tols}
    for name, (tol_orth, tol_ref) in tols.items():
        orth, ref, why = 0.0, 0.0, None
        for Mx in cases:
            Q, why = as_array(call(name, Mx), Mx.shape)
            if why:
                break
            got[name].append(Q)
            orth = max(orth, max_abs(Q.T @ Q, np.eye(Mx.shape[1])))
            u, _, vt = np.linalg.svd(Mx, full_matrices=False)
            ref = max(ref, max_abs(Q, u @ vt))
        yield small(f"{name}: QᵀQ = I, square and tall M (max |QᵀQ − I|)", None if why else orth, tol_orth, why)
        yield small(f"{name}: Q equals U Vᵀ from numpy.linalg.svd (max |difference|)", None if why else ref, tol_ref, why)
    a, b = got["polar_svd"], got["polar_eigh"]
    agree = max(max_abs(x, y) for x, y in zip(a, b)) if len(a) == len(b) == len(cases) else None
    yield small("the exact ones agree: polar_svd(M) = polar_eigh(M) (max |difference|)", agree, 1e-8)


# ----------------------------------------------------------------------------- 8 head ablation


def forward_without_head(params, config, idx, targets, layer, head):
    """core.gpt2.forward's loss with head `head` of block `layer` contributing nothing: its output
    softmax(q kᵀ/√D + mask) v is set to 0 before the heads are joined and projected by c_proj."""
    P = {k: np.asarray(v, np.float64) for k, v in params.items()}
    get = P.get
    B, T = idx.shape
    C, H = config.n_embd, config.n_head
    D = C // H
    x = P["transformer.wte.weight"][idx] + P["transformer.wpe.weight"][:T]
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        h = layer_norm(x, P[p + "ln_1.weight"], get(p + "ln_1.bias"))
        q, k, v = np.split(linear(h, P[p + "attn.c_attn.weight"], get(p + "attn.c_attn.bias")), 3, axis=-1)
        q, k, v = (a.reshape(B, T, H, D).transpose(0, 2, 1, 3) for a in (q, k, v))
        y = softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(D) + causal_mask(T)) @ v      # (B,H,T,D)
        if i == layer:
            y[:, head] = 0.0                                                             # the ablation
        x = x + linear(y.transpose(0, 2, 1, 3).reshape(B, T, C), P[p + "attn.c_proj.weight"],
                         get(p + "attn.c_proj.bias"))
        h = layer_norm(x, P[p + "ln_2.weight"], get(p + "ln_2.bias"))
        x = x + linear(gelu(linear(h, P[p + "mlp.c_fc.weight"], get(p + "mlp.c_fc.bias"))),
                         P[p + "mlp.c_proj.weight"], get(p + "mlp.c_proj.bias"))
    x = layer_norm(x, P["transformer.ln_f.weight"], get("transformer.ln_f.bias"))
    logits = x @ P["transformer.wte.weight"].T
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, targets[..., None], axis=-1).mean())


def checkpoint_model(path, seed, n_seq=8):
    """(config, float64 params, tokenizer, x, y) for a checkpoint, x/y windows of its validation text."""
    ckpt = load_checkpoint(path, with_optimizer=False)
    config, tok = ckpt["config"], ckpt["tokenizer"]
    params = dense_params({k: np.asarray(v, np.float64) for k, v in ckpt["params"].items()})   # a compressed model too
    ids = validation_ids(tok, resolve_data_path(ckpt["meta"]))
    x, y = fixed_windows(ids, config.block_size, n_seq, seed=seed)
    return config, params, tok, x, y


def small_random_model(seed):
    """A 2-layer, 4-head model, GPT-2's init moved by noise so that every head matters, and random tokens."""
    config = GPT.GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=4, n_embd=32, bias=True)
    rng = np.random.default_rng(seed)
    params = GPT.init_params(config, seed=seed, dtype=np.float64)
    for k in params:
        params[k] = params[k] + 0.2 * rng.standard_normal(params[k].shape)
    x = rng.integers(0, config.vocab_size, size=(4, config.block_size))
    y = rng.integers(0, config.vocab_size, size=(4, config.block_size))
    return config, params, x, y


def change(params, before):
    """The largest change of any entry of params since `before` (inf for a key or a shape that changed)."""
    if set(params) != set(before):
        return math.inf
    return max(max_abs(params[k], v) if np.shape(params[k]) == v.shape else math.inf for k, v in before.items())


def check_ablation(call, rng, opts):
    if opts.ckpt:
        config, params, _, x, y = checkpoint_model(opts.ckpt, opts.seed)
    else:
        config, params, x, y = small_random_model(opts.seed)
    clean = M.forward(params, config, x, y, for_backward=False)[1]
    Lr, H = config.n_layer, config.n_head
    want = np.array([[forward_without_head(params, config, x, y, l, h) - clean for h in range(H)] for l in range(Lr)])
    worst, unchanged, why = 0.0, 0.0, None
    for l in range(Lr):
        for h in range(H):
            before = {k: v.copy() for k, v in params.items()}
            P = call("ablate_head", params, config, l, h)   # the dict itself: changing it in place shows below
            unchanged = max(unchanged, change(params, before))
            params.clear()
            params.update({k: v.copy() for k, v in before.items()})          # undo any change for the next head
            if not isinstance(P, dict) or set(P) != set(params) or any(np.shape(P[k]) != params[k].shape for k in P):
                why = "ablate_head must return a dict with the keys and shapes of params"
                break
            got = M.forward({k: np.asarray(v, np.float64) for k, v in P.items()}, config, x, y, for_backward=False)[1]
            worst = max(worst, abs(got - (want[l, h] + clean)))
        if why:
            break
    yield small(f"ablate_head: the loss equals a forward with that head's output zeroed, all {Lr * H} heads "
                "(max |difference|)", None if why else worst, 1e-10, why)
    yield small("ablate_head leaves the params it was given unchanged (max change)", unchanged, 0.0,
                "a key of params was added, removed or reshaped" if unchanged == math.inf else None)
    table, why = as_array(call("loss_changes", params, config, x, y), want.shape)
    yield small(f"loss_changes: the ({Lr}, {H}) table of loss(ablated) − loss (max |difference|)",
                None if why else max_abs(table, want), 1e-10, why)
    where = "on " + opts.ckpt if opts.ckpt else "on a small random model (--ckpt out/ckpt.npz for your own)"
    print(f"\nloss {clean:.4f} {where}; the change when each head is zeroed (reference):")
    print("         " + "".join(f"{'H' + str(h):>9}" for h in range(H)))
    for l in range(Lr):
        print(f"  L{l}     " + "".join(f"{want[l, h]:+9.4f}" for h in range(H)))
    l, h = np.unravel_index(np.argmax(want), want.shape)
    print(f"the head that matters most: L{l}H{h} (+{want[l, h]:.4f})")


# ----------------------------------------------------------------------------- the list


EXERCISES = {
    1: {"title": "softmax, stable, and its backward", "functions": ("softmax", "softmax_backward"),
        "check": check_softmax},
    2: {"title": "layer norm's backward, through the gradient check", "functions": ("layernorm_forward",
        "layernorm_backward"), "check": check_layernorm},
    3: {"title": "causal attention: softmax(QKᵀ/√D + mask) V", "functions": ("attention_weights", "causal_attention"),
        "check": check_attention},
    4: {"title": "the random-subspace overlap baseline, derived", "functions": ("expected_overlap", "overlap",
        "random_subspace"), "check": check_subspaces},
    5: {"title": "compress a matrix by truncated SVD (Eckart–Young)", "functions": ("truncated_svd",
        "eckart_young_error"), "check": check_svd},
    6: {"title": "a ridge probe by Cholesky and triangular solves", "functions": ("cholesky", "solve_triangular",
        "ridge_probe"), "check": check_linear_systems},
    7: {"title": "orthogonalize a matrix three ways (the polar factor)", "functions": ("polar_svd", "polar_eigh",
        "polar_newton_schulz"), "check": check_polar},
    8: {"title": "ablate an attention head and measure the loss", "functions": ("ablate_head", "loss_changes"),
        "check": check_ablation},
}


def exercise(n):
    if n not in EXERCISES:
        raise ExerciseError(f"there is no exercise {n}; they are 1 to {len(EXERCISES)} "
                            "(python -m tinylm.exercises list)")
    return EXERCISES[n]


# ----------------------------------------------------------------------------- the command line


DEFAULT_TIMEOUT = 60.0


def run_check(n, path, opts):
    """Grade one file. Returns 0 (every check passes) or 1; raises ExerciseError (exit 2) when it cannot grade.

    The learner's code runs in a child process (run_child) with a time limit of opts.timeout seconds; only
    the verdicts it sends over its own pipe count, and success needs one for every check the child ran
    and its word that it finished."""
    ex = exercise(n)
    check_learner_file(n, path)
    results = []
    for ok, what, err, tol, note in child_verdicts(n, path, opts):
        results.append(ok)
        extra = f"  ({note})" if note else ""
        print(f"{'PASS' if ok else 'FAIL'}  {what}: error {err:.2e}, tolerance {tol:.2g}{extra}")
    failed = results.count(False)
    print(f"\nexercise {n}: " + (f"all {len(results)} checks pass" if not failed
                                 else f"{failed} of {len(results)} checks FAIL"))
    return 0 if failed == 0 else 1


# ----------------------------------------------------------------------------- the child process


def child_verdicts(n, path, opts):
    """Yield (ok, what, error, tolerance, note) as the child process sends them; raise ExerciseError when the
    child cannot be graded (its one line), runs past opts.timeout, or ends without saying it finished.

    The child (a fresh Python importing this same tinylm) writes JSON lines to a pipe of its own: text to
    show ("out"), a verdict, an error line, or "done" with its count of verdicts. Its standard output and
    error are a second pipe, shown as they come; nothing written there counts as a verdict.
    """
    timeout = getattr(opts, "timeout", DEFAULT_TIMEOUT)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (f"import sys; sys.path[0] = {root!r}; from tinylm.exercises.grader import child_main; "
            "child_main(sys.argv[1:])")
    msg_r, msg_w = os.pipe()
    try:
        args = [str(msg_w), str(n), path, str(opts.seed), opts.ckpt or ""]
        child = subprocess.Popen([sys.executable, "-c", code, *args], pass_fds=(msg_w,), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    except BaseException:
        os.close(msg_r)
        raise
    finally:
        os.close(msg_w)
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    messages = os.fdopen(msg_r, "rb")
    sel.register(messages, selectors.EVENT_READ, "messages")
    sel.register(child.stdout, selectors.EVENT_READ, "raw")
    pending, count, done, last = b"", 0, None, None
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise ExerciseError(f"exercise {n}: {path} ran for more than {timeout:g} s, "
                                    + (f"in the check after '{one_line(last)}'" if last else "in its first check")
                                    + " (a loop that never ends?); stopped it. Allow longer with --timeout SECONDS")
            for key, _ in sel.select(min(left, 1.0)):
                data = os.read(key.fileobj.fileno(), 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                if key.data == "raw":           # the child's own stdout/stderr: shown, never a verdict
                    sys.stdout.write(data.decode("utf-8", "replace"))
                    sys.stdout.flush()
                    continue
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    kind, value = _message(line)
                    if kind == "out":
                        sys.stdout.write(value)
                    elif kind == "verdict":
                        count += 1
                        last = value[1]
                        yield value
                    elif kind == "error":
                        err = ExerciseError(value["text"])
                        err.exit_code = value["code"]
                        raise err
                    elif kind == "done":
                        done = value
                    else:
                        raise ExerciseError(f"exercise {n}: the grading process sent something that is not a "
                                            "verdict; your code wrote into the grader's pipe?")
        status = child.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise ExerciseError(f"exercise {n}: {path} did not end within {timeout:g} s after its last check; "
                            "stopped it. Allow longer with --timeout SECONDS") from None
    finally:
        sel.close()
        messages.close()
        _stop(child)
    if done is None or done != count:
        how = f"exit status {status}" if status >= 0 else f"signal {_signal_name(-status)}"
        raise ExerciseError(f"exercise {n}: your code ended the grading process ({how}) before every check had a "
                            f"verdict ({count} did"
                            + (f"; the last: '{one_line(last)}'" if last else "")
                            + "); a check without a verdict fails")


def _message(line):
    """(kind, value) of one line from the child, ('bad', None) for anything that is not one of its messages."""
    try:
        m = json.loads(line)
    except (ValueError, RecursionError):
        return "bad", None
    if not isinstance(m, dict) or len(m) != 1:
        return "bad", None
    kind, value = next(iter(m.items()))
    if kind == "out" and isinstance(value, str):
        return kind, value
    if kind == "done" and isinstance(value, int) and not isinstance(value, bool):
        return kind, value
    if kind == "error" and isinstance(value, dict) and isinstance(value.get("text"), str) \
            and value.get("code") in (1, 2):
        return kind, value
    if kind == "verdict" and isinstance(value, list) and len(value) == 5:
        ok, what, err, tol, note = value
        number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
        if isinstance(ok, bool) and isinstance(what, str) and number(err) and number(tol) \
                and (note is None or isinstance(note, str)):
            return kind, (ok, what, float(err), float(tol), note)
    return "bad", None


def _stop(child):
    """End the child and whatever it started (its own session), if it still runs."""
    if child.poll() is None:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, AttributeError):
            child.kill()
        child.wait()
    if child.stdout is not None:
        child.stdout.close()


def _signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


class _Forward(io.TextIOBase):
    """sys.stdout and sys.stderr of the child: what the grader and the learner's code print goes to the parent
    as text to show, in order with the verdicts."""

    def __init__(self, send):
        self.send = send

    def writable(self):
        return True

    def write(self, text):
        if text:
            self.send(out=str(text))
        return len(text)


def child_main(argv):
    """The child process: load the learner's file, run the exercise's checks, send each verdict, then 'done'."""
    fd, n, path, seed, ckpt = argv
    channel = os.fdopen(int(fd), "w", encoding="utf-8")

    def send(**message):
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    sys.stdout = sys.stderr = _Forward(send)
    status = 0
    try:
        n = int(n)
        ex = exercise(n)
        opts = argparse.Namespace(seed=int(seed), ckpt=ckpt or None)
        module = load_learner(n, path)
        print(f"exercise {n}: {ex['title']} ({path})")
        call = learner_caller(module, path)
        count = 0
        for ok, what, err, tol, note in ex["check"](call, np.random.default_rng(opts.seed), opts):
            send(verdict=[bool(ok), str(what), float(err), float(tol), None if note is None else str(note)])
            count += 1
        send(done=count)
    except TinyLMError as e:
        send(error={"text": str(e), "code": getattr(e, "exit_code", 1)})
    except BaseException as e:          # the grader's own fault, or the learner's escaping the caller
        send(error={"text": f"the grader failed: {type(e).__name__}: {one_line(e)}", "code": 2})
        status = 1
    finally:
        os._exit(status)                # no atexit handler of the learner's runs after the last verdict


def list_exercises():
    print("The exercises, easy to hard (tinylm/exercises/README.md says what each asks):")
    for n, ex in EXERCISES.items():
        print(f"  {n}  {ex['title']:<54} write: {', '.join(ex['functions'])}")
    print("\nstart one:  python -m tinylm.exercises start N      (copies the starter to exercises/exN.py)")
    print("grade it:   python -m tinylm.exercises check N      (or --file PATH)")


def start(n, path):
    exercise(n)
    src = os.path.join(STARTERS, f"ex{n}.py")
    if not os.path.isfile(src):
        raise ExerciseError(f"the starter {src} is missing (it ships in the repository's tinylm/exercises/starters/)")
    if os.path.exists(path):
        raise ExerciseError(f"{path} exists already, not overwritten; grade it with: "
                            f"python -m tinylm.exercises check {n}" + ("" if path == default_file(n) else f" --file {path}"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    shutil.copyfile(src, path)
    print(f"wrote {path}: fill in the functions, then run: python -m tinylm.exercises check {n}"
          + ("" if path == default_file(n) else f" --file {path}"))
    return 0


def exercises_parser():
    ap = OneLineParser(prog="python -m tinylm.exercises",
                       description="Exercises from easy to hard (tinylm/exercises/README.md), each graded against tinylm's "
                       "own functions or NumPy's linear algebra. Your code lives in your own file, "
                       "by default exercises/exN.py relative to the current directory.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{list,start,check}")
    sub.add_parser("list", help="print the exercises", description="Print the exercises, easy to hard.")
    file_help = "your file (default: exercises/exN.py, relative to the current directory)"
    st = sub.add_parser("start", help="copy exercise N's starter to your file",
                        description="Copy the starter of exercise N (the signatures, with NotImplementedError "
                        "bodies) to exercises/exN.py; an existing file is never overwritten.")
    st.add_argument("n", type=int, metavar="N", help="the exercise's number (see: list)")
    st.add_argument("--file", metavar="PATH", help=file_help)
    ck = sub.add_parser("check", help="grade your file for exercise N",
                        description="Load your file by its path in a child process, call its functions on random "
                        "float64 inputs (fixed seed), compare with the reference and print PASS/FAIL per check with "
                        "the error and the tolerance. Exit 0 when every check passes, 1 when one fails, 2 when the "
                        "file cannot be graded (missing file or function, your code raised, ran past --timeout or "
                        "ended the process, no such exercise).")
    ck.add_argument("n", type=int, metavar="N", help="the exercise's number (see: list)")
    ck.add_argument("--file", metavar="PATH", help=file_help)
    ck.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    ck.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                    help=f"stop your code after this many seconds and fail (default: {DEFAULT_TIMEOUT:g})")
    ck.add_argument("--ckpt", metavar="CKPT", default=None,
                    help="exercises 5 and 8: also run on this trained checkpoint (e.g. out/ckpt.npz): "
                    "5 compresses its block matrices and samples, 8 ablates its heads on its validation text")
    return ap


def _main(argv):
    args = exercises_parser().parse_args(argv)
    if args.command == "list":
        list_exercises()
        return 0
    path = args.file or default_file(args.n)
    if args.command == "start":
        return start(args.n, path)
    if args.command == "check" and not args.timeout > 0:
        raise ExerciseError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    if args.ckpt and args.n not in (5, 8):
        exercise(args.n)
        raise ExerciseError(f"--ckpt is for exercises 5 and 8; exercise {args.n} runs on its own random inputs")
    return run_check(args.n, path, args)


def main(argv=None):
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
