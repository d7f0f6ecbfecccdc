"""A smaller, faster model whose block linear layers are low rank (python -m tinylm.compress is its command line).

GPT-2's four block matrices (c_attn, attn.c_proj, c_fc, mlp.c_proj) or a Llama's seven (q, k, v, o_proj; gate,
up, down_proj), each with its own inputs (layer_inputs) and so its own whitening.

Each block linear layer W (out, in) becomes two thin factors A (out, r), B (r, in), W ≈ A B, stored and run
as the factorized layer of fast/linears.py: y = (x Bᵀ) Aᵀ + b.

--method svd: the truncated SVD, A = U_r Σ_r, B = V_rᵀ: the best rank-r approximation of the weight
    (Eckart–Young), blind to the data the layer sees.
--method whitened (default): the best rank-r approximation of the layer's *output* on real inputs, in the
    manner of SVD-LLM. With X (N, in) the layer's inputs on calibration text, the output error is
        ‖X Wᵀ − X W'ᵀ‖²_F = tr((W − W') XᵀX (W − W')ᵀ) = ‖(W − W') S‖²_F,   XᵀX = S Sᵀ (Cholesky, S lower)
    so the best W' of rank r is the truncated SVD of W S mapped back by S⁻¹: with W S = U Σ Vᵀ,
        A = U_r Σ_r,   B = V_rᵀ S⁻¹,   computed as the triangular solve Sᵀ Bᵀ = V_r (never S⁻¹ itself).
    A small ridge λ I is added to XᵀX so that S exists and is well conditioned when XᵀX is singular.
--refit (the default with --method whitened): then refit each factor by least squares, layer after layer
    through the network: the inputs X' come from the model compressed so far and the targets X Wᵀ from the
    dense model, so each layer also corrects the error of the layers before it. With G' = X'ᵀX' and C = X'ᵀX (in × in), the closed forms are
        A: min_A ‖X Wᵀ − X' Bᵀ Aᵀ‖  ⇒  (B G' Bᵀ) Aᵀ = B C Wᵀ
        B: min_B ‖X Wᵀ − X' Bᵀ Aᵀ‖  ⇒  G' Bᵀ (AᵀA) = C Wᵀ A
    each solved through Cholesky factors and triangular solves.

The work is in plain functions (ranks_for, calibration_windows, collect_grams, svd_factors, whitened_factors,
truncate, refit, compress_model); cli/compress.py is the command line.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from tinylm.core import layers as CL
from tinylm.core.arch import arch_of, model_of
from tinylm.fast import layers as L
from tinylm.errors import TinyLMError
from tinylm.lowrank.adapters import LLAMA_BLOCK_MATRICES
from tinylm.lowrank.factorized import dense_params, dense_weight, factor_params, ranks_of
from tinylm.fast.model import linear_by_name
from tinylm.core.gpt2 import block_prefix
from tinylm.core.llama import block_prefix as llama_block_prefix
from tinylm.fast.parallel import blas_threads
from tinylm.text.data import DEFAULT_DATA, encode_file, train_val_split

DEFAULT_CALIB_TOKENS = 16384
RIDGE = 1e-6                       # λ = RIDGE × the mean diagonal of XᵀX: far below its signal, enough for Cholesky
LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
METHODS = ("whitened", "svd")


class CompressError(TinyLMError):
    """A rank, a calibration text or an input model that compression cannot use."""


def layer_names(config):
    """The block linear layers, in the order the forward runs them: transformer.h.{i}.attn.c_attn, …; a Llama's
    model.layers.{i}.self_attn.q_proj, k_proj, v_proj, o_proj, mlp.gate_proj, up_proj, down_proj."""
    if arch_of(config) == "llama":
        return [llama_block_prefix(i) + n for i in range(config.n_layer) for n in LLAMA_BLOCK_MATRICES]
    return [block_prefix(i) + n for i in range(config.n_layer) for n in LAYERS]


def param_shapes(config):
    """The config's model's parameter names and shapes (GPT-2's or the Llama's)."""
    return model_of(config).param_shapes(config)


# ----------------------------------------------------------------------------- ranks


def parse_rank(text):
    """'0.375' -> ('fraction', 0.375) of each matrix's full rank; '32' -> ('rank', 32). Raises CompressError."""
    s = str(text).strip()
    try:
        if s.lstrip("+-").isdigit():
            value = int(s)
            kind = "rank"
        else:
            value = float(s)
            kind = "fraction"
    except ValueError:
        raise CompressError(f"--rank must be a fraction in (0, 1] such as 0.375 or an integer rank such as 32, got {text!r}") from None
    if kind == "fraction" and not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise CompressError(f"--rank as a fraction of full rank must be in (0, 1], got {text!r}")
    if kind == "rank" and value < 1:
        raise CompressError(f"--rank as an integer rank must be at least 1 (or give a fraction in (0, 1] such as 0.25), "
                            f"got {text!r}")
    return kind, value


