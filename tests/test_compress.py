"""Low-rank compression: the linear algebra (triangular solves, whitening, refit), the command, and every bad input."""
import os

import numpy as np
import pytest

from conftest import ROOT, run_script
from tinylm.lowrank import compress as C
from tinylm.io.checkpoint import load_checkpoint
from tinylm.errors import TinyLMError
from tinylm.lowrank.factorized import dense_params, ranks_of
from tinylm.fast.model import forward
from tinylm.core.gpt2 import GPTConfig, init_params


def run_module(module, *args):
    """python -m MODULE ARGS from the worktree root, as a user would run it."""
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


# ----------------------------------------------------------------------------- linear algebra


@pytest.mark.parametrize("lower", [True, False])
def test_solve_triangular_matches_a_general_solve(lower):
    rng = np.random.default_rng(0)
    T = rng.standard_normal((7, 7)) + 4 * np.eye(7)
    T = np.tril(T) if lower else np.triu(T)
    Y = rng.standard_normal((7, 3))
    Z = C.solve_triangular(T, Y, lower)
    np.testing.assert_allclose(T @ Z, Y, atol=1e-12)
    np.testing.assert_allclose(Z, np.linalg.solve(T, Y), atol=1e-12)


def test_cholesky_ridge_makes_a_singular_gram_definite():
    x = np.random.default_rng(1).standard_normal((3, 5))        # 3 samples of 5 inputs: XᵀX has rank 3
    S, lam = C.cholesky_ridge(x.T @ x)
    assert lam > 0 and np.allclose(np.triu(S, 1), 0)
    np.testing.assert_allclose(S @ S.T, x.T @ x + lam * np.eye(5), atol=1e-10)


