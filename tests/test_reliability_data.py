"""Text files as they come, and flags that cannot work: each refused in one line naming the cause,
or read correctly; and a large file encoded without a Python object per character."""
import os
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import run_script
from tinylm.cli.sample import sample_main
from tinylm.cli.train import train_main
from tinylm.text.data import load_ids, read_text
from tinylm.errors import TinyLMError

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "8", "--block_size", "8", "--batch_size", "2",
        "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1", "--sample_tokens", "20", "--progress", "false"]


def one_line(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w in err[0], (w, err[0])
    return err[0]


# ----------------------------------------------------------------------------- encodings and line endings


def test_not_utf8_says_where_and_offers_replace_and_bytes(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes(("abc\n" * 3000 + "caf\xe9\n").encode("latin-1") * 2)
    assert train_main(["--data", str(path), "--out_dir", str(tmp_path / "o"), *TINY]) == 1
    one_line(capsys, "not UTF-8", "0xe9", "offset 12003", "--encoding_errors replace", "--encoding_errors bytes")
    assert read_text(str(path), "replace").count("\ufffd") == 2
    assert read_text(str(path), "bytes") == path.read_bytes().decode("latin-1")      # one character per byte
    assert train_main(["--data", str(path), "--out_dir", str(tmp_path / "b"), "--encoding_errors", "bytes", *TINY]) == 0
    capsys.readouterr()
    # a resumed run reads the file the same way without being told again
    assert train_main(["--out_dir", str(tmp_path / "b"), "--init_from", "resume", "--max_iters", "3"]) == 0


def test_binary_file_is_refused_unless_read_as_bytes(tmp_path, capsys):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 40)
    assert train_main(["--data", str(path), "--out_dir", str(tmp_path / "o"), *TINY]) == 1
    one_line(capsys, "binary", "--encoding_errors bytes")
    tok, ids = load_ids(str(path), "bytes")
    assert tok.vocab_size == 256 and ids.dtype == np.uint8 and len(ids) == 256 * 40


def test_byte_order_mark_and_windows_line_endings_read_as_plain_text(tmp_path):
    text = "Première ligne\nsecond ☃ line\n\n" * 200
    plain, windows = tmp_path / "plain.txt", tmp_path / "windows.txt"
    plain.write_bytes(text.encode("utf-8"))
    windows.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    tok_a, ids_a = load_ids(str(plain))
    tok_b, ids_b = load_ids(str(windows))
    assert tok_a.chars == tok_b.chars and np.array_equal(ids_a, ids_b)
    assert "\ufeff" not in tok_b.chars and "\r" not in tok_b.chars
    assert read_text(str(windows)) == text


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(st.sampled_from(["a", "Z", "\r", "\n", "\r\n", "é", "☃", "𝄞", "\ufeff", " "]), max_size=40),
       bom=st.booleans(), chunk=st.integers(1, 9))
