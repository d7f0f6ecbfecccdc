"""A stranger's checkpoint or model folder is only data (issue 26): every bad input or fault is one line on
stderr and a non-zero exit, never a traceback or a hang, and nothing saved is lost. One section per rule:

1. every size a file claims is checked against what the file holds before any work that grows with it;
2. checkpoints, texts, prompts and vectors are read only from regular files;
3. an interrupted export leaves the old folder or the new one, each loadable;
4. --num_samples is drawn in groups that fit, memory bounded;
5. every field of a model folder's JSON is type-checked, and its depth is bounded;
6. non-finite weights are named in one line; zero or huge ones give no RuntimeWarning noise;
8. SIGTERM, long values, layer_norm_epsilon NaN, --tokenizer against --init_from, compress's output folder.
(Rule 7, the exercise grader, is in test_exercises.py.)
"""
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings

import numpy as np
import pytest

from conftest import ROOT, SHAKESPEARE, run_script
from tinylm import atomic
from tinylm.cli import sample as sample_cli
from tinylm.cli.analyze import analyze_main
from tinylm.cli.compress import main as compress_main
from tinylm.cli.export import main as export_main
from tinylm.cli.sample import TextStream, group_size, sample_main
from tinylm.cli.train import train_main
from tinylm.core.gpt2 import GPTConfig, count_tensors, init_params, iter_param_shapes, param_shapes
from tinylm.errors import TinyLMError, brief
from tinylm.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinylm.io.hf import export_hf, import_hf
from tinylm.io.safetensors import load_file, save_file
from tinylm.text.bpe import train_bpe
from tinylm.text.char import CharTokenizer

ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def text():
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return f.read()[:30_000]


@pytest.fixture(scope="module")
def model(tmp_path_factory, text):
    """A tiny character model saved as a checkpoint, its training text, and its export (a GPT-2 folder)."""
    tmp = tmp_path_factory.mktemp("stranger")
    data = tmp / "text.txt"
    data.write_text(text, encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    config = GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=16)
    params = init_params(config, seed=0)
    ckpt = tmp / "ckpt.npz"
    save_checkpoint(str(ckpt), params, config, tok, meta={"step": 5, "train_args": {"data": str(data)}})
    folder = tmp / "hf"
    export_hf(str(ckpt), str(folder))
    return {"ckpt": str(ckpt), "folder": str(folder), "data": str(data), "params": params, "config": config,
            "tok": tok, "tmp": tmp}


def with_config_entry(folder, raw):
    """folder with `, raw` appended to its config.json's object as text (raw may be JSON no dict can hold)."""
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        body = f.read().rstrip().rstrip("}")
    with open(path, "w", encoding="utf-8") as f:
        f.write(body + ", " + raw + "}")            # a later key wins: this one replaces the good value
    return folder


def copy_folder(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    return dst


def edit_json(path, change):
    with open(path, encoding="utf-8") as f:
        value = json.load(f)
    change(value)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f)


def one_line(capsys, *words, code=None, status=1):
    """The call's stderr is one line starting with 'error: ', holding every word; stdout has no traceback."""
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    for w in words:
        assert w in lines[0], (w, lines[0])
    if code is not None:
        assert code == status, (code, err)
    return lines[0]


class Hang(Exception):
    pass


def bounded(fn, seconds=10.0):
    """(result or the TinyLMError, peak bytes allocated, seconds): fn() under a SIGALRM guard and tracemalloc."""
    def alarm(signum, frame):
        raise Hang(f"took more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        try:
            result = fn()
        except TinyLMError as e:
            result = e
        return result, tracemalloc.get_traced_memory()[1], time.perf_counter() - t0
    finally:
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def folder_size(folder):
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))


# ----------------------------------------------------------------------------- 1. claims against what the file holds


