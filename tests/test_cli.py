"""The entry points as a user runs them: help, a tiny run, sampling, and every bad input as one line."""
import os

import numpy as np
import pytest

from conftest import run_script


def one_line_error(proc, *words):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr, proc.stderr
    last = err.splitlines()[-1]
    assert last.startswith("error:"), err
    for w in words:
        assert w in last, (w, last)
    return last


def test_help_explains_every_flag():
    proc = run_script("train.py", "--help")
    assert proc.returncode == 0
    for flag in ("--batch_size", "--block_size", "--n_layer", "--n_head", "--n_embd", "--max_iters",
                 "--learning_rate", "--min_lr", "--warmup_iters", "--lr_decay_iters", "--weight_decay",
                 "--beta1", "--beta2", "--grad_clip", "--dropout", "--eval_interval", "--eval_iters",
                 "--out_dir", "--seed", "--data", "--init_from"):
        assert flag in proc.stdout
    assert run_script("sample.py", "--help").returncode == 0


def test_train_then_sample_from_the_command_line(shakespeare_head, tmp_path):
    out = tmp_path / "run"
    proc = run_script("train.py", "--data", shakespeare_head, "--out_dir", out, "--n_layer", 1, "--n_embd", 32,
                      "--n_head", 2, "--block_size", 16, "--max_iters", 30, "--eval_interval", 15,
                      "--eval_iters", 2, "--sample_tokens", 40)
    assert proc.returncode == 0, proc.stderr
    assert "sample after 30 steps" in proc.stdout
    assert sorted(os.listdir(out)) == ["best.npz", "ckpt.npz", "metrics.jsonl"]
    proc = run_script("sample.py", "--out_dir", out, "--start", "ROMEO:", "--num_samples", 2,
                      "--max_new_tokens", 50, "--seed", 3)
    assert proc.returncode == 0, proc.stderr
    samples = proc.stdout.split("---------------")
    assert len(samples) == 3 and all(s.strip().startswith("ROMEO:") for s in samples[:2])
    again = run_script("sample.py", "--out_dir", out, "--start", "ROMEO:", "--num_samples", 2,
                       "--max_new_tokens", 50, "--seed", 3)
    assert again.stdout == proc.stdout                           # seeded: reproducible
    greedy = run_script("sample.py", "--out_dir", out, "--start", "ROMEO:", "--num_samples", 1,
                        "--max_new_tokens", 50, "--temperature", 0)
    uncached = run_script("sample.py", "--out_dir", out, "--start", "ROMEO:", "--num_samples", 1,
                          "--max_new_tokens", 50, "--temperature", 0, "--no_cache")
    assert greedy.returncode == 0 and greedy.stdout == uncached.stdout
    three = run_script("sample.py", "--out_dir", out, "--start", "ROMEO:", "--num_samples", 3,
                       "--max_new_tokens", 50, "--seed", 4)                  # three rows of one batch
    samples = three.stdout.split("\n---------------\n")
    assert three.returncode == 0 and len(samples) == 4 and samples[3] == ""
    assert all(s.startswith("ROMEO:") and len(s) > len("ROMEO:") for s in samples[:3])
    assert len(set(samples[:3])) == 3                                        # each row its own draws
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("JULIET:", encoding="utf-8")
    proc = run_script("sample.py", "--out_dir", out, "--start", f"FILE:{prompt_file}", "--num_samples", 1,
                      "--max_new_tokens", 5)
    assert proc.returncode == 0 and proc.stdout.startswith("JULIET:")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_bytes(b"")
    (d / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 500)
    (d / "binary.bin").write_bytes(bytes(range(256)) * 20)
    (d / "short.txt").write_text("too short", encoding="utf-8")
    (d / "subdir").mkdir()
    return d


@pytest.mark.parametrize("case,words", [
    ("missing.txt", ["not found"]),
    ("subdir", ["directory"]),
    ("empty.txt", ["empty"]),
    ("latin1.txt", ["not UTF-8", "offset 3", "--encoding_errors"]),
    ("binary.bin", ["binary"]),
    ("short.txt", ["too short", "--block_size"]),
])
def test_bad_text_files_give_one_clear_line(bad_files, tmp_path, case, words):
    proc = run_script("train.py", "--data", bad_files / case, "--out_dir", tmp_path / "o", "--max_iters", 1)
    one_line_error(proc, *words)


@pytest.mark.parametrize("flags,words", [
    (["--n_embd", "30", "--n_head", "4"], ["--n_embd", "divisible", "--n_head"]),
    (["--n_layer", "0"], ["--n_layer"]),
    (["--batch_size", "-2"], ["--batch_size"]),
    (["--dropout", "1.5"], ["--dropout"]),
    (["--init_from", "gpt2"], ["--init_from"]),
    (["--bias", "maybe"], ["--bias"]),
    (["--learning_rate", "abc"], ["--learning_rate"]),
])
def test_invalid_config_names_the_flag(shakespeare_head, tmp_path, flags, words):
    proc = run_script("train.py", "--data", shakespeare_head, "--out_dir", tmp_path / "o", "--max_iters", 1, *flags)
    one_line_error(proc, *words)


def test_sampling_errors(trained_dir, tmp_path):
    d = trained_dir["dir"]
    one_line_error(run_script("sample.py", "--out_dir", d, "--start", "héllo ☃"), "never saw")
    one_line_error(run_script("sample.py", "--out_dir", tmp_path), "not found", "train.py")
    # nanoGPT's habit: --init_from gpt2 downloads there; here it names what --init_from reads
    one_line_error(run_script("sample.py", "--init_from", "gpt2", cwd=tmp_path), "--init_from gpt2 does not exist",
                   "Llama folder", "model.bin", "downloads nothing")
    one_line_error(run_script("sample.py", "--out_dir", d, "--top_k", 0), "--top_k")
    one_line_error(run_script("sample.py", "--out_dir", d, "--top_p", 1.5), "--top_p")
    one_line_error(run_script("sample.py", "--out_dir", d, "--temperature", -1), "--temperature")


def test_damaged_and_foreign_checkpoints(trained_dir, tmp_path):
    raw = open(os.path.join(trained_dir["dir"], "ckpt.npz"), "rb").read()
    (tmp_path / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.npz").write_bytes(b"hello, I am not a checkpoint" * 10)
    np.savez(tmp_path / "foreign.npz", weights=np.zeros(3))
    for name, word in (("truncated.npz", "damaged"), ("garbage.npz", "damaged"), ("foreign.npz", "not a tinylm")):
        one_line_error(run_script("sample.py", "--checkpoint", tmp_path / name), word)


def test_resume_without_a_checkpoint_says_so(shakespeare_head, tmp_path):
    one_line_error(run_script("train.py", "--data", shakespeare_head, "--out_dir", tmp_path, "--init_from", "resume"),
                   "not found")


def test_debug_shows_the_traceback(tmp_path):
    proc = run_script("train.py", "--data", tmp_path / "nope.txt", "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_a_shorter_run_decays_its_learning_rate_to_min_lr(shakespeare_head, tmp_path):
    """On the command line --lr_decay_iters follows --max_iters unless given, so lr ends at min_lr."""
    import json
    proc = run_script("train.py", "--data", shakespeare_head, "--out_dir", tmp_path, "--n_layer", 1, "--n_embd", 16,
                      "--n_head", 2, "--block_size", 8, "--max_iters", 20, "--eval_interval", 10, "--eval_iters", 1,
                      "--warmup_iters", 2, "--sample_tokens", 0)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["step"] == 20 and abs(rows[-1]["lr"] - 1e-4) < 1e-12