def parse_params_fraction(text):
    """'0.5' -> 0.5, the fraction of block linear parameters to keep, in (0, 1]. Raises CompressError."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise CompressError(f"--params must be a fraction in (0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise CompressError(f"--params must be a fraction in (0, 1], got {text!r}")
    return value


def ranks_for(config, rank=None, params_fraction=None):
    """{layer: r} for every block linear layer.   -> dict

    rank ('fraction', f): r = ⌈f · min(out, in)⌉, as the analysis's low-rank curve; ('rank', k): r = k for
    every layer (at most min(out, in)). params_fraction p: the largest r with r (out + in) ≤ p · out · in,
    so each matrix, and so the blocks' linear weights, keep at most that fraction of their parameters.
    """
    if (rank is None) == (params_fraction is None):
        raise CompressError("give one of --rank or --params")
    shapes = param_shapes(config)
    ranks = {}
    for name in layer_names(config):
        out, inp = shapes[name + ".weight"]
        full = min(out, inp)
        if params_fraction is not None:
            r = math.floor(params_fraction * out * inp / (out + inp))
        elif rank[0] == "fraction":
            r = math.ceil(rank[1] * full - 1e-9)
        else:
            r = rank[1]
            if r > full:
                raise CompressError(f"--rank {r} is above the full rank {full} of {name} ({out}×{inp})")
        ranks[name] = max(1, min(full, r))
    return ranks


def kept_fraction(config, ranks):
    """(kept, dense): block linear parameters of the factorized form (a layer not smaller factorized counts
    as dense) and of the dense model."""
    shapes = param_shapes(config)
    kept = dense = 0
    for name, r in ranks.items():
        out, inp = shapes[name + ".weight"]
        kept += min(r * (out + inp), out * inp)
        dense += out * inp
    return kept, dense


def stays_dense(shape, r):
    """A rank-r layer of this shape is kept as the dense product A B when two factors would not be smaller."""
    out, inp = shape
    return r * (out + inp) >= out * inp


# ----------------------------------------------------------------------------- calibration


def calibration_ids(tokenizer, meta, path=None, errors="strict"):
    """Token ids of the calibration text: FILE (all of it), or else the train split of the run's training text.   -> (ids, path)"""
    if path is None:
        saved = (meta.get("train_args") or {}).get("data")
        path = saved if isinstance(saved, str) and os.path.isfile(saved) else DEFAULT_DATA
        errors = (meta.get("train_args") or {}).get("encoding_errors", "strict")
        split = True
    else:
        split = False
    try:
        ids = encode_file(path, errors, tokenizer)
    except TinyLMError as e:
        raise CompressError(f"calibration text {path}: {e}") from None
    if split:
        ids = train_val_split(ids)[0]
    return np.asarray(ids), path


