"""Training and sampling with the byte-level BPE tokenizer, end to end."""
import os

from conftest import run_script
from tinylm.text.bpe import BPETokenizer
from tinylm.io.checkpoint import load_checkpoint


def test_train_with_bpe_then_sample_any_unicode_prompt(shakespeare_head, tmp_path):
    out = tmp_path / "bpe"
    proc = run_script("train.py", "--data", shakespeare_head, "--out_dir", out, "--tokenizer", "bpe",
                      "--vocab_size", 300, "--n_layer", 1, "--n_embd", 32, "--n_head", 2, "--block_size", 16,
                      "--max_iters", 20, "--eval_interval", 10, "--eval_iters", 2, "--sample_tokens", 20,
                      "--progress", "false")
    assert proc.returncode == 0, proc.stderr
    ckpt = load_checkpoint(os.path.join(out, "ckpt.npz"))
    assert isinstance(ckpt["tokenizer"], BPETokenizer)
    assert ckpt["config"].vocab_size == ckpt["tokenizer"].vocab_size == 300
    # a byte-level model takes any text, even characters its training text never had
    proc = run_script("sample.py", "--out_dir", out, "--start", "Héllo ☃ 東京", "--num_samples", 1,
                      "--max_new_tokens", 10)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Héllo ☃ 東京")
    # resume keeps the learned tokenizer
    proc = run_script("train.py", "--out_dir", out, "--init_from", "resume", "--max_iters", 25,
                      "--sample_tokens", 0, "--progress", "false")
    assert proc.returncode == 0, proc.stderr
    again = load_checkpoint(os.path.join(out, "ckpt.npz"))
    assert again["meta"]["step"] == 25 and again["tokenizer"].to_dict() == ckpt["tokenizer"].to_dict()


def test_bpe_vocab_size_too_small_is_refused(shakespeare_head, tmp_path):
    proc = run_script("train.py", "--data", shakespeare_head, "--out_dir", tmp_path, "--tokenizer", "bpe",
                      "--vocab_size", 100)
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: --vocab_size")