def layer_problem(seed=0, n=400, d_in=12, d_out=9):
    """A weight and inputs with very unequal directions (as activations have): where whitening matters."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d_in)) * np.geomspace(10, 0.1, d_in)
    W = rng.standard_normal((d_out, d_in))
    return W, X


def output_error(W, X, A, B):
    return np.linalg.norm(X @ W.T - X @ B.T @ A.T)


def test_whitened_is_the_best_rank_r_for_the_layer_output():
    W, X = layer_problem()
    r = 3
    A, B, s = C.whitened_factors(W, X.T @ X, ridge=1e-12)
    err = output_error(W, X, A[:, :r], B[:r])
    # the optimum over rank r is the tail of W S's singular values (Eckart-Young on W S)
    assert err == pytest.approx(np.sqrt(np.sum(s[r:] ** 2)), rel=1e-6)
    As, Bs, _ = C.svd_factors(W)
    assert err < 0.8 * output_error(W, X, As[:, :r], Bs[:r])     # plain SVD is worse on these inputs
    # and no other rank-r factors found at random do better
    rng = np.random.default_rng(5)
    for _ in range(20):
        A2, B2 = A[:, :r] + 0.01 * rng.standard_normal((9, r)), B[:r] + 0.01 * rng.standard_normal((r, 12))
        assert output_error(W, X, A2, B2) >= err
    np.testing.assert_allclose(np.linalg.norm(A, axis=0), np.linalg.norm(B, axis=1))   # balanced


def test_svd_factors_are_the_truncated_svd():
    W, _ = layer_problem()
    A, B, s = C.svd_factors(W)
    U, s2, Vt = np.linalg.svd(W, full_matrices=False)
    np.testing.assert_allclose(A[:, :4] @ B[:4], (U[:, :4] * s2[:4]) @ Vt[:4], atol=1e-12)


def tiny_model(seed=0):
    config = GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=16, bias=True)
    params = init_params(config, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed)
    for k in params:
        params[k] = params[k] + 0.3 * rng.standard_normal(params[k].shape)
    idx = rng.integers(0, 11, size=(40, 8))
    return config, params, idx


def test_refit_never_increases_the_output_error_and_usually_lowers_it():
    config, params, idx = tiny_model()
    ranks = C.ranks_for(config, ("rank", 3))
    new, info = C.compress_model(params, config, ranks, "svd", idx, refit_factors=True)
    assert set(info["refit"]) == set(ranks)
    for name, (before, after) in info["refit"].items():
        assert after <= before + 1e-9, name
    assert sum(b - a for b, a in info["refit"].values()) > 0.01
    # the reported error is the true one: recompute the last layer's from its activations
    assert ranks_of(new) == ranks


def test_whitened_model_is_closer_to_the_dense_model_than_svd():
    config, params, idx = tiny_model(1)
    ranks = C.ranks_for(config, ("fraction", 0.25))
    logits = forward(params, config, idx, for_backward=False)[0]
    err = {}
    for method in C.METHODS:
        new, _ = C.compress_model(params, config, ranks, method, idx)
        err[method] = np.linalg.norm(forward(new, config, idx, for_backward=False)[0] - logits)
    assert err["whitened"] < err["svd"]


def test_ranks_for_each_spec():
    config = GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=16)
    assert set(C.ranks_for(config, ("fraction", 0.375)).values()) == {6}
    assert set(C.ranks_for(config, ("rank", 5)).values()) == {5}
    ranks = C.ranks_for(config, params_fraction=0.5)
    kept, dense = C.kept_fraction(config, ranks)
    assert kept <= 0.5 * dense and kept > 0.45 * dense
    assert ranks["transformer.h.0.attn.c_proj"] == 4 and ranks["transformer.h.0.mlp.c_fc"] == 6   # 16·16/32, 64·16/80


@pytest.mark.parametrize("text", ["0", "-1", "nan", "NaN", "1.5", "0.0", "-0.2", "inf", "abc", ""])
def test_bad_rank_texts_are_refused(text):
    with pytest.raises(TinyLMError):
        C.parse_rank(text)


def test_rank_above_full_rank_and_a_lower_rank_checkpoint_are_refused():
    config, params, idx = tiny_model()
    with pytest.raises(TinyLMError, match="above the full rank"):
        C.ranks_for(config, ("rank", 17))
    low, _ = C.compress_model(params, config, C.ranks_for(config, ("rank", 3)), "svd")
    with pytest.raises(TinyLMError, match="already compressed"):
        C.compress_model(low, config, C.ranks_for(config, ("rank", 4)), "svd")
    lower, _ = C.compress_model(low, config, C.ranks_for(config, ("rank", 2)), "svd")   # lower again is fine
    assert set(ranks_of(lower).values()) == {2}


def test_a_layer_not_smaller_factorized_stays_dense():
    config, params, idx = tiny_model()
    new, info = C.compress_model(params, config, C.ranks_for(config, ("fraction", 0.6)), "svd")   # r = 10 of 16
    ranks = ranks_of(new)          # c_attn (48×16) and the MLP's are smaller as factors; c_proj (16×16) is not
    assert "transformer.h.0.attn.c_proj" not in ranks and "transformer.h.1.attn.c_proj" not in ranks
    assert set(ranks) == {n for n in C.layer_names(config) if not n.endswith("attn.c_proj")}
    W = params["transformer.h.1.attn.c_proj.weight"]
    U, s, Vt = np.linalg.svd(W)
    np.testing.assert_allclose(new["transformer.h.1.attn.c_proj.weight"], (U[:, :10] * s[:10]) @ Vt[:10], atol=1e-10)
    assert info["kept"] == sum(min(10 * sum(params[n + ".weight"].shape), params[n + ".weight"].size)
                               for n in C.layer_names(config))


def test_calibration_windows():
    ids = np.arange(100)
    w = C.calibration_windows(ids, 8, 30)
    assert w.shape == (4, 8) and w[0, 0] == 0 and w[-1, -1] == 99
    with pytest.raises(TinyLMError, match="shorter than one block"):
        C.calibration_windows(np.arange(7), 8, 30)


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def compressed(trained_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compressed") / "ckpt.npz"
    proc = run_module("tinylm.compress", os.path.join(trained_dir["dir"], "ckpt.npz"), out, "--params", "0.5",
                      "--no_progress", "--calib_tokens", 4096)      # whitened + refit: the defaults
    assert proc.returncode == 0, proc.stderr
    return {"path": str(out), "stdout": proc.stdout, "source": os.path.join(trained_dir["dir"], "ckpt.npz")}


def test_compress_command_writes_a_factorized_checkpoint(compressed):
    ck = load_checkpoint(compressed["path"])
    ranks = ranks_of(ck["params"])
    assert len(ranks) == 8 and ck["meta"]["lowrank"] == ranks
    assert ck["meta"]["compressed"]["method"] == "whitened" and ck["meta"]["compressed"]["refit"]
    assert "validation loss" in compressed["stdout"] and "refit" in compressed["stdout"]
    src = load_checkpoint(compressed["source"])
    x = np.random.default_rng(0).integers(0, src["config"].vocab_size, size=(2, 16))
    dense_logits = forward(src["params"], src["config"], x, for_backward=False)[0]
    logits = forward(ck["params"], ck["config"], x, for_backward=False)[0]
    assert np.abs(logits - dense_logits).mean() < 0.3 * np.abs(dense_logits).mean()


@pytest.mark.parametrize("flags, refit", [(("--refit", "false"), False), (("--method", "svd"), False),
                                          (("--method", "svd", "--refit"), True)])
def test_refit_is_the_default_only_for_the_whitened_method(trained_dir, tmp_path, flags, refit):
    out = tmp_path / "o.npz"
    proc = run_module("tinylm.compress", os.path.join(trained_dir["dir"], "ckpt.npz"), out, "--params", "0.5",
                      *flags, "--no_progress", "--calib_tokens", 2048, "--eval_tokens", 0)
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(str(out))["meta"]["compressed"]["refit"] is refit
    assert ("refit" in proc.stdout.split(":")[0]) is refit


def test_sample_analyze_export_read_the_compressed_model(compressed, tmp_path):
    proc = run_script("sample.py", "--init_from", compressed["path"], "--num_samples", 1, "--max_new_tokens", 20,
                      "--start", "ROMEO:")
    assert proc.returncode == 0 and proc.stdout.startswith("ROMEO:"), proc.stderr
    proc = run_script("analyze.py", compressed["path"], "--only", "spectra", "--no-progress", "--n-boot", 0)
    assert proc.returncode == 0 and "factorized layers analysed as their products" in proc.stdout, proc.stderr
    proc = run_module("tinylm.export", compressed["path"], tmp_path / "hf")
    assert proc.returncode == 0 and "dense products" in proc.stdout, proc.stderr
    from tinylm.io.hf import load_any
    back = load_any(str(tmp_path / "hf"), dtype=np.float64)
    ck = load_checkpoint(compressed["path"])
    dense = dense_params(ck["params"])
    for k, v in dense.items():
        np.testing.assert_allclose(back["params"][k], v, rtol=1e-6, atol=1e-6)


def test_training_resumes_from_the_compressed_model(compressed, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.npz").write_bytes(open(compressed["path"], "rb").read())
    step = load_checkpoint(compressed["path"])["meta"]["step"]
    before = load_checkpoint(compressed["path"])["params"]
    proc = run_script("train.py", "--out_dir", out, "--init_from", "resume", "--max_iters", step + 5,
                      "--eval_interval", 5, "--eval_iters", 2, "--sample_tokens", 0, "--progress", "false",
                      "--track_spectra", "true")
    assert proc.returncode == 0, proc.stderr
    assert f"{sum(v.size for v in before.values()):,} parameters" in proc.stdout     # the factorized count
    assert (out / "spectra.jsonl").stat().st_size > 0                              # spectra of the products
    after = load_checkpoint(str(out / "ckpt.npz"))
    assert after["meta"]["step"] == step + 5 and ranks_of(after["params"]) == ranks_of(before)
    name = next(iter(ranks_of(before))) + ".weight_B"
    assert not np.array_equal(after["params"][name], before[name])      # the factors trained


def test_sample_rank_compresses_on_the_fly(trained_dir):
    ckpt = os.path.join(trained_dir["dir"], "ckpt.npz")
    proc = run_script("sample.py", "--init_from", ckpt, "--rank", "0.25", "--num_samples", 1, "--max_new_tokens", 20)
    assert proc.returncode == 0, proc.stderr
    assert "compressed on the fly by truncated SVD: rank 12" in proc.stderr
    for bad in ("0", "-3", "nan", "1000", "2.0"):
        proc = run_script("sample.py", "--init_from", ckpt, "--rank", bad, "--num_samples", 1, "--max_new_tokens", 5)
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout, (bad, proc.stderr)


# ----------------------------------------------------------------------------- bad input: one line, non-zero, OUT absent or untouched


def bad_cases(trained, compressed, tmp):
    short = tmp / "short.txt"
    short.write_text("ROMEO: hi", encoding="utf-8")
    alien = tmp / "alien.txt"
    alien.write_text("ROMEO: ☃ " * 200, encoding="utf-8")
    corrupt = tmp / "corrupt.npz"
    corrupt.write_bytes(open(trained, "rb").read()[:3000])
    foreign = tmp / "foreign.npz"
    np.savez(foreign, a=np.zeros(3))
    return {
        "rank 0": ([trained, "--rank", "0"], "at least 1"),
        "negative rank": ([trained, "--rank", "-0.5"], "(0, 1]"),
        "NaN rank": ([trained, "--rank", "nan"], "(0, 1]"),
        "rank above full": ([trained, "--rank", "49"], "above the full rank"),
        "params NaN": ([trained, "--params", "nan"], "--params"),
        "params 0": ([trained, "--params", "0"], "--params"),
        "short calibration": ([trained, "--calib", short], "shorter than one block"),
        "alien characters": ([trained, "--calib", alien], "calibration text"),
        "already lower": ([compressed, "--rank", "0.9"], "already compressed"),
        "corrupt": ([corrupt, "--rank", "0.5"], "checkpoint"),
        "foreign": ([foreign, "--rank", "0.5"], "not a tinylm checkpoint"),
        "missing": ([tmp / "nope.npz"], "not found"),
        "calib tokens 0": ([trained, "--calib_tokens", "0"], "--calib_tokens"),
    }


@pytest.mark.parametrize("case", ["rank 0", "negative rank", "NaN rank", "rank above full", "params NaN", "params 0",
                                  "short calibration", "alien characters", "already lower", "corrupt", "foreign",
                                  "missing", "calib tokens 0"])
@pytest.mark.parametrize("existing", [False, True])
def test_bad_input_is_one_line_and_leaves_out_alone(case, existing, trained_dir, compressed, tmp_path):
    args, words = bad_cases(os.path.join(trained_dir["dir"], "ckpt.npz"), compressed["path"], tmp_path)[case]
    out = tmp_path / "out.npz"
    if existing:
        out.write_bytes(b"an earlier file")
    proc = run_module("tinylm.compress", args[0], out, *args[1:], *(["--force"] if existing else []), "--no_progress")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error") and words in lines[0], proc.stderr
    assert (out.read_bytes() == b"an earlier file") if existing else not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".") or p.endswith(".tmp")]


def test_out_must_not_overwrite_without_force_or_be_the_input(trained_dir, tmp_path):
    ckpt = os.path.join(trained_dir["dir"], "ckpt.npz")
    before = open(ckpt, "rb").read()
    proc = run_module("tinylm.compress", ckpt, ckpt, "--force", "--no_progress")
    assert proc.returncode != 0 and "input checkpoint" in proc.stderr and open(ckpt, "rb").read() == before
    out = tmp_path / "o.npz"
    out.write_bytes(b"keep")
    proc = run_module("tinylm.compress", ckpt, out, "--no_progress")
    assert proc.returncode != 0 and "--force" in proc.stderr and out.read_bytes() == b"keep"


def test_compression_memory_does_not_grow_with_depth():
    """Calibration holds one layer's activations at a time: a model three times deeper peaks no higher."""
    import tracemalloc
    peaks = []
    for n_layer in (2, 6):
        config = GPTConfig(block_size=16, vocab_size=11, n_layer=n_layer, n_head=2, n_embd=32)
        params = init_params(config, seed=0)
        idx = np.random.default_rng(0).integers(0, 11, size=(256, 16))
        ranks = C.ranks_for(config, ("rank", 4))
        tracemalloc.start()
        C.compress_model(params, config, ranks, "whitened", idx, refit_factors=True)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    layer_inputs = 256 * 16 * 4 * 32 * 4                   # the MLP projection's inputs, float32
    assert peaks[1] < 1.15 * peaks[0] + 0.5 * layer_inputs, peaks