@pytest.mark.parametrize("claim, words", [
    ({"n_layer": 10 ** 8}, ["missing tensor", "n_layer=100,000,000", "1,200,000,004 tensors", "the file holds 28"]),
    ({"n_layer": 10 ** 6}, ["missing tensor", "n_layer=1,000,000"]),
    ({"n_embd": 2 ** 40, "n_head": 2 ** 20}, ["shape", "transformer.wte.weight"]),
    ({"n_positions": 10 ** 12}, ["transformer.wpe.weight"]),
    ({"vocab_size": 10 ** 12}, ["transformer.wte.weight"]),
])
def test_a_folder_claiming_more_than_it_holds_is_refused_in_its_own_time_and_memory(model, tmp_path, claim, words):
    folder = copy_folder(model["folder"], str(tmp_path / "f"))
    edit_json(os.path.join(folder, "config.json"), lambda c: c.update(claim))
    result, peak, seconds = bounded(lambda: import_hf(folder))
    assert isinstance(result, TinyLMError) and "\n" not in str(result), result
    for w in words:
        assert w in str(result), (w, str(result))
    assert peak < 4 * folder_size(folder) + (2 << 20), peak        # the file's size, not the claim's
    assert seconds < 2.0, seconds


@pytest.mark.parametrize("n_layer", [10 ** 8, 10 ** 6, 3])
def test_a_checkpoint_claiming_more_layers_than_it_holds_is_refused_in_its_own_time_and_memory(model, tmp_path,
                                                                                                n_layer):
    from test_reliability_checkpoint import with_meta
    with open(model["ckpt"], "rb") as f:
        raw = f.read()
    path = tmp_path / "claims.npz"
    path.write_bytes(with_meta(raw, lambda m: m["config"].update(n_layer=n_layer)))
    result, peak, seconds = bounded(lambda: load_checkpoint(str(path)))
    assert isinstance(result, CheckpointError), result
    assert f"n_layer={n_layer:,}" in str(result) and "arrays, but the file holds" in str(result)
    assert peak < 4 * len(raw) + (2 << 20) and seconds < 2.0, (peak, seconds)


def test_count_tensors_and_iter_param_shapes_agree_with_param_shapes_without_building_it():
    for n_layer in (1, 2, 5):
        for bias in (True, False):
            config = GPTConfig(n_layer=n_layer, n_head=2, n_embd=8, bias=bias)
            assert count_tensors(config) == len(param_shapes(config))
            assert list(iter_param_shapes(config)) == list(param_shapes(config).items())
    huge = GPTConfig(n_layer=10 ** 8, n_head=2, n_embd=8)
    assert count_tensors(huge) == 600_000_003
    assert next(iter_param_shapes(huge))[0] == "transformer.wte.weight"


def test_the_command_line_refuses_a_folder_of_a_hundred_million_layers_at_once(model, tmp_path):
    folder = copy_folder(model["folder"], str(tmp_path / "f"))
    edit_json(os.path.join(folder, "config.json"), lambda c: c.update(n_layer=10 ** 8))
    t0 = time.monotonic()
    proc = run_script("sample.py", "--init_from", folder, "--max_new_tokens", 5, env=ENV, timeout=60)
    assert proc.returncode == 1 and time.monotonic() - t0 < 30
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "n_layer=100,000,000" in lines[0]


# ----------------------------------------------------------------------------- 2. regular files only


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


def test_a_fifo_or_a_device_is_refused_where_a_checkpoint_text_prompt_or_vector_is_read(model, fifo, tmp_path,
                                                                                         capsys):
    """Each of these hung (a FIFO with no writer) or grew without end (/dev/zero) before; a 10 s alarm turns a
    hang into a failure here."""
    ckpt, data = model["ckpt"], model["data"]
    npy_fifo = str(tmp_path / "vector.npy")
    os.mkfifo(npy_fifo)
    cases = [
        (sample_main, ["--init_from", "/dev/zero"], ["/dev/zero", "character device", "regular file"]),
        (sample_main, ["--init_from", fifo], ["FIFO"]),
        (sample_main, ["--init_from", ckpt, "--start", f"FILE:{fifo}"], ["FIFO"]),
        (sample_main, ["--init_from", ckpt, "--start", "FILE:/dev/zero"], ["character device"]),
        (sample_main, ["--init_from", ckpt, "--steer", npy_fifo], ["FIFO"]),
        (analyze_main, [fifo], ["FIFO"]),
        (analyze_main, [ckpt, "--data", fifo, "--only", "probes"], ["FIFO"]),
        (analyze_main, [ckpt, "--compare", "/dev/zero"], ["character device"]),
        (compress_main, [ckpt, str(tmp_path / "c.npz"), "--calib", fifo], ["FIFO"]),
        (train_main, ["--data", fifo, "--out_dir", str(tmp_path / "o")], ["FIFO"]),
        (train_main, ["--data", data, "--init_from", fifo, "--out_dir", str(tmp_path / "p")], ["FIFO"]),
    ]
    for main, argv, words in cases:
        code, _, seconds = bounded(lambda: main(argv))
        one_line(capsys, *words, code=code)
        assert seconds < 5, (argv, seconds)