def calibration_windows(ids, block_size, n_tokens):
    """Windows (n, block_size) of token ids, evenly spaced over ids, n = ⌈n_tokens / block_size⌉ (or as many as fit)."""
    if len(ids) < block_size:
        raise CompressError(f"calibration text is shorter than one block: {len(ids)} tokens, need at least "
                            f"{block_size}; give a longer --calib file")
    n = max(1, min(math.ceil(n_tokens / block_size), len(ids) // block_size))
    starts = np.linspace(0, len(ids) - block_size, n).round().astype(np.intp)
    return np.asarray(ids)[starts[:, None] + np.arange(block_size)].astype(np.intp)


def layer_inputs(params, config, idx):
    """Yield (name, x) for each block linear layer in the order the forward runs them, x (n·T, in) its input on the
    windows idx (n, T); the layer runs when the next item is asked for, with the parameters params holds then
    (so a consumer may replace a layer's parameters, and the rest of the pass sees the replaced layer).

    Only the residual stream and the current layer's input and output are held: memory is one layer's activations.
    """
    if arch_of(config) == "llama":
        yield from llama_layer_inputs(params, config, idx)
        return
    P, get = params, params.get
    n, T = idx.shape
    x, _ = L.embedding_forward(idx, P["transformer.wte.weight"], P["transformer.wpe.weight"])
    for i in range(config.n_layer):
        pre = block_prefix(i)
        h, _ = L.layernorm_forward(x, P[pre + "ln_1.weight"], get(pre + "ln_1.bias"))
        h = h.reshape(n * T, -1)
        yield pre + "attn.c_attn", h
        qkv = linear_by_name(P, pre + "attn.c_attn", h)[0].reshape(n, T, -1)
        a = L.attention_forward(qkv, config.n_head)[0].reshape(n * T, -1)
        del qkv, h
        yield pre + "attn.c_proj", a
        x = x + linear_by_name(P, pre + "attn.c_proj", a)[0].reshape(n, T, -1)
        del a
        h, _ = L.layernorm_forward(x, P[pre + "ln_2.weight"], get(pre + "ln_2.bias"))
        h = h.reshape(n * T, -1)
        yield pre + "mlp.c_fc", h
        g = L.gelu_values_forward(linear_by_name(P, pre + "mlp.c_fc", h)[0])
        del h
        yield pre + "mlp.c_proj", g
        x = x + linear_by_name(P, pre + "mlp.c_proj", g)[0].reshape(n, T, -1)
        del g


def llama_layer_inputs(params, config, idx):
    """layer_inputs for a Llama (core/llama.py's block_forward, a layer at a time): q_proj, k_proj and v_proj are
    handed the same normed x, gate_proj and up_proj the same; all three (two) run after the last is handed out."""
    P = params
    n, T = idx.shape
    H, Hkv, theta = config.n_head, config.n_kv_head, config.rope_theta
    positions = np.arange(T)
    x = P["model.embed_tokens.weight"][idx]

    def run(name, h):
        return linear_by_name(P, name, h)[0].reshape(n, T, -1)

    for i in range(config.n_layer):
        pre = llama_block_prefix(i)
        h = CL.rmsnorm_forward(x, P[pre + "input_layernorm.weight"], config.norm_eps)[0].reshape(n * T, -1)
        for name in LLAMA_BLOCK_MATRICES[:3]:
            yield pre + name, h
        q, k, v = (run(pre + name, h) for name in LLAMA_BLOCK_MATRICES[:3])
        q = CL.rope_forward(CL.split_heads(q, H), positions, theta)[0]
        k = CL.rope_forward(CL.split_heads(k, Hkv), positions, theta)[0]
        a = CL.merge_heads(CL.grouped_attention_forward(q, k, CL.split_heads(v, Hkv))[0]).reshape(n * T, -1)
        del q, k, v, h
        yield pre + "self_attn.o_proj", a
        x = x + run(pre + "self_attn.o_proj", a)
        h = CL.rmsnorm_forward(x, P[pre + "post_attention_layernorm.weight"], config.norm_eps)[0].reshape(n * T, -1)
        yield pre + "mlp.gate_proj", h
        yield pre + "mlp.up_proj", h
        m = CL.swiglu_forward(run(pre + "mlp.gate_proj", h), run(pre + "mlp.up_proj", h))[0].reshape(n * T, -1)
        del h
        yield pre + "mlp.down_proj", m
        x = x + run(pre + "mlp.down_proj", m)
        del m


def gram(x, y=None, rows=4096):
    """xᵀx (or xᵀy) in float64, summed over blocks of rows so that no float64 copy of a whole x is made."""
    G = np.zeros((x.shape[1], (x if y is None else y).shape[1]))
    for r in range(0, x.shape[0], rows):
        xr = x[r:r + rows].astype(np.float64)
        G += xr.T @ (xr if y is None else y[r:r + rows].astype(np.float64))   # xrᵀ xr: NumPy's symmetric product, half the work
    return G


def collect_grams(params, config, idx, progress=False):
    """{layer: XᵀX (in, in), float64} of each block linear layer's inputs over the windows idx, the model unchanged."""
    names = layer_names(config)
    grams, last_x, last_G = {}, None, None
    for name, x in tqdm(layer_inputs(params, config, idx), total=len(names), desc="calibration",
                        disable=not progress, leave=False):
        if x is not last_x:                # a Llama's q, k, v (gate, up) read one x: its XᵀX is made once
            last_x, last_G = x, gram(x)
        grams[name] = last_G
    return grams


# ----------------------------------------------------------------------------- linear systems


def solve_triangular(T, Y, lower):
    """Z with T Z = Y for a triangular T (n, n) and Y (n, k), by substitution, in NumPy.   -> (n, k)

    O(n² k), using the structure: forward substitution (lower) solves row 0 first, back substitution
    (upper) row n−1 first; each row is one dot product with the rows already solved. np.linalg.solve would
    give the same Z, but it ignores the zeros: it LU-factorizes T again (O(n³), with pivoting that T does not
    need). scipy.linalg.solve_triangular does this in compiled code; scipy is not a dependency of tinylm, and
    at n ≤ 4C the n row steps cost milliseconds.
    """
    n = T.shape[0]
    Z = np.empty((n, Y.shape[1]), dtype=np.result_type(T, Y))
    order = range(n) if lower else range(n - 1, -1, -1)
    for i in order:
        done = slice(0, i) if lower else slice(i + 1, n)
        Z[i] = (Y[i] - T[i, done] @ Z[done]) / T[i, i]
    return Z


def cholesky_ridge(G, ridge=RIDGE):
    """(S, λ): S lower triangular with S Sᵀ = G + λ I, λ = ridge × mean diag G, raised ×10 until Cholesky succeeds.

    XᵀX is only positive semi-definite (an input direction the text never uses, or fewer tokens than inputs):
    the ridge makes it definite and bounds S's condition number by about 1/√ridge.
    """
    scale = float(np.mean(np.diag(G)))
    scale = scale if scale > 0 and math.isfinite(scale) else 1.0
    lam = ridge * scale
    for _ in range(12):
        try:
            return np.linalg.cholesky(G + lam * np.eye(G.shape[0])), lam
        except np.linalg.LinAlgError:
            lam *= 10.0
    raise CompressError("the calibration Gram matrix is not positive definite even with a large ridge "
                        "(are the activations finite?)")


def spd_solve(M, R):
    """Z with M Z = R for a symmetric positive (semi-)definite M: Cholesky M + λI = S Sᵀ, then S Y = R, Sᵀ Z = Y."""
    S, _ = cholesky_ridge(M, ridge=1e-10)
    return solve_triangular(S.T, solve_triangular(S, R, lower=True), lower=False)


# ----------------------------------------------------------------------------- factors


def balanced(A, B):
    """(A D, D⁻¹ B) with D diagonal such that column k of A and row k of B have the same norm: the same product.

    Training moves every entry by about the learning rate (AdamW), so factors of very different scales would
    change at very different relative rates: whitened B = Vᵀ S⁻¹ is ~√N times smaller than A (S ~ √N, N the
    calibration tokens), and 25 steps at lr 1e-4 took the unbalanced model's loss from 1.89 to 2.98.
    """
    a, b = np.linalg.norm(A, axis=0), np.linalg.norm(B, axis=1)
    d = np.sqrt(np.where((a > 0) & (b > 0), b / np.where(a > 0, a, 1.0), 1.0))
    return A * d, B / d[:, None]


def svd_factors(W):
    """(A, B, s) for every rank at once: A = U Σ^½ (out, k), B = Σ^½ Vᵀ (k, in), s the singular values of W,
    k = min(out, in). The first r columns of A and rows of B give the truncated SVD of rank r, U_r Σ_r V_rᵀ."""
    U, s, Vt = np.linalg.svd(np.asarray(W, np.float64), full_matrices=False)
    return (*balanced(U * s, Vt), s)


def whitened_factors(W, G, ridge=RIDGE):
    """(A, B, s) for every rank at once, W S = U Σ Vᵀ with S Sᵀ = G + λI: A = U Σ, B = Vᵀ S⁻¹ (a triangular solve),
    then balanced; s the singular values of W S. The first r columns of A and rows of B minimize ‖(W − A B) S‖
    over rank r."""
    S, _ = cholesky_ridge(G, ridge)
    U, s, Vt = np.linalg.svd(np.asarray(W, np.float64) @ S, full_matrices=False)
    B = solve_triangular(S.T, Vt.T, lower=False).T          # Sᵀ Bᵀ = V: B = Vᵀ S⁻¹
    return (*balanced(U * s, B), s)


def truncate(params, factors, ranks):
    """params with each layer of ranks stored as the rank-r factors (the first r of its full factors), in params'
    dtype; a layer whose factors would not be smaller (stays_dense) gets the dense product A B instead."""
    new = dict(params)
    dtype = next(iter(params.values())).dtype
    for name, r in ranks.items():
        A_full, B_full, _ = factors[name]
        A, B = A_full[:, :r].astype(dtype), B_full[:r].astype(dtype)
        if stays_dense((A.shape[0], B.shape[1]), r):
            new[name + ".weight"] = A @ B                  # params is dense here: the product takes W's place
        else:
            new = factor_params(new, name, A, B)
    return new


def refit(dense, compressed, config, idx, progress=False):
    """The factors of `compressed` refit by least squares, layer by layer through the network.   -> (params, report)

    The dense and the compressed model run side by side over the windows idx (layer_inputs, in step): for each
    factorized layer in turn, X' are its inputs in the model compressed so far (the layers before it already
    refit) and X its inputs in the dense model; A then B are set to their closed forms (module docstring), each
    an exact minimizer of ‖X Wᵀ − X' Bᵀ Aᵀ‖_F, so the error never grows. report: {layer: (relative output
    error ‖X Wᵀ − X' Bᵀ Aᵀ‖/‖X Wᵀ‖ before, after)}.
    """
    compressed = dict(compressed)
    report = {}
    names = layer_names(config)
    pairs = zip(layer_inputs(dense, config, idx), layer_inputs(compressed, config, idx))
    for (name, x_d), (_, x_c) in tqdm(pairs, total=len(names), desc="refit", disable=not progress, leave=False):
        if name + ".weight_A" not in compressed:
            continue
        dtype = compressed[name + ".weight_A"].dtype
        W = np.asarray(dense_weight(dense, name), np.float64)
        A = compressed[name + ".weight_A"].astype(np.float64)
        B = compressed[name + ".weight_B"].astype(np.float64)
        Gc, C, Gd = gram(x_c), gram(x_c, x_d), gram(x_d)             # X'ᵀX', X'ᵀX, XᵀX
        target = float(np.sum((W @ Gd) * W))                        # ‖X Wᵀ‖² = tr(W XᵀX Wᵀ)

        def error(A, B):                                            # ‖X Wᵀ − X' Bᵀ Aᵀ‖², from the Gram matrices
            M = A @ B
            return max(target - 2.0 * float(np.sum((M @ C) * W)) + float(np.sum((M @ Gc) * M)), 0.0)
        before = error(A, B)
        A = spd_solve(B @ Gc @ B.T, B @ C @ W.T).T                  # (B G' Bᵀ) Aᵀ = B C Wᵀ
        B = spd_solve(A.T @ A, spd_solve(Gc, C @ W.T @ A).T)        # G' Bᵀ (AᵀA) = C Wᵀ A
        after = error(A, B)
        A, B = balanced(A, B)
        compressed[name + ".weight_A"], compressed[name + ".weight_B"] = A.astype(dtype), B.astype(dtype)
        report[name] = (math.sqrt(before / target), math.sqrt(after / target)) if target > 0 else (0.0, 0.0)
    return compressed, report


# ----------------------------------------------------------------------------- the whole model


def check_not_lower(params, ranks):
    """A model already factorized at rank r₀ cannot be compressed to a rank above r₀ (that rank is gone)."""
    for name, r0 in ranks_of(params).items():
        if ranks.get(name, 0) > r0:
            raise CompressError(f"the checkpoint is already compressed: {name} has rank {r0}, below the "
                                f"rank {ranks[name]} asked for; compress the dense checkpoint instead, or ask for a "
                                f"rank of at most {r0}")


def compress_model(params, config, ranks, method="whitened", calib=None, refit_factors=False, progress=False):
    """params with each layer of ranks replaced by its rank-r factors.   -> (params, info)

    params may already be factorized (then it is compressed from the products A B, to ranks no higher).
    calib: windows (n, T) of token ids, needed by method 'whitened' and by refit_factors.
    info: {"method", "ranks", "kept", "dense", "refit" (per-layer relative errors), "ridge", "seconds"}.
    """
    if method not in METHODS:
        raise CompressError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    check_not_lower(params, ranks)
    # One BLAS thread: these products and SVDs are small, and on this shared 2-core machine a second BLAS thread
    # waiting for a busy core made the default model's compression 3× slower (9.7 s against 3.0 s, back to back).
    with blas_threads(1):
        return _compress_model(params, config, ranks, method, calib, refit_factors, progress)


def _compress_model(params, config, ranks, method, calib, refit_factors, progress):
    t0 = time.perf_counter()
    dense = dense_params(params)
    if (method == "whitened" or refit_factors) and calib is None:
        raise CompressError("the whitened method and the refit need calibration windows")
    grams = collect_grams(dense, config, calib, progress) if method == "whitened" else {}
    factors = {}
    for name in tqdm(ranks, desc=f"{method} factors", disable=not progress, leave=False):
        W = dense[name + ".weight"]
        factors[name] = whitened_factors(W, grams[name]) if method == "whitened" else svd_factors(W)
    new = truncate(dense, factors, ranks)
    report = {}
    if refit_factors:
        new, report = refit(dense, new, config, calib, progress)
    kept, total = kept_fraction(config, ranks)
    return new, {"method": method, "ranks": ranks, "kept": kept, "dense": total, "refit": report,
                 "seconds": time.perf_counter() - t0}




def compress_on_the_fly(params, config, rank):
    """sample.py --rank: params compressed by plain truncated SVD (no calibration), and a line saying how.   -> (params, str)"""
    ranks = ranks_for(config, rank)
    new, info = compress_model(params, config, ranks, "svd")
    return new, (f"compressed on the fly by truncated SVD: rank {', '.join(map(str, sorted(set(ranks.values()))))}, "
                 f"{100 * info['kept'] / info['dense']:.1f}% of the block linear parameters ({info['seconds']:.2f} s)")
