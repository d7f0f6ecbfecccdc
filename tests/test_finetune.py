"""Fine-tuning: a new run from a checkpoint, unknown characters, LoRA/PiSSA adapters, --merge, bad input, --compare."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, run_script
from tinylm.cli.train import train_main
from tinylm.lowrank import adapters as AD
from tinylm.fast import model as M
from tinylm.core import gpt2 as G
from tinylm.fast import decode as D
from tinylm.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinylm.errors import TinyLMError
from tinylm.train.args import TrainArgs
from tinylm.train.loop import train

KJV = os.path.join(ROOT, "tinylm", "data", "kjv_genesis_exodus.txt")
quiet = lambda *a: None


def ft_args(base, out, **kw):
    d = dict(init_from=base, data=KJV, out_dir=str(out), max_iters=6, lr_decay_iters=6, warmup_iters=1,
             eval_interval=3, eval_iters=2, batch_size=4, unknown_chars="drop", sample_tokens=0, progress=False)
    d.update(kw)
    return TrainArgs(**d), tuple(d)


def run_ft(base, out, **kw):
    args, explicit = ft_args(base, out, **kw)
    return train(args, explicit=explicit, log=quiet)


@pytest.fixture(scope="module")
def base(trained_dir):
    return os.path.join(trained_dir["dir"], "ckpt.npz")


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_full_finetune_is_a_new_run_and_never_writes_the_source(base, tmp_path):
    before = file_bytes(base)
    best_before = file_bytes(os.path.join(os.path.dirname(base), "best.npz"))
    summary = run_ft(base, tmp_path / "ft")
    assert file_bytes(base) == before
    assert file_bytes(os.path.join(os.path.dirname(base), "best.npz")) == best_before
    rows = [json.loads(l) for l in open(tmp_path / "ft" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 3, 6]          # step 0: a new run, with its own log
    assert summary["best_val_loss"] == min(r["val_loss"] for r in rows)   # measured on the new text
    src = load_checkpoint(base)
    tuned = load_checkpoint(str(tmp_path / "ft" / "best.npz"))
    assert tuned["meta"]["best_val_loss"] == summary["best_val_loss"]
    assert tuned["tokenizer"].to_dict() == src["tokenizer"].to_dict()
    ck = load_checkpoint(str(tmp_path / "ft" / "ckpt.npz"))
    assert ck["meta"]["step"] == 6 and ck["opt_state"]["t"] == 6     # fresh optimizer moments
    assert any(not np.array_equal(ck["params"][k], src["params"][k]) for k in src["params"])


def test_the_source_is_refused_as_its_own_out_dir(base, tmp_path):
    folder = os.path.dirname(base)
    before = file_bytes(base)
    with pytest.raises(TinyLMError, match="choose a new --out_dir"):
        run_ft(base, folder)
    assert file_bytes(base) == before


def test_unknown_characters_error_names_them_and_counts_drop_and_replace_work(base, tmp_path):
    text = "And God said, Let there be light: (and there was light.) " * 400 + "é" * 3
    data = tmp_path / "mine.txt"
    data.write_text(text, encoding="utf-8")
    with pytest.raises(TinyLMError) as e:
        run_ft(base, tmp_path / "a", data=str(data), unknown_chars="error")
    msg = str(e.value)
    assert "'é' (3)" in msg and "--unknown_chars" in msg and "803 character(s) of 3 kind(s)" in msg
    assert not os.path.exists(tmp_path / "a" / "ckpt.npz")
    from tinylm.train.finetune import encode_for_vocabulary
    tok = load_checkpoint(base)["tokenizer"]
    dropped = encode_for_vocabulary(str(data), "strict", tok, "drop", log=quiet)
    assert tok.decode(dropped) == text.replace("(", "").replace(")", "").replace("é", "")
    replaced = encode_for_vocabulary(str(data), "strict", tok, "replace", ",", log=quiet)
    assert tok.decode(replaced) == text.replace("(", ",").replace(")", ",").replace("é", ",")
    with pytest.raises(TinyLMError, match="not in the base model's vocabulary"):
        encode_for_vocabulary(str(data), "strict", tok, "replace", "é", log=quiet)


def test_bpe_base_has_no_unknown_characters(shakespeare_head, tmp_path):
    args = TrainArgs(data=shakespeare_head, out_dir=str(tmp_path / "bpe"), tokenizer="bpe", vocab_size=260,
                     n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_iters=2, lr_decay_iters=2,
                     eval_interval=2, eval_iters=1, sample_tokens=0, progress=False)
    train(args, log=quiet)
    data = tmp_path / "accents.txt"
    data.write_text("Café, naïve résumé (àéîõü). " * 300, encoding="utf-8")
    run_ft(str(tmp_path / "bpe" / "ckpt.npz"), tmp_path / "ft", data=str(data), unknown_chars="error")


def test_training_runs_the_adapters_unmerged_with_the_merged_models_loss_and_gradients():
    """adapter_params (x Wᵀ + (x Aᵀ)(s·B)ᵀ, what a training step runs) and merged_params (W + s·B A) give the
    same loss and the same dA, dB (float64), and the unmerged backward gives the frozen targets no gradient."""
    config = G.GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=16, bias=True)
    params = G.init_params(config, seed=5, dtype=np.float64)
    lora = {"rank": 3, "alpha": 6.0, "targets": AD.block_matrix_names(params)[1:], "init": "pissa"}
    frozen, adapters = AD.init_adapters(params, lora)
    rng = np.random.default_rng(6)
    adapters = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in adapters.items()}
    idx, targets = rng.integers(0, 11, size=(2, 2, 8))
    merged = AD.merged_params(frozen, adapters, lora)
    loss_m, grads_m = M.loss_and_grads(merged, config, idx, targets)
    unmerged = AD.adapter_params(frozen, adapters, lora)
    loss_u, grads_u = M.loss_and_grads(unmerged, config, idx, targets)
    assert abs(loss_m - loss_u) < 1e-12
    assert not set(lora["targets"]) & set(grads_u)                       # no dW for a frozen matrix
    assert AD.block_matrix_names(params)[0] in grads_u                   # an untargeted one keeps its own
    want, got = AD.adapter_grads(grads_m, adapters, lora), AD.adapter_grads_unmerged(grads_u, lora)
    assert set(got) == set(adapters)
    for k in adapters:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-9, atol=1e-12)
    traces = [], []                           # the one-token decoder folds an unmerged adapter in, too
    for p, trace in zip((merged, unmerged), traces):
        list(D.generate(p, config, [1, 2], 12, lambda z: int(np.argmax(z)), trace=trace))
    for (ctx_m, logits_m), (ctx_u, logits_u) in zip(*traces):
        assert ctx_m == ctx_u
        np.testing.assert_allclose(logits_u, logits_m, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("init", ["lora", "pissa"])
def test_adapters_start_from_the_base_function_and_train_only_a_and_b(base, tmp_path, init):
    src = load_checkpoint(base)
    lora = {"rank": 3, "alpha": 0.0, "targets": AD.block_matrix_names(src["params"]), "init": init}
    frozen, adapters = AD.init_adapters(src["params"], lora)
    merged = AD.merged_params(frozen, adapters, lora)
    for k in src["params"]:
        np.testing.assert_allclose(merged[k], src["params"][k], atol=2e-6)   # same function at step 0
    if init == "pissa":     # the adapter holds the top-3 singular triplets, the residual the rest
        W = src["params"]["transformer.h.0.mlp.c_fc.weight"].astype(np.float64)
        s = np.linalg.svd(W, compute_uv=False)
        a, b = AD.adapter_names("transformer.h.0.mlp.c_fc.weight")
        np.testing.assert_allclose(np.linalg.svd(adapters[b] @ adapters[a], compute_uv=False)[:3], s[:3], rtol=1e-5)
        res = np.linalg.svd(frozen["transformer.h.0.mlp.c_fc.weight"], compute_uv=False)
        np.testing.assert_allclose(res[:3], s[3:6], rtol=1e-4)
    summary = run_ft(base, tmp_path / init, lora_rank=3, lora_init=init, learning_rate=3e-3)
    ck = load_checkpoint(str(tmp_path / init / "ckpt.npz"), merge_adapters=False)
    assert set(ck["opt_state"]["m"]) == set(ck["adapters"]) == set(adapters)   # optimizer state for A, B only
    for k, p in ck["params"].items():        # everything else frozen, bit for bit
        assert np.array_equal(p, frozen[k]), k
    moved = [k for k in adapters if not np.array_equal(ck["adapters"][k], adapters[k])]
    assert len(moved) == len(adapters)
    rows = [json.loads(l) for l in open(tmp_path / init / "metrics.jsonl")]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    # merged on load, and --merge's plain file is the same model
    plain = load_checkpoint(str(tmp_path / init / "best.npz"))
    assert plain["adapters"] is None and "lora" not in plain["meta"]
    assert summary["best_val_loss"] == plain["meta"]["best_val_loss"]


def test_merge_writes_a_plain_checkpoint_that_sample_uses(base, tmp_path):
    out = tmp_path / "m"
    run_ft(base, out, lora_rank=2, lora_init="pissa", lora_targets="c_attn,mlp.c_proj", merge=True)
    merged = load_checkpoint(str(out / "merged.npz"))
    best = load_checkpoint(str(out / "best.npz"), merge_adapters=False)
    assert "lora" not in merged["meta"] and merged["meta"]["merged_from"]["rank"] == 2
    assert best["meta"]["lora"]["targets"] == [f"transformer.h.{i}.{k}.weight" for i in range(2)
                                               for k in ("attn.c_attn", "mlp.c_proj")]
    expect = AD.merged_params(best["params"], best["adapters"], best["meta"]["lora"])
    for k in expect:
        assert np.array_equal(merged["params"][k], expect[k])
    r = run_script("sample.py", "--init_from", out / "merged.npz", "--num_samples", "1", "--max_new_tokens", "5")
    assert r.returncode == 0, r.stderr
    r2 = run_script("sample.py", "--out_dir", out, "--checkpoint", "best.npz", "--num_samples", "1",
                    "--max_new_tokens", "5")
    assert r2.stdout == r.stdout                           # the adapter file samples as its merge does


def test_lora_run_resumes_bit_for_bit(base, tmp_path):
    run_ft(base, tmp_path / "one", lora_rank=2, max_iters=6)
    run_ft(base, tmp_path / "two", lora_rank=2, max_iters=4)
    args, _ = ft_args(base, tmp_path / "two", max_iters=6)
    train(TrainArgs(**{**args.__dict__, "init_from": "resume"}), explicit=("init_from", "out_dir", "max_iters"),
          log=quiet)
    one = load_checkpoint(str(tmp_path / "one" / "ckpt.npz"), merge_adapters=False)
    two = load_checkpoint(str(tmp_path / "two" / "ckpt.npz"), merge_adapters=False)
    for k in one["adapters"]:
        assert np.array_equal(one["adapters"][k], two["adapters"][k])
        assert np.array_equal(one["opt_state"]["v"][k], two["opt_state"]["v"][k])


def test_adapters_hold_under_five_percent_at_rank_4():
    config = G.GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128)
    shapes = G.param_shapes(config)
    lora = {"rank": 4, "alpha": 0.0, "targets": AD.resolve_targets("all", shapes), "init": "lora"}
    assert len(lora["targets"]) == 16
    assert AD.count_adapter_params(lora, shapes) / G.count_params(config) < 0.05


def test_targets_resolve_by_kind_and_by_name():
    shapes = G.param_shapes(G.GPTConfig(block_size=8, vocab_size=5, n_layer=2, n_head=2, n_embd=8))
    assert AD.resolve_targets("c_proj", shapes) == [f"transformer.h.{i}.{k}.c_proj.weight" for i in range(2)
                                                    for k in ("attn", "mlp")]
    assert AD.resolve_targets("transformer.h.1.mlp.c_fc.weight", shapes) == ["transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(AD.AdapterError, match="names no block matrix"):
        AD.resolve_targets("transformer.wte.weight", shapes)


@pytest.mark.parametrize("flags,message", [
    (["--lora_rank", "0"], "--lora_rank must be a positive integer"),
    (["--lora_rank", "-2"], "--lora_rank must be a positive integer"),
    (["--lora_rank", "49"], "--lora_rank 49 is above the rank of transformer.h.0.attn.c_attn.weight"),
    (["--lora_rank", "2", "--lora_targets", "q_proj"], "'q_proj' names no block matrix"),
    (["--lora_alpha", "8"], "--lora_alpha needs --lora_rank"),
    (["--merge", "true"], "--merge folds adapters"),
    (["--lora_init", "svd", "--lora_rank", "2"], "--lora_init must be one of lora, pissa"),
    (["--unknown_chars", "skip"], "--unknown_chars must be one of"),
    (["--unknown_chars", "replace", "--replace_char", "ab"], "--replace_char must be exactly one character"),
])
def test_bad_finetune_flags_are_one_line_and_write_nothing(base, tmp_path, flags, message):
    out = tmp_path / "bad"
    r = run_script("train.py", "--init_from", base, "--data", KJV, "--out_dir", out, "--unknown_chars", "drop",
                   *flags, "--max_iters", "2")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not os.path.exists(out / "ckpt.npz")


def test_lora_rank_with_scratch_and_mismatched_resume_are_refused(base, tmp_path):
    r = run_script("train.py", "--lora_rank", "4", "--out_dir", tmp_path / "s", "--max_iters", "1")
    assert r.returncode == 1 and "not scratch" in r.stderr and r.stderr.count("\n") == 1
    out = tmp_path / "l"
    run_ft(base, out, lora_rank=2, max_iters=3)
    before = file_bytes(out / "ckpt.npz")
    for flags, message in ((["--lora_rank", "3"], "--lora_rank 3 does not match the adapters"),
                           (["--lora_init", "pissa"], "--lora_init pissa does not match"),
                           (["--lora_targets", "c_fc"], "--lora_targets c_fc does not match")):
        r = run_script("train.py", "--init_from", "resume", "--out_dir", out, "--max_iters", "6", *flags)
        assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert file_bytes(out / "ckpt.npz") == before
    # a base that does not match its adapters: the frozen weights changed inside the file
    ck = load_checkpoint(str(out / "ckpt.npz"), merge_adapters=False)
    ck["params"]["transformer.h.0.mlp.c_fc.weight"][0, 0] += 1.0
    meta = {k: v for k, v in ck["meta"].items() if k not in ("lora",)}
    meta.update(lora=ck["meta"]["lora"])
    save_checkpoint(str(out / "ckpt.npz"), ck["params"], ck["config"], ck["tokenizer"], ck["opt_state"], meta,
                    ck["adapters"])
    before = file_bytes(out / "ckpt.npz")
    r = run_script("train.py", "--init_from", "resume", "--out_dir", out, "--max_iters", "6")
    assert r.returncode == 1 and "do not match the ones its adapters were trained on" in r.stderr, r.stderr
    assert file_bytes(out / "ckpt.npz") == before


def test_adapter_arrays_must_match_the_base_shapes(base, tmp_path):
    out = tmp_path / "l"
    run_ft(base, out, lora_rank=2, max_iters=3)
    ck = load_checkpoint(str(out / "best.npz"), merge_adapters=False)
    bad = dict(ck["adapters"])
    name = next(iter(bad))
    bad[name] = np.zeros((3, bad[name].shape[1]), np.float32)   # rank 3 under a rank-2 header
    save_checkpoint(str(tmp_path / "bad.npz"), ck["params"], ck["config"], ck["tokenizer"], None, ck["meta"], bad)
    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(str(tmp_path / "bad.npz"))


def test_compare_shows_the_rank_of_each_change(base, tmp_path, capsys):
    from tinylm.cli.analyze import analyze_main
    from tinylm.analysis.compare import compare_matrix
    rng = np.random.default_rng(0)
    W = rng.standard_normal((20, 12))
    dW = rng.standard_normal((20, 2)) @ rng.standard_normal((2, 12))
    m = compare_matrix(W, W + 0.1 * dW, k=3)
    assert m["delta_numerical_rank"] == 2 and 1.0 <= m["delta_effective_rank"] <= 2.0
    assert compare_matrix(W, W, k=3)["angles_left_deg"] == pytest.approx([0, 0, 0], abs=1e-5)
    run_ft(base, tmp_path / "l", lora_rank=2, max_iters=3, learning_rate=1e-2)
    assert analyze_main([str(tmp_path / "l" / "best.npz"), "--compare", base, "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("h")}
    assert rows["h0.mlp.c_fc"][6] == "2" and rows["h1.attn.c_proj"][6] == "2"    # a rank-2 adapter's change
    assert "effective rank" in out and out.count("\n") > 10
    other = tmp_path / "other.npz"
    src = load_checkpoint(base)
    cfg = G.GPTConfig(**{**src["config"].to_dict(), "n_layer": 1})
    save_checkpoint(str(other), G.init_params(cfg), cfg, src["tokenizer"])
    assert analyze_main([str(tmp_path / "l" / "best.npz"), "--compare", str(other), "--no-progress"]) == 1
    assert "not the same shape" in capsys.readouterr().err


def test_bench_quick_runs():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "benchmarks.finetune_bench", "--quick"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    assert "PiSSA reaches LoRA's final val loss" in r.stdout and "peak traced memory" in r.stdout


def test_finetune_from_a_gpt2_folder(base, tmp_path):
    from tinylm.io.hf import export_hf
    export_hf(base, str(tmp_path / "hf"))
    summary = run_ft(str(tmp_path / "hf"), tmp_path / "ft", lora_rank=2, max_iters=3)
    assert summary["step"] == 3 and np.isfinite(summary["best_val_loss"])


def test_adapters_on_a_compressed_model_are_refused_and_its_factors_fine_tune(base, tmp_path):
    small = tmp_path / "small.npz"
    r = subprocess.run([sys.executable, "-m", "tinylm.compress", str(base), str(small), "--rank", "0.5", "--method",
                        "svd"], capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "lora"
    r = run_script("train.py", "--init_from", small, "--data", KJV, "--out_dir", out, "--unknown_chars", "drop",
                   "--lora_rank", "2", "--max_iters", "2")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--lora_rank needs a dense model" in r.stderr, r.stderr
    assert not os.path.exists(out / "ckpt.npz")
    out = tmp_path / "full"
    run_ft(str(small), out, max_iters=2)
    assert any(k.endswith(".weight_A") for k in load_checkpoint(str(out / "ckpt.npz"))["params"])


def test_a_bad_init_from_is_refused_before_out_dir_is_made(tmp_path, capsys):
    # the folder was made (and locked) first, so each refusal below left an empty --out_dir behind
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    (tmp_path / "nofolder").mkdir()
    (tmp_path / "model.bin").write_bytes(b"\0" * 10)
    for source, words in ((tmp_path / "bad.npz", "bad.npz"), (tmp_path / "nofolder", "without config.json"),
                          (tmp_path / "model.bin", "shorter than model.bin's 28-byte header")):
        out = tmp_path / "runs" / "new"
        assert train_main(["--init_from", str(source), "--out_dir", str(out), "--max_iters", "1"]) == 1
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err
        assert not (tmp_path / "runs").exists()
