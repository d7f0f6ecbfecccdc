"""Muon (tinylm/core/muon.py, threaded in tinylm/fast/optim.py) in the optimizer and in training: its update, its state in checkpoints, resume, bad input."""
import os
import signal

import numpy as np
import pytest

import tinylm.fast.optim as muon
from tinylm.core import muon as core_muon
from conftest import run_script
from test_reliability_process import flags, same_state, start, wait_for_line
from tinylm.fast import model as M
from tinylm.core import gpt2 as G
from tinylm.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinylm.errors import TinyLMError
from tinylm.core.optim import adamw_init, adamw_step
from tinylm.text.char import CharTokenizer
from tinylm.train.args import TrainArgs
from tinylm.train.loop import train

CONFIG = G.GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=12)


def params_and_grads(seed=0):
    params = G.init_params(CONFIG, seed=seed)
    rng = np.random.default_rng(seed + 1)
    grads = {k: rng.standard_normal(p.shape).astype(p.dtype) for k, p in params.items()}
    return params, grads


def copy(tree):
    return {k: v.copy() for k, v in tree.items()}


def test_muon_steps_the_block_matrices_and_adamw_the_rest():
    params, _ = params_and_grads()
    state = core_muon.muon_init(params)
    matrices = set(state["momentum"])
    assert matrices == {k for k in params if k.startswith("transformer.h.") and params[k].ndim == 2}
    assert len(matrices) == 4 * CONFIG.n_layer
    assert set(state["m"]) == set(state["v"]) == set(params) - matrices      # embeddings, gains: AdamW


@pytest.mark.parametrize("method", ["svd", "eigh"])
def test_the_applied_update_has_every_singular_value_equal_to_lr_times_the_shape_scale(method):
    params, grads = params_and_grads()
    before = copy(params)
    state = core_muon.muon_init(params)
    muon.muon_step(params, grads, state, lr=1e-3, muon_lr=0.02, method=method, workers=2)
    for k in state["momentum"]:
        rows, cols = params[k].shape
        s = np.linalg.svd((before[k] - params[k]).astype(np.float64), compute_uv=False)
        assert np.allclose(s, 0.02 * np.sqrt(max(1, rows / cols)), rtol=1e-3), k      # flat: all equal
        # and in the direction of the gradient: ⟨update, g⟩ > 0 (a descent step)
        assert np.vdot(before[k] - params[k], grads[k]) > 0, k