def test_a_fifo_inside_a_model_folder_is_refused_by_name(model, tmp_path):
    for name in ("config.json", "model.safetensors", "tinylm_tokenizer.json"):
        folder = copy_folder(model["folder"], str(tmp_path / name))
        os.remove(os.path.join(folder, name))
        os.mkfifo(os.path.join(folder, name))
        result, _, _ = bounded(lambda: import_hf(folder))
        assert isinstance(result, TinyLMError) and "FIFO" in str(result) and name in str(result), result


def test_links_are_followed_to_a_regular_file_and_refused_to_anything_else(model, fifo, tmp_path):
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    os.symlink(model["ckpt"], good)
    os.symlink(fifo, bad)
    assert load_checkpoint(str(good))["config"] == model["config"]
    result, _, _ = bounded(lambda: load_checkpoint(str(bad)))
    assert isinstance(result, CheckpointError) and "FIFO" in str(result)


def test_a_vector_file_claiming_two_to_the_forty_numbers_is_refused_before_allocating(model, tmp_path, capsys):
    header = repr({"descr": "<f8", "fortran_order": False, "shape": (2 ** 40,)}).encode("latin-1")
    header += b" " * (64 - (10 + len(header) + 1) % 64) + b"\n"
    path = tmp_path / "huge.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(128))
    code, peak, _ = bounded(lambda: sample_main(["--init_from", model["ckpt"], "--steer", str(path)]))
    one_line(capsys, "--steer", "expected 16 numbers", "1099511627776", code=code)
    assert peak < 16 << 20


# ----------------------------------------------------------------------------- 3. an export is replaced whole


def snapshot(folder):
    """{name: bytes} of a folder."""
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


@pytest.fixture
def two_exports(model, tmp_path, text):
    """An old export in place (a character model, plus a file of the user's), and a BPE checkpoint to export over it."""
    folder = str(tmp_path / "export")
    export_hf(model["ckpt"], folder)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("my notes\n")
    bpe = train_bpe(text[:5000], 300)
    config = GPTConfig(block_size=16, vocab_size=bpe.vocab_size, n_layer=1, n_head=2, n_embd=16, bias=True)
    new = str(tmp_path / "bpe.npz")
    save_checkpoint(new, init_params(config, seed=3), config, bpe, meta={})
    return {"folder": folder, "old": snapshot(folder), "new_ckpt": new, "new_config": config}


def old_or_new(folder, exports):
    """The folder loads and is the old export, byte for byte, or the new one; no temporary folder is left."""
    loaded = import_hf(folder)
    if loaded["config"].vocab_size == exports["new_config"].vocab_size:
        assert loaded["config"] == exports["new_config"]
        assert "tinylm_tokenizer.json" not in os.listdir(folder)    # the old tokenizer does not contradict it
        kind = "new"
    else:
        assert snapshot(folder) == exports["old"]
        kind = "old"
    assert snapshot(folder)["README.md"] == b"my notes\n"            # the user's file is kept either way
    return kind


def leftovers(folder):
    parent, base = os.path.split(folder)
    return [n for n in os.listdir(parent) if n.startswith(base + ".")]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two renames"])