def test_chunked_reading_equals_reading_at_once(tmp_path_factory, pieces, bom, chunk):
    """Chunk boundaries may split a UTF-8 sequence or a \\r\\n pair: the ids are those of the whole text."""
    text = "".join(pieces) or "x"
    path = tmp_path_factory.mktemp("chunks") / "t.txt"
    raw = (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8")
    path.write_bytes(raw)
    expected = raw.decode("utf-8-sig").replace("\r\n", "\n")     # one leading byte-order mark is dropped
    if not expected:
        with pytest.raises(TinyLMError, match="empty"):
            load_ids(str(path), chunk_bytes=chunk)
        return
    tok, ids = load_ids(str(path), chunk_bytes=chunk)
    assert tok.decode(ids) == expected and ids.dtype == np.uint8
    assert read_text(str(path)) == expected


def test_bad_byte_offset_is_exact_whatever_the_chunking(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbfab\xc3\xa9cd\xe2\x98\x83" + b"\xe2\x98" + b"xyz")
    for chunk in (1, 2, 3, 5, 64):
        with pytest.raises(TinyLMError, match="byte 0xe2 at offset 12 "):
            load_ids(str(path), chunk_bytes=chunk)


def test_a_file_with_one_distinct_character_trains_and_samples(tmp_path, capsys):
    path = tmp_path / "a.txt"
    path.write_text("a" * 500, encoding="utf-8")
    assert train_main(["--data", str(path), "--out_dir", str(tmp_path / "o"), *TINY]) == 0
    assert "aaaa" in capsys.readouterr().out
    assert sample_main(["--out_dir", str(tmp_path / "o"), "--start", "a", "--max_new_tokens", "5",
                        "--num_samples", "1"]) == 0
    assert capsys.readouterr().out.startswith("aaaaaa")


def test_a_file_shorter_than_a_batch_window(tmp_path, capsys):
    path = tmp_path / "short.txt"
    path.write_text("hello world", encoding="utf-8")
    assert train_main(["--data", str(path), "--out_dir", str(tmp_path / "o"), *TINY]) == 1
    one_line(capsys, "too short", "--block_size")


def test_a_large_file_is_encoded_in_chunks_into_uint8_ids(tmp_path):
    """48 MB of text: the ids are uint8, and the peak of everything allocated stays near the ids' size
    (reading it into one str and encoding through UTF-32 peaked at about 25x the file's size)."""
    path = tmp_path / "big.txt"
    line = b"To be, or not to be, that is the question:\r\n"
    with open(path, "wb") as f:
        f.write(line * (48_000_000 // len(line)))
    size = os.path.getsize(path)
    tracemalloc.start()
    try:
        tok, ids = load_ids(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ids.dtype == np.uint8 and len(ids) == size - size // len(line)      # \r\n -> \n
    assert tok.decode(ids[:len(line) - 1]) == line.decode().replace("\r\n", "\n")
    assert peak < 1.1 * len(ids) + (24 << 20), peak / 1e6


# ----------------------------------------------------------------------------- where output goes


@pytest.mark.parametrize("kind", ["under a file", "is a file"])
def test_an_out_dir_that_cannot_be_written_is_reported_before_training(tmp_path, capsys, kind):
    blocker = tmp_path / "file.txt"
    blocker.write_text("I am a file")
    out = blocker / "run" if kind == "under a file" else blocker
    data = tmp_path / "t.txt"
    data.write_text("x" * 1000)
    assert train_main(["--data", str(data), "--out_dir", str(out), *TINY]) == 1
    one_line(capsys, "cannot write to --out_dir", str(out))


# ----------------------------------------------------------------------------- config that cannot work


@pytest.mark.parametrize("flags,words", [
    (["--n_embd", "0"], ["--n_embd"]),
    (["--n_head", "0"], ["--n_head"]),
    (["--block_size", "-8"], ["--block_size"]),
    (["--n_layer", "-1"], ["--n_layer"]),
    (["--n_embd", "10", "--n_head", "4"], ["--n_embd", "--n_head", "divisible"]),
    (["--batch_size", "0"], ["--batch_size"]),
    (["--eval_interval", "0"], ["--eval_interval"]),
    (["--eval_iters", "0"], ["--eval_iters"]),
    (["--max_iters", "-1"], ["--max_iters"]),
    (["--learning_rate", "nan"], ["--learning_rate"]),
    (["--learning_rate", "-1"], ["--learning_rate"]),
    (["--grad_clip", "inf"], ["--grad_clip"]),
    (["--beta2", "1"], ["--beta2"]),
    (["--dropout", "-0.1"], ["--dropout"]),
    (["--seed", "-1"], ["--seed"]),
    (["--encoding_errors", "ignore"], ["--encoding_errors"]),
])
def test_train_config_that_cannot_work_names_the_flag(tmp_path, capsys, flags, words):
    data = tmp_path / "t.txt"
    data.write_text("x" * 1000)
    assert train_main(["--data", str(data), "--out_dir", str(tmp_path / "o"), *TINY, *flags]) == 1
    one_line(capsys, *words)
    assert not (tmp_path / "o" / "ckpt.npz").exists()
    assert not (tmp_path / "o").exists()                 # refused before any folder is made


@pytest.mark.parametrize("flags,words", [
    (["--top_k", "0"], ["--top_k"]), (["--top_k", "-3"], ["--top_k"]),
    (["--top_p", "0"], ["--top_p"]), (["--top_p", "1.01"], ["--top_p"]), (["--top_p", "nan"], ["--top_p"]),
    (["--temperature", "-0.5"], ["--temperature"]), (["--temperature", "nan"], ["--temperature"]),
    (["--num_samples", "0"], ["--num_samples"]), (["--max_new_tokens", "-1"], ["--max_new_tokens"]),
    (["--seed", "-5"], ["--seed"]),
])
def test_sampling_flags_that_cannot_work_name_the_flag(tmp_path, capsys, flags, words):
    assert sample_main(["--out_dir", str(tmp_path), *flags]) == 1
    one_line(capsys, *words)


def test_resume_refuses_a_block_size_the_checkpoint_does_not_support(tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text("abcdefgh " * 200)
    assert train_main(["--data", str(data), "--out_dir", str(tmp_path / "o"), *TINY]) == 0
    capsys.readouterr()
    assert train_main(["--out_dir", str(tmp_path / "o"), "--init_from", "resume", "--block_size", "16"]) == 1
    one_line(capsys, "--block_size 16", "resumed checkpoint's 8")


def test_debug_environment_variable_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TINYLM_DEBUG", "1")
    # --out_dir in tmp_path: a default model in ./out (python train.py) must not change what is refused
    assert train_main(["--data", str(tmp_path / "missing.txt"), "--out_dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: data file not found")


def test_usage_errors_are_one_line_with_status_2():
    proc = run_script("train.py", "--n_layer", "two")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--n_layer" in proc.stderr