def test_analysis_lowrank_has_the_whitened_curve_and_samples(trained_dir, tmp_path):
    report = tmp_path / "report"
    proc = run_script("analyze.py", trained_dir["dir"], "--only", "lowrank", "--report", report, "--no-progress",
                      "--eval-seqs", 16)
    assert proc.returncode == 0, proc.stderr
    assert "low rank, whitened (tinylm.compress)" in proc.stdout
    import json
    sec = json.loads((report / "metrics.json").read_text())["lowrank"]
    quarter = next(r for r in sec["curve"] if r["rank_fraction"] == 0.25)
    assert quarter["whitened_loss"] < quarter["loss"]              # the data-aware factors lose less
    models = [(s["model"], s["rank_fraction"]) for s in sec["samples"]]
    assert models[0] == ("dense", 1.0) and ("whitened", 0.125) in models and ("svd", 0.125) in models
    assert all(len(s["text"]) > 0 for s in sec["samples"])
    html = (report / "index.html").read_text(encoding="utf-8")
    assert "loss (whitened)" in html and "Samples (same seed" in html


@pytest.mark.parametrize("tamper", ["rank", "name", "type"])
def test_checkpoint_with_wrong_lowrank_metadata_is_refused(compressed, tmp_path, tamper):
    import json
    with np.load(compressed["path"], allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta.json"].tobytes())
    name = next(iter(meta["lowrank"]))
    if tamper == "rank":
        meta["lowrank"][name] += 1                     # the arrays no longer match
    elif tamper == "name":
        meta["lowrank"]["transformer.wte"] = 2
    else:
        meta["lowrank"] = "all of them"
    arrays["meta.json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(TinyLMError, match="checkpoint"):
        load_checkpoint(str(path))


def test_quick_bench_prints_every_target_and_the_sampling_ratio_from_its_own_rows(trained_dir):
    """`python -m benchmarks.compress_bench --quick` runs on a trained model; its speeds are never checked, only that
    the target line's ratios are the table's."""
    import re
    proc = run_module("benchmarks.compress_bench", os.path.join(trained_dir["dir"], "ckpt.npz"), "--quick")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    rows = {m[1]: tuple(map(float, m.groups()[1:])) for m in re.finditer(
        r"^  (dense|whitened 50%)\s+([\d.]+) tokens/s\s+([\d.]+) tokens/s\s+([\d.]+) tokens/s\s+([\d.]+) ms/step$",
        out, re.M)}
    assert set(rows) == {"dense", "whitened 50%"}, out
    target = re.search(r"^target: sampling >= 1.3x dense: ([\d.]+)x for one sequence, ([\d.]+)x with 3 side by side "
                       r".*?, ([\d.]+)x with 10; training step >= 1.2x faster: ([\d.]+)x$", out, re.M)
    assert target, out
    (d1, d3, d10, dms), (c1, c3, c10, cms) = rows["dense"], rows["whitened 50%"]
    for shown, ratio in zip(map(float, target.groups()), (c1 / d1, c3 / d3, c10 / d10, dms / cms)):
        assert abs(shown - ratio) < 0.01 + 0.01 * ratio
    assert out.count("target: ") == 5 and "memory (tracemalloc" in out