def test_the_threaded_muon_is_cores_muon():
    """fast/optim.py's Muon (threads, folded AdamW) moves every parameter as core/muon.py's does, to rounding."""
    params, g1 = params_and_grads(seed=5)
    params = {k: v.astype(np.float64) for k, v in params.items()}
    mine = {k: v.copy() for k, v in params.items()}
    state, fast_state = core_muon.muon_init(params), core_muon.muon_init(mine)
    for seed in (6, 7):
        _, g = params_and_grads(seed=seed)
        g = {k: v.astype(np.float64) for k, v in g.items()}
        core_muon.muon_step(params, g, state, lr=1e-3, muon_lr=0.02, method="eigh", grad_scale=0.7)
        muon.muon_step(mine, g, fast_state, lr=1e-3, muon_lr=0.02, method="eigh", grad_scale=0.7, workers=2)
    for k in params:
        np.testing.assert_allclose(mine[k], params[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_adamw_part_is_exactly_adamw_and_the_momentum_is_nesterovs():
    params, g1 = params_and_grads(seed=3)
    _, g2 = params_and_grads(seed=4)
    state = core_muon.muon_init(params)
    rest = [k for k in params if k not in state["momentum"]]
    ref_params = {k: params[k].copy() for k in rest}
    ref_state = adamw_init(ref_params)
    for g in (g1, g2):
        muon.muon_step(params, g, state, lr=1e-3, muon_lr=0.02, momentum=0.9, method="svd", weight_decay=0.1,
                       grad_scale=0.5)
        muon.adamw_step(ref_params, g, ref_state, 1e-3, weight_decay=0.1, grad_scale=0.5)    # the same kernel
    for k in rest:
        assert np.array_equal(params[k], ref_params[k]), k
    assert state["t"] == 2
    for k in state["momentum"]:                      # m = μ (0.5 g₁) + 0.5 g₂
        assert np.allclose(state["momentum"][k], 0.9 * 0.5 * g1[k] + 0.5 * g2[k], atol=1e-6), k


def test_update_direction_is_the_polar_factor_of_the_nesterov_momentum():
    params, g1 = params_and_grads(seed=5)
    _, g2 = params_and_grads(seed=6)
    state = core_muon.muon_init(params)
    muon.muon_step(params, g1, state, lr=0.0, muon_lr=0.01, momentum=0.8, method="svd")
    before = copy(params)
    muon.muon_step(params, g2, state, lr=0.0, muon_lr=0.01, momentum=0.8, method="svd")
    k = "transformer.h.1.mlp.c_fc.weight"
    u = g2[k] + 0.8 * (0.8 * g1[k] + g2[k])          # g + μ m, m = μ g₁ + g₂
    U, _, Vt = np.linalg.svd(u.astype(np.float64), full_matrices=False)
    rows, cols = params[k].shape
    assert np.allclose(before[k] - params[k], 0.01 * np.sqrt(max(1, rows / cols)) * (U @ Vt), atol=1e-6)


def test_newton_schulz_update_is_nearly_flat():
    params, grads = params_and_grads(seed=7)
    before = copy(params)
    state = core_muon.muon_init(params)
    muon.muon_step(params, grads, state, lr=1e-3, muon_lr=0.02, method="newton_schulz", ns_steps=5)
    k = "transformer.h.0.attn.c_attn.weight"
    s = np.linalg.svd((before[k] - params[k]).astype(np.float64), compute_uv=False) / (0.02 * np.sqrt(3))
    assert 0.6 < s.min() and s.max() < 1.25


def test_factorized_layers_factors_are_block_matrices_too():
    from tinylm.lowrank.factorized import factor_params
    params = G.init_params(CONFIG, seed=0)
    name = "transformer.h.0.mlp.c_fc"
    W = params[name + ".weight"]
    params = factor_params(params, name, W[:, :3].copy(), np.ones((3, W.shape[1]), W.dtype))
    state = core_muon.muon_init(params)
    assert any(k.endswith(".weight_A") for k in state["momentum"])
    assert any(k.endswith(".weight_B") for k in state["momentum"])


def test_a_model_without_block_matrices_is_refused():
    with pytest.raises(ValueError, match="no matrices inside its blocks"):
        core_muon.muon_init({"transformer.wte.weight": np.zeros((3, 4))})


def small_args(data, out, **kw):
    base = dict(data=data, out_dir=str(out), n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4,
                max_iters=30, lr_decay_iters=30, warmup_iters=3, eval_interval=10, eval_iters=4, sample_tokens=0,
                progress=False, optimizer="muon", learning_rate=3e-3)
    base.update(kw)
    return TrainArgs(**base)


@pytest.mark.parametrize("method", ["eigh", "svd", "newton_schulz"])
def test_training_with_muon_learns_and_saves_its_momentum(shakespeare_head, tmp_path, method):
    summary = train(small_args(shakespeare_head, tmp_path, orthogonalize=method, max_iters=60, lr_decay_iters=60),
                    log=lambda *a: None)
    ckpt = load_checkpoint(os.path.join(tmp_path, "ckpt.npz"))
    assert ckpt["meta"]["optimizer"] == "muon"
    momentum = ckpt["opt_state"]["momentum"]
    assert set(momentum) == {k for k in ckpt["params"] if k.startswith("transformer.h.") and ckpt["params"][k].ndim == 2}
    assert not set(momentum) & set(ckpt["opt_state"]["m"])
    assert all(np.abs(m).max() > 0 for m in momentum.values())
    import json
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5, rows      # it learns (4.14 -> about 3.4)
    assert summary["step"] == 60


def test_muon_beats_adamw_at_equal_steps_on_a_small_run(shakespeare_head, tmp_path):
    """Not the README's measurement (that is benchmarks.bench_train's), a guard that Muon is wired in at all."""
    kw = dict(max_iters=80, lr_decay_iters=80, eval_interval=80, eval_iters=10, n_embd=32, n_layer=2)
    adam = train(small_args(shakespeare_head, tmp_path / "a", optimizer="adamw", **kw), log=lambda *a: None)
    mu = train(small_args(shakespeare_head, tmp_path / "m", **kw), log=lambda *a: None)
    assert mu["best_val_loss"] < adam["best_val_loss"], (mu["best_val_loss"], adam["best_val_loss"])


def test_resume_keeps_muon_and_refuses_another_optimizer(shakespeare_head, tmp_path):
    train(small_args(shakespeare_head, tmp_path, max_iters=10), log=lambda *a: None)
    before = open(os.path.join(tmp_path, "ckpt.npz"), "rb").read()
    with pytest.raises(TinyLMError, match="--optimizer adamw differs from the resumed run's muon"):
        train(small_args(shakespeare_head, tmp_path, init_from="resume", optimizer="adamw", max_iters=20),
              explicit={"optimizer", "max_iters"}, log=lambda *a: None)
    assert open(os.path.join(tmp_path, "ckpt.npz"), "rb").read() == before
    # without the flag, the saved optimizer carries on
    train(small_args(shakespeare_head, tmp_path, init_from="resume", optimizer="adamw", max_iters=20),
          explicit={"max_iters"}, log=lambda *a: None)
    ckpt = load_checkpoint(os.path.join(tmp_path, "ckpt.npz"))
    assert ckpt["meta"]["step"] == 20 and "momentum" in ckpt["opt_state"]


def test_resume_of_an_adamw_run_with_muon_is_refused_by_the_command_line(shakespeare_head, tmp_path):
    out = tmp_path / "run"
    proc = run_script("train.py", *flags(shakespeare_head, out, 6))
    assert proc.returncode == 0, proc.stderr
    proc = run_script("train.py", *flags(shakespeare_head, out, 9), "--init_from", "resume", "--optimizer", "muon")
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "differs from the resumed run's adamw" in proc.stderr


def test_sigkill_then_resume_is_bit_exact_with_muon(shakespeare_head, tmp_path):
    """Kill -9 while a checkpoint is written, again at a step; the resumed run ends bit for bit where an
    uninterrupted one does: momentum, moments, weights, RNG states."""
    n = 15
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    reference = start(flags(shakespeare_head, ref, n, optimizer="muon"))
    proc = start(flags(shakespeare_head, out, n, optimizer="muon"), slow_save=0.15)
    assert wait_for_line(proc, "saving ckpt.npz", 2)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    first = load_checkpoint(os.path.join(out, "ckpt.npz"))
    assert first["meta"]["optimizer"] == "muon" and first["meta"]["step"] in (0, 3)
    proc = start(flags(shakespeare_head, out, n, optimizer="muon", init_from="resume"), slow_save=0.15)
    assert wait_for_line(proc, "saving ckpt.npz", 2)
    proc.kill()
    proc.wait()
    proc = start(flags(shakespeare_head, out, n, init_from="resume"))        # the optimizer comes from the file
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert reference.wait(timeout=120) == 0, reference.stderr.read()
    a, b = load_checkpoint(os.path.join(out, "ckpt.npz")), load_checkpoint(os.path.join(ref, "ckpt.npz"))
    assert a["meta"]["step"] == n and "momentum" in a["opt_state"]
    same_state(a, b)


@pytest.mark.parametrize("bad, message", [
    (["--muon_lr", "0"], "--muon_lr must be a finite number > 0"),
    (["--muon_lr", "-1"], "--muon_lr must be a finite number > 0"),
    (["--muon_lr", "nan"], "--muon_lr must be a finite number > 0"),
    (["--ns_steps", "0"], "--ns_steps must be at least 1"),
    (["--orthogonalize", "qr"], "--orthogonalize"),
    (["--optimizer", "sgd"], "--optimizer"),
    (["--muon_momentum", "1"], "--muon_momentum must be in [0, 1)"),
    (["--lora_rank", "2", "--init_from", "scratch"], "--optimizer muon does not step adapters"),
])
def test_bad_muon_settings_are_one_line_and_write_nothing(shakespeare_head, tmp_path, bad, message):
    out = tmp_path / "never"
    args = flags(shakespeare_head, out, 5) + ["--optimizer", "muon"] + bad
    proc = run_script("train.py", *args)
    assert proc.returncode != 0
    assert message in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_a_nan_update_stops_training_and_keeps_the_last_good_checkpoint(shakespeare_head, tmp_path, monkeypatch):
    train(small_args(shakespeare_head, tmp_path, max_iters=10), log=lambda *a: None)
    good = load_checkpoint(os.path.join(tmp_path, "ckpt.npz"))
    monkeypatch.setattr(core_muon, "orthogonalize", lambda u, *a: np.full_like(u, np.nan))
    with pytest.raises(TinyLMError, match="diverged"):
        train(small_args(shakespeare_head, tmp_path, init_from="resume", max_iters=30), explicit={"max_iters"},
              log=lambda *a: None)
    kept = load_checkpoint(os.path.join(tmp_path, "ckpt.npz"))
    assert kept["meta"]["step"] == 10
    for k in good["params"]:
        assert np.array_equal(kept["params"][k], good["params"][k])


def test_a_muon_checkpoint_missing_a_momentum_array_is_refused(tmp_path):
    params = G.init_params(CONFIG, seed=0)
    state = core_muon.muon_init(params)
    tok = CharTokenizer("".join(chr(ord("a") + i) for i in range(CONFIG.vocab_size)))
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, params, CONFIG, tok, state, {"step": 1})
    assert load_checkpoint(path)["opt_state"]["momentum"].keys() == state["momentum"].keys()
    del state["momentum"]["transformer.h.0.mlp.c_fc.weight"]
    save_checkpoint(path, params, CONFIG, tok, state, {"step": 1})
    with pytest.raises(CheckpointError, match="missing array"):
        load_checkpoint(path)


def test_track_spectra_logs_the_applied_updates_spectra_flat_for_muon_not_for_adamw(shakespeare_head, tmp_path):
    from tinylm.analysis.tracking import log_spectra, read_jsonl
    flat = {}
    for optimizer in ("muon", "adamw"):
        out = tmp_path / optimizer
        train(small_args(shakespeare_head, out, optimizer=optimizer, n_embd=32, track_spectra=True, max_iters=20,
                         lr_decay_iters=25),
              log=lambda *a: None, tracker=log_spectra)
        rows = read_jsonl(str(out / "spectra.jsonl"))
        assert [r["step"] for r in rows] == [0, 10, 20]
        assert "updates" not in rows[0] and all(r["optimizer"] == optimizer for r in rows[1:])
        # every block matrix's gradient has one exact null direction: a c_proj writes into the residual
        # stream, whose gradient sums to zero over the features (each layer norm's backward removes the
        # mean), so 1ᵀ dW = 0 and 1ᵀ(momentum) = 0; so that σ stays ~0 even for Muon, and the other σ are equal
        for kind in ("attn", "mlp"):
            sv = np.array(rows[-1]["updates"][f"transformer.h.0.{kind}.c_proj.weight"]["sv"])
            assert len(sv) == 32 and (sv[-1] < 1e-2 * sv[0] or optimizer == "adamw")    # AdamW's divides per entry
            flat[f"{optimizer} {kind}"] = sv[:-1].min() / sv[0]
        # the logged update is the real one: σ₁ of Muon's is its learning rate at step 19 (square matrix;
        # min_lr / learning_rate sets where its cosine ends)
        if optimizer == "muon":
            from tinylm.core.optim import learning_rate_at
            assert np.isclose(sv[0], learning_rate_at(19, 0.02, 0.02 * 1e-4 / 3e-3, 3, 25), rtol=1e-3)
    assert flat["muon attn"] > 0.99 and flat["muon mlp"] > 0.99, flat       # (float32 Gram: weak directions to ~0.3%)
    assert flat["adamw attn"] < 0.5 and flat["adamw mlp"] < 0.5, flat


def test_the_report_draws_the_update_spectra(shakespeare_head, tmp_path):
    pytest.importorskip("matplotlib")
    from tinylm.analysis.tracking import log_spectra
    from tinylm.cli.analyze import analyze_main
    train(small_args(shakespeare_head, tmp_path, track_spectra=True, max_iters=10), log=lambda *a: None,
          tracker=log_spectra)
    assert analyze_main([str(tmp_path / "ckpt.npz"), "--only", "training", "--report", str(tmp_path / "rep"),
                         "--no-progress"]) == 0
    html = open(tmp_path / "rep" / "index.html", encoding="utf-8").read()
    assert "Singular values of the updates muon applied" in html
    # --compare another run: its updates drawn beside (AdamW's against Muon's, the same model and data)
    train(small_args(shakespeare_head, tmp_path / "adamw", optimizer="adamw", track_spectra=True, max_iters=10),
          log=lambda *a: None, tracker=log_spectra)
    assert analyze_main([str(tmp_path / "ckpt.npz"), "--compare", str(tmp_path / "adamw" / "ckpt.npz"), "--only",
                         "training", "--report", str(tmp_path / "both"), "--no-progress"]) == 0
    html = open(tmp_path / "both" / "index.html", encoding="utf-8").read()
    assert "Singular values of the updates muon and adamw applied" in html and "a row per run" in html


def test_settings_the_run_does_not_use_are_named(shakespeare_head, tmp_path):
    notes = []
    train(small_args(shakespeare_head, tmp_path / "a", optimizer="adamw", max_iters=2), explicit={"muon_lr", "ns_steps"},
          log=notes.append)
    assert any("--muon_lr, --ns_steps only apply with --optimizer muon" in n for n in notes), notes
    notes.clear()
    train(small_args(shakespeare_head, tmp_path / "b", max_iters=2), explicit={"ns_steps"}, log=notes.append)
    assert any("--ns_steps only applies with --orthogonalize newton_schulz" in n for n in notes), notes


def test_metrics_log_muons_learning_rate_too(shakespeare_head, tmp_path):
    import json
    train(small_args(shakespeare_head, tmp_path, max_iters=10), log=lambda *a: None)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all("muon_lr" in r for r in rows) and rows[1]["muon_lr"] > 5 * rows[1]["lr"]


def test_overwrite_is_a_bare_switch_on_the_command_line(shakespeare_head, tmp_path):
    out = tmp_path / "run"
    assert run_script("train.py", *flags(shakespeare_head, out, 3)).returncode == 0
    again = run_script("train.py", *flags(shakespeare_head, out, 3))
    assert again.returncode == 1 and "replace it with --overwrite" in again.stderr
    bare = run_script("train.py", *flags(shakespeare_head, out, 3), "--overwrite")
    assert bare.returncode == 0, bare.stderr
    off = run_script("train.py", *flags(shakespeare_head, out, 3), "--overwrite", "false")
    assert off.returncode == 1 and "holds an earlier run" in off.stderr