def test_an_export_interrupted_while_writing_leaves_the_old_folder(two_exports, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    from tinylm.io import hf
    real = hf.save_file

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_hf(two_exports["new_ckpt"], two_exports["folder"])
    assert old_or_new(two_exports["folder"], two_exports) == "old" and not leftovers(two_exports["folder"])
    monkeypatch.setattr(hf, "save_file", real)
    export_hf(two_exports["new_ckpt"], two_exports["folder"])
    assert old_or_new(two_exports["folder"], two_exports) == "new" and not leftovers(two_exports["folder"])


def start_export(ckpt, folder, slow):
    env = dict(os.environ, PYTHONPATH=ROOT, TINYLM_TEST_SLOW_SAVE=str(slow), **ENV)
    return subprocess.Popen([sys.executable, "-m", "tinylm.export", ckpt, folder, "--force"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_saves(proc, count):
    """Read stderr until the count-th 'tinylm-test: saving' line; the name being saved, or None if it ended."""
    seen = 0
    for line in proc.stderr:
        if line.startswith("tinylm-test: saving "):
            seen += 1
            if seen == count:
                return line.split()[-1]
    return None


# The export of a BPE model saves vocab.json, merges.txt, tokenizer_config.json, model.safetensors,
# config.json, then pauses once more before the swap (the folder's own name): six moments.
@pytest.mark.parametrize("sig, moment", [(signal.SIGINT, 1), (signal.SIGINT, 5), (signal.SIGTERM, 6),
                                         (signal.SIGKILL, 4), (signal.SIGKILL, 6)])
def test_a_signal_at_any_moment_of_an_export_leaves_the_old_folder_or_the_new_one(two_exports, sig, moment):
    folder = two_exports["folder"]
    proc = start_export(two_exports["new_ckpt"], folder, slow=0.5)
    name = wait_for_saves(proc, moment)
    assert name is not None, "the export ended before that moment"
    proc.send_signal(sig)
    rest = proc.stderr.read()
    proc.wait(timeout=30)
    assert old_or_new(folder, two_exports) == "old"         # every moment is before the swap
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert leftovers(folder)                             # the half-written folder of the killed run
        export_hf(two_exports["new_ckpt"], folder)           # the next export removes it, and succeeds
        assert old_or_new(folder, two_exports) == "new"
    else:
        want = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}[sig]
        assert proc.returncode == want[0], rest
        lines = [l for l in rest.strip().splitlines() if not l.startswith("tinylm-test:")]
        assert len(lines) == 1 and lines[0].startswith(want[1]), rest
    assert not leftovers(folder)


def test_an_export_that_ends_puts_the_new_folder_in_place(two_exports):
    proc = start_export(two_exports["new_ckpt"], two_exports["folder"], slow=0.01)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert old_or_new(two_exports["folder"], two_exports) == "new" and not leftovers(two_exports["folder"])


def test_an_export_into_a_new_folder_creates_it_and_its_parents(model, tmp_path, capsys):
    target = str(tmp_path / "a" / "b" / "hf")
    assert export_main([model["ckpt"], target]) == 0
    assert import_hf(target)["config"] == model["config"] and not leftovers(target)


# ----------------------------------------------------------------------------- 4. --num_samples has a bound


def test_many_samples_are_drawn_in_groups_with_memory_bounded(model, monkeypatch, capsys):
    args = ["--init_from", model["ckpt"], "--max_new_tokens", "4", "--seed", "3", "--start", "ab"]
    config = model["config"]
    group = group_size(config, 10 ** 6, 4, True, 4)
    monkeypatch.setattr(sample_cli, "SAMPLE_MEMORY", 200_000)        # a few samples a group
    small = group_size(config, 10 ** 6, 4, True, 4)
    assert 1 < small < 40 and group > small
    code, peak, _ = bounded(lambda: sample_main([*args, "--num_samples", "3000"]), seconds=120)
    out = capsys.readouterr().out
    assert code == 0 and out.count("---------------") == 3000
    assert peak < 6 << 20, peak          # a group's worth (and the loaded model), not 3,000 samples' worth
    # the first group is the very text those samples have when they are all there is
    assert sample_main([*args, "--num_samples", str(small)]) == 0
    first = capsys.readouterr().out
    assert out.startswith(first)


def test_group_size_keeps_a_million_samples_of_the_default_model_within_the_budget():
    config = GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384)
    rows = group_size(config, 10 ** 6, 5, True, 4)
    kv_cache = 2 * config.n_layer * config.block_size * config.n_embd * 4          # a sample's keys and values
    assert 1 <= rows and rows * kv_cache <= sample_cli.SAMPLE_MEMORY
    assert group_size(config, 3, 5, True, 4) == 3            # what fits is drawn side by side, as before


def test_the_streamed_text_is_the_decoded_text_whatever_the_token_boundaries(text):
    """TextStream decodes only the tokens not yet written (linear time in the length), holding back a token
    that ends inside a multi-byte character; what it writes is what decoding every token at once gives."""
    import io
    bpe = train_bpe(text[:3000] + "naïve café 東京 🙂" * 20, 400)
    for s in ("naïve café, 東京 🙂!", "plain text", "🙂🙂🙂"):
        merged = bpe.encode(s).tolist()
        single = [bpe.vocab[c] for c in _standins(s)]            # a token a byte: characters split across tokens
        for seq in (merged, single):
            out = io.StringIO()
            stream = TextStream(bpe, out)
            for k, i in enumerate(seq):
                stream.add(i)
                assert bpe.decode(seq[:k + 1]).startswith(out.getvalue())     # never ahead, never wrong
            stream.close()
            assert out.getvalue() == s
    chars = CharTokenizer.from_text("abc")
    out = io.StringIO()
    stream = TextStream(chars, out)
    for k, i in enumerate([0, 1, 2, 1]):
        stream.add(i)
        assert out.getvalue() == "abcb"[:k + 1]                  # a character model's text appears at once


def _standins(s):
    from tinylm.text.bpe import bytes_to_unicode
    table = bytes_to_unicode()
    return [table[b] for b in s.encode("utf-8")]


# ----------------------------------------------------------------------------- 5. the JSON of a model folder


@pytest.mark.parametrize("raw, words", [
    ('"architectures": [["GPT2LMHeadModel"]]', ["architecture"]),
    ('"architectures": "GPT2LMHeadModel"', ["architecture"]),
    ('"activation_function": ["gelu_new"]', ["activation_function"]),
    ('"layer_norm_epsilon": NaN', ["layer_norm_epsilon", "nan"]),
    ('"layer_norm_epsilon": Infinity', ["layer_norm_epsilon"]),
    ('"layer_norm_epsilon": "1e-5"', ["layer_norm_epsilon"]),
    ('"layer_norm_epsilon": 1' + "0" * 400, ["layer_norm_epsilon", "characters"]),
    ('"n_inner": [64]', ["n_inner"]),
    ('"n_inner": true', ["n_inner"]),
    ('"tie_word_embeddings": "yes"', ["tie_word_embeddings", "true or false"]),
    ('"add_cross_attention": []', ["add_cross_attention", "true or false"]),
    ('"scale_attn_weights": 1', ["scale_attn_weights"]),
    ('"resid_pdrop": "0.1"', ["resid_pdrop"]),
    ('"model_type": ["gpt2"]', ["model_type"]),
    ('"n_layer": 2.0', ["n_layer", "positive integer"]),
    ('"model_type": "' + "x" * 5000 + '"', ["model_type", "5,002 characters"]),
])
def test_every_config_field_has_its_type_checked(model, tmp_path, raw, words):
    folder = with_config_entry(copy_folder(model["folder"], str(tmp_path / "f")), raw)
    result, _, _ = bounded(lambda: import_hf(folder))
    assert isinstance(result, TinyLMError), result
    msg = str(result)
    assert "\n" not in msg and len(msg) < 400, msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.fixture
def bpe_folder(tmp_path, text):
    bpe = train_bpe(text[:5000], 300)
    config = GPTConfig(block_size=16, vocab_size=bpe.vocab_size, n_layer=1, n_head=2, n_embd=16, bias=True)
    folder = str(tmp_path / "bpe")
    export_hf({"params": init_params(config, seed=1), "config": config, "tokenizer": bpe, "meta": {}}, folder)
    return folder, bpe


@pytest.mark.parametrize("tokenizer_json, words", [
    ([1], ["not a byte-level BPE"]),
    ({"model": [1]}, ["not a byte-level BPE"]),
    ({"model": {"type": ["BPE"]}}, ["not a byte-level BPE"]),
    ("merges of integers", ["merge #0", "pair of tokens"]),
    ("merges a string", ["merges are str"]),
    ("merges of triples", ["merge #0"]),
    ("ids not integers", ["ids must be integers"]),
])
def test_a_malformed_tokenizer_json_is_one_line(bpe_folder, tokenizer_json, words):
    folder, bpe = bpe_folder
    for name in ("vocab.json", "merges.txt"):
        os.remove(os.path.join(folder, name))
    good = {"model": {"type": "BPE", "vocab": bpe.vocab, "merges": [f"{a} {b}" for a, b in bpe.merges]}}
    value = {"merges of integers": lambda: {"model": {**good["model"], "merges": [[1, 2]]}},
             "merges a string": lambda: {"model": {**good["model"], "merges": "a b"}},
             "merges of triples": lambda: {"model": {**good["model"], "merges": [["a", "b", "c"]]}},
             "ids not integers": lambda: {"model": {**good["model"], "vocab": {k: str(v) for k, v in bpe.vocab.items()}}},
             }[tokenizer_json]() if isinstance(tokenizer_json, str) else tokenizer_json
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(value, f)
    with pytest.raises(TinyLMError) as e:
        import_hf(folder)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(good, f)
    assert import_hf(folder)["tokenizer"].to_dict() == bpe.to_dict()        # the good one reads


def test_json_nested_a_hundred_thousand_levels_deep_is_one_line(model, bpe_folder, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    for name in ("config.json", "tinylm_tokenizer.json"):
        folder = copy_folder(model["folder"], str(tmp_path / name))
        with open(os.path.join(folder, name), "w") as f:
            f.write(deep)
        result, _, _ = bounded(lambda: import_hf(folder))
        assert isinstance(result, TinyLMError) and "nested too deeply" in str(result), (name, result)
    folder, _ = bpe_folder
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        f.write('{"a": ' + deep + "}")
    result, _, _ = bounded(lambda: import_hf(folder))
    assert isinstance(result, TinyLMError) and "nested too deeply" in str(result), result
    # and the tinylm metadata inside model.safetensors
    folder = copy_folder(model["folder"], str(tmp_path / "meta"))
    weights = os.path.join(folder, "model.safetensors")
    tensors, metadata = load_file(weights, mmap=False)
    save_file(tensors, weights, {**metadata, "tinylm.config": deep})
    result, _, _ = bounded(lambda: import_hf(folder))
    assert isinstance(result, TinyLMError) and "nested too deeply" in str(result), result


# ----------------------------------------------------------------------------- 6. non-finite, zero and huge weights


@pytest.fixture(scope="module")
def weights(model):
    """Checkpoints of the model with every weight set to NaN, inf, 0 or 1e30 (saved past the loop's checks)."""
    out = {}
    for name, value in (("nan", np.nan), ("inf", np.inf), ("zero", 0.0), ("huge", 1e30)):
        path = str(model["tmp"] / f"{name}.npz")
        params = {k: np.full_like(v, value) for k, v in model["params"].items()}
        save_checkpoint(path, params, model["config"], model["tok"], meta={"step": 1,
                                                                         "train_args": {"data": model["data"]}})
        out[name] = path
    folder = str(model["tmp"] / "nan-folder")
    export_hf({"params": {k: np.full_like(v, np.nan) for k, v in model["params"].items()}, "config": model["config"],
               "tokenizer": model["tok"], "meta": {}}, folder)
    out["nan-folder"] = folder
    return out


@pytest.mark.parametrize("kind", ["nan", "inf", "nan-folder"])
def test_non_finite_weights_are_named_in_one_line_by_every_command(model, weights, tmp_path, capsys, kind):
    path = weights[kind]
    what = "inf" if kind == "inf" else "NaN"
    runs = [
        (sample_main, ["--init_from", path]),
        (analyze_main, [path, "--no-progress"]),
        (analyze_main, [model["ckpt"], "--compare", path, "--no-progress"]),
        (compress_main, [path, str(tmp_path / "c.npz"), "--no_progress"]),
        (train_main, ["--init_from", path, "--data", model["data"], "--out_dir", str(tmp_path / "ft"),
                      "--lora_rank", "2", "--lora_init", "pissa", "--max_iters", "2", "--progress", "false"]),
    ]
    for main, argv in runs:
        code = main(argv)
        one_line(capsys, "transformer.wte.weight", what, "not finite", code=code)


def test_a_nan_steering_vector_is_one_line(model, tmp_path, capsys):
    path = tmp_path / "nan.npy"
    vector = np.ones(model["config"].n_embd)
    vector[3] = np.nan
    np.save(path, vector)
    code = sample_main(["--init_from", model["ckpt"], "--steer", str(path)])
    one_line(capsys, "--steer", "entry 3 is nan", "finite", code=code)


def quiet(fn):
    """fn()'s result, with every warning it raised recorded: none may be a RuntimeWarning (or any other)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
    return result


def test_zero_weights_sample_analyze_and_compress_without_warnings(weights, tmp_path, capsys):
    path = weights["zero"]
    assert quiet(lambda: sample_main(["--init_from", path, "--max_new_tokens", "20"])) == 0
    assert quiet(lambda: analyze_main([path, "--no-progress", "--only", "spectra,lowrank,probes"])) == 0
    out = capsys.readouterr().out
    assert "median alpha of whole matrices -" in out
    assert quiet(lambda: compress_main([path, str(tmp_path / "c.npz"), "--no_progress", "--eval_tokens", "256"])) == 0
    assert "Warning" not in capsys.readouterr().err


def test_weights_of_1e30_analyze_quietly_and_sampling_says_they_overflow(weights, capsys):
    path = weights["huge"]
    code = quiet(lambda: sample_main(["--init_from", path, "--max_new_tokens", "20"]))
    one_line(capsys, "logits are not finite", "largest |weight| is 1e+30", code=code)
    assert quiet(lambda: analyze_main([path, "--no-progress", "--only", "spectra,lowrank"])) == 0
    assert "low rank:" in capsys.readouterr().out
    # --no_cache runs the layered forward, which centres before squaring: those numbers stay finite
    assert quiet(lambda: sample_main(["--init_from", path, "--max_new_tokens", "5", "--no_cache",
                                      "--num_samples", "1"])) == 0


# ----------------------------------------------------------------------------- 8. the smaller ones


@pytest.mark.parametrize("command", ["compress", "analyze"])
def test_sigterm_ends_compress_and_analyze_in_one_line_leaving_no_file(model, tmp_path, command):
    """SIGTERM while the output is being written (aimed with the slow-save hook): exit 143, one line, and no
    output or temporary file is left behind."""
    env = dict(os.environ, PYTHONPATH=ROOT, TINYLM_TEST_SLOW_SAVE="5", **ENV)
    if command == "compress":
        out = tmp_path / "small.npz"
        argv = ["-m", "tinylm.compress", model["ckpt"], str(out), "--method", "svd", "--no_progress"]
        written = lambda: os.listdir(tmp_path)
    else:
        out = tmp_path / "report"
        argv = [os.path.join(ROOT, "analyze.py"), model["ckpt"], "--only", "spectra", "--no-progress", "--report",
                str(out)]
        written = lambda: os.listdir(out)
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert wait_for_saves(proc, 1) is not None
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=30) == 143
    lines = rest.strip().splitlines()
    assert lines == ["terminated (SIGTERM)"], rest
    assert not [n for n in written() if n.endswith(".tmp") or n in ("small.npz", "metrics.json")], written()


def test_a_version_of_five_thousand_digits_gives_a_short_line(model, tmp_path):
    from test_reliability_checkpoint import members, rezip
    folder = copy_folder(model["folder"], str(tmp_path / "f"))
    weights = os.path.join(folder, "model.safetensors")
    tensors, metadata = load_file(weights, mmap=False)
    save_file(tensors, weights, {**metadata, "tinylm.version": "9" * 5000})
    with pytest.raises(TinyLMError) as e:
        import_hf(folder)
    assert "version" in str(e.value) and len(str(e.value)) < 300, len(str(e.value))
    with open(model["ckpt"], "rb") as f:
        raw = f.read()
    entries = members(raw)
    meta = json.loads(np.load(io.BytesIO(entries["meta.json.npy"])).tobytes())
    for digits in (4000, 5000):        # a JSON integer Python converts, and one it refuses to
        text = json.dumps({**meta, "version": "@@"}).replace('"@@"', "9" * digits)
        buf = io.BytesIO()
        np.save(buf, np.frombuffer(text.encode(), dtype=np.uint8))
        path = tmp_path / f"v{digits}.npz"
        path.write_bytes(rezip({**entries, "meta.json.npy": buf.getvalue()}))
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(str(path))
        assert "\n" not in str(e.value) and len(str(e.value)) < 300, (digits, len(str(e.value)))


def test_brief_cuts_a_long_value():
    assert brief("abc") == "'abc'"
    long = brief("x" * 5000)
    assert len(long) < 120 and long.endswith("(5,002 characters)")


def test_init_from_a_bpe_model_with_tokenizer_char_is_refused(bpe_folder, model, tmp_path, capsys):
    folder, bpe = bpe_folder
    for source in (folder, ):
        code = train_main(["--init_from", source, "--tokenizer", "char", "--data", model["data"],
                           "--out_dir", str(tmp_path / "ft"), "--max_iters", "1"])
        one_line(capsys, "--tokenizer char", "bpe tokenizer", code=code)
    code = train_main(["--init_from", model["ckpt"], "--tokenizer", "bpe", "--data", model["data"],
                       "--out_dir", str(tmp_path / "ft2"), "--max_iters", "1"])
    one_line(capsys, "--tokenizer bpe", "char tokenizer", code=code)
    # resuming a BPE run with --tokenizer char: the same line, from the checkpoint's metadata
    run = tmp_path / "run"
    run.mkdir()
    config = GPTConfig(block_size=16, vocab_size=bpe.vocab_size, n_layer=1, n_head=2, n_embd=16)
    save_checkpoint(str(run / "ckpt.npz"), init_params(config), config, bpe, meta={"step": 1})
    code = train_main(["--init_from", "resume", "--out_dir", str(run), "--tokenizer", "char"])
    one_line(capsys, "--tokenizer char", "bpe tokenizer", code=code)


def test_compress_creates_the_output_folder_and_checks_it_before_the_work(model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out-small" / "ckpt.npz"
    assert compress_main([model["ckpt"], str(out), "--method", "svd", "--no_progress", "--eval_tokens", "0"]) == 0
    assert load_checkpoint(str(out))["meta"]["compressed"]["method"] == "svd"
    (tmp_path / "file").write_text("x")
    from tinylm.cli import compress as compress_cli

    def no_work(*a, **kw):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(compress_cli, "load_any", no_work)
    capsys.readouterr()
    code = compress_main([model["ckpt"], str(tmp_path / "file" / "ckpt.npz"), "--method", "svd"])
    one_line(capsys, "cannot write", "file", "not a folder", code=code)


@pytest.mark.parametrize("setting, words", [
    ({"seed": "abc"}, ["'seed'", "an integer"]),
    ({"seed": -1}, ["'seed'", "at least 0"]),
    ({"learning_rate": [1]}, ["'learning_rate'", "a finite number"]),
    ({"batch_size": 0}, ["'batch_size'", "at least 1"]),
    ({"data": 7}, ["'data'", "a string"]),
])
def test_saved_settings_that_analysis_reads_are_type_checked(model, tmp_path, capsys, setting, words):
    """analyze.py --compare-init reads the seed, the curvature the learning rates, the poster the batch size."""
    from test_reliability_checkpoint import with_meta
    with open(model["ckpt"], "rb") as f:
        raw = f.read()
    path = tmp_path / "settings.npz"
    path.write_bytes(with_meta(raw, lambda m: m["train_args"].update(setting)))
    code = analyze_main([str(path), "--compare-init", "--only", "curvature", "--no-progress"])
    one_line(capsys, "saved setting", *words, code=code)


def test_a_linear_algebra_failure_is_one_line(capsys):
    """The last guard: numbers a routine cannot handle (NaN weights are refused before any) name the routine."""
    from tinylm.cli.common import run_cli

    def fails(argv):
        np.linalg.svd(np.full((3, 3), np.nan))

    assert run_cli(fails, []) == 1
    one_line(capsys, "linear-algebra routine failed", "SVD did not converge")
