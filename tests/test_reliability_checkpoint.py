"""Checkpoints from strangers: the loader takes only what it expects, and everything else is a CheckpointError.

The property test mutates real checkpoints (flipped, inserted, deleted and overwritten bytes,
truncation, the zip's size fields, and, with valid CRCs, the JSON metadata and the .npy headers)
and checks that loading either gives the very same weights and logits, or fails with the loader's
own error: never another exception, never a hang, never an allocation far beyond the file's size.
"""
import errno
import io
import json
import os
import signal
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tinylm import atomic
from tinylm.io import checkpoint as C
from tinylm.fast import model as M
from tinylm.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinylm.cli.train import train_main
from tinylm.train.args import TrainArgs
from tinylm.train.loop import train

TEXT = "the quick brown fox jumps over the lazy dog. THE END!\n" * 40


def tiny_args(tmp, out, **kw):
    data = tmp / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    base = dict(data=str(data), out_dir=str(out), n_layer=1, n_head=2, n_embd=8, block_size=8, batch_size=2,
                max_iters=3, eval_interval=2, eval_iters=1, warmup_iters=1, lr_decay_iters=3, dropout=0.1,
                sample_tokens=0, progress=False)
    base.update(kw)
    return TrainArgs(**base)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A real checkpoint written by the training loop (weights, moments, RNG states), and its logits."""
    tmp = tmp_path_factory.mktemp("ckpt")
    train(tiny_args(tmp, tmp / "out"), log=lambda *a: None)
    path = tmp / "out" / "ckpt.npz"
    raw = path.read_bytes()
    ckpt = load_checkpoint(str(path))
    idx = np.random.default_rng(0).integers(0, ckpt["config"].vocab_size, size=(2, 8))
    return {"raw": raw, "ckpt": ckpt, "idx": idx, "logits": M.forward(ckpt["params"], ckpt["config"], idx)[0]}


# ----------------------------------------------------------------------------- helpers


def members(raw):
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def rezip(entries, compress=None):
    """A zip of entries (name -> bytes) with valid CRCs; `compress` names members to deflate."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data, zipfile.ZIP_DEFLATED if compress and name in compress else zipfile.ZIP_STORED)
    return buf.getvalue()


def npy_bytes(header, payload):
    """A .npy member with a hand-written header dict and payload."""
    text = repr(header).encode("latin-1")
    pad = 64 - (10 + len(text) + 1) % 64
    text = text + b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + payload


def with_meta(raw, change):
    entries = members(raw)
    arr = np.load(io.BytesIO(entries["meta.json.npy"]))
    meta = json.loads(arr.tobytes())
    change(meta)
    buf = io.BytesIO()
    np.save(buf, np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    entries["meta.json.npy"] = buf.getvalue()
    return rezip(entries)


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang("the loader took more than 10 s")


def load_bounded(tmp_path, data, name="m.npz"):
    """Load data from a file; returns (result or the CheckpointError, peak bytes allocated while loading)."""
    path = tmp_path / name
    path.write_bytes(data)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 10.0)
    tracemalloc.start()
    try:
        try:
            result = load_checkpoint(str(path))
        except CheckpointError as e:
            result = e
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return result, peak


def check_outcome(real, result, peak, size):
    """Either the same weights and logits, or the loader's own error; memory bounded by the file's size."""
    assert peak < 4 * max(size, len(real["raw"])) + (2 << 20), (peak, size)
    if isinstance(result, CheckpointError):
        assert "\n" not in str(result)
        return "error"
    for k, p in real["ckpt"]["params"].items():
        assert np.array_equal(result["params"][k], p), k
    logits = M.forward(result["params"], result["config"], real["idx"])[0]
    assert np.array_equal(logits, real["logits"])
    return "loaded"


# ----------------------------------------------------------------------------- the cases, one by one


def test_every_listed_kind_of_bad_file_is_refused_with_one_line(real, tmp_path):
    raw = real["raw"]
    entries = members(raw)
    name = "transformer.wte.weight.npy"
    wte = real["ckpt"]["params"]["transformer.wte.weight"]
    header = {"descr": "<f4", "fortran_order": False, "shape": wte.shape}
    cases = {
        "truncated": (raw[: len(raw) * 2 // 3], "damaged"),
        "flipped byte in a weight": (raw[:2000] + bytes([raw[2000] ^ 0x40]) + raw[2001:], "damaged"),
        "missing array": (rezip({k: v for k, v in entries.items() if k != name}), "missing"),
        "extra array": (rezip({**entries, "evil.npy": entries[name]}), "unexpected"),
        "not a .npy entry": (rezip({**entries, "README": b"hi"}), "unexpected entry"),
        "wrong shape": (rezip({**entries, name: npy_bytes({**header, "shape": wte.shape[::-1]}, wte.tobytes())}),
                        "shape"),
        "wrong dtype": (rezip({**entries, name: npy_bytes({**header, "descr": "<f8"}, wte.astype("<f8").tobytes())}),
                        "dtype"),
        "big-endian": (rezip({**entries, name: npy_bytes({**header, "descr": ">f4"}, wte.astype(">f4").tobytes())}),
                       "dtype"),
        "object array (pickle)": (rezip({**entries, name: npy_bytes({**header, "descr": "|O"}, b"\x80\x04N." + wte.tobytes())}),
                                  "dtype object"),
        "absurd size in the header": (rezip({**entries, name: npy_bytes({**header, "shape": (2 ** 40, 2 ** 20)},
                                                                        wte.tobytes())}), "shape"),
        "absurd size in the config": (with_meta(raw, lambda m: m["config"].update(n_embd=2 ** 40, n_head=2 ** 20)),
                                      "implies"),
        "future format version": (with_meta(raw, lambda m: m.update(version=99)), "upgrade tinylm"),
        "foreign npz": (rezip({"weights.npy": entries[name]}), "not a tinylm"),
        "compressed member (zip bomb)": (rezip({**entries, name: npy_bytes(header, wte.tobytes() + bytes(50 << 20))},
                                               compress={name}), "compressed"),
        "bad random state": (with_meta(raw, lambda m: m["rng"]["batch"].update(bit_generator="MT19937")), "rng"),
        "step not an integer": (with_meta(raw, lambda m: m.update(step="ten")), "step"),
        "tokenizer of another size": (with_meta(raw, lambda m: m["tokenizer"].update(chars="ab")), "tokens"),
        "unknown tokenizer": (with_meta(raw, lambda m: m["tokenizer"].update(type="bpe")), "tokenizer"),
        "config that cannot work": (with_meta(raw, lambda m: m["config"].update(n_head=3)), "divisible"),
        "metadata not JSON": (rezip({**entries, "meta.json.npy": npy_bytes(
            {"descr": "|u1", "fortran_order": False, "shape": (5,)}, b"{{{{{")}), "JSON"),
        "deeply nested metadata": (rezip({**entries, "meta.json.npy": npy_bytes(
            {"descr": "|u1", "fortran_order": False, "shape": (200000,)}, b"[" * 200000)}), "JSON"),
        "empty file": (b"", "damaged"),
        "text file": (b"hello, I am not a checkpoint\n" * 50, "damaged"),
    }
    for case, (data, word) in cases.items():
        result, peak = load_bounded(tmp_path, data)
        assert isinstance(result, CheckpointError), case
        assert word in str(result) and "\n" not in str(result), (case, str(result))
        assert peak < 4 * len(data) + (2 << 20), (case, peak)


def test_the_cli_reports_a_strangers_checkpoint_in_one_line(real, tmp_path, capsys):
    path = tmp_path / "bad.npz"
    path.write_bytes(with_meta(real["raw"], lambda m: m.update(version=2)))
    from tinylm.cli.sample import sample_main
    assert sample_main(["--checkpoint", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "version 2" in err[0]


def test_resume_refuses_bad_saved_training_settings(real, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.npz").write_bytes(with_meta(real["raw"], lambda m: m["train_args"].update(batch_size="many")))
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    assert train_main(["--out_dir", str(out), "--init_from", "resume", "--data", str(tmp_path / "t.txt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch_size" in err[0]


# ----------------------------------------------------------------------------- saving on a full disk


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    train(tiny_args(tmp_path, out, max_iters=2), log=lambda *a: None)
    before = (out / "ckpt.npz").read_bytes()
    real_write = C._write_npz

    def full_disk(f, arrays):      # half the archive reaches the disk, then the disk is full
        buf = io.BytesIO()
        real_write(buf, arrays)
        f.write(buf.getvalue()[: buf.tell() // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(C, "_write_npz", full_disk)
    code = train_main(["--out_dir", str(out), "--init_from", "resume", "--max_iters", "6"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write checkpoint") and "No space left" in err[0]
    assert (out / "ckpt.npz").read_bytes() == before                # the previous checkpoint, byte for byte
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]   # and no temporary file


def test_the_named_temp_file_fallback_also_cleans_up(tmp_path, monkeypatch, real):
    """Where O_TMPFILE is unavailable the writer uses <name>.<pid>.tmp; a failure removes it,
    and a crash's leftover is removed when training next starts in that folder."""
    ck = real["ckpt"]
    path = tmp_path / "ckpt.npz"
    monkeypatch.setattr(atomic, "write_unnamed", lambda *a: False)
    save_checkpoint(str(path), ck["params"], ck["config"], ck["tokenizer"], ck["opt_state"], {"step": 1})
    before = path.read_bytes()

    def full_disk(f, arrays):
        f.write(b"PK\x03\x04" + bytes(100))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(C, "_write_npz", full_disk)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(str(path), ck["params"], ck["config"], ck["tokenizer"], ck["opt_state"], {"step": 2})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.npz"]
    (tmp_path / "ckpt.npz.4242.tmp").write_bytes(b"left by a crash")
    (tmp_path / "notes.tmp").write_bytes(b"not ours")
    from tinylm.train.start import prepare_out_dir
    prepare_out_dir(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz", "notes.tmp"]


# ----------------------------------------------------------------------------- the property


def zip_int_fields(raw):
    """Offsets of the zip's size/offset/count fields (local headers, central directory, end record)."""
    fields = []
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        for info in zf.infolist():
            h = info.header_offset
            fields += [(h + 18, 4), (h + 22, 4), (h + 26, 2), (h + 28, 2)]
    pos = raw.find(b"PK\x01\x02")
    while pos >= 0:
        fields += [(pos + 20, 4), (pos + 24, 4), (pos + 28, 2), (pos + 30, 2), (pos + 42, 4)]
        pos = raw.find(b"PK\x01\x02", pos + 4)
    end = raw.rfind(b"PK\x05\x06")
    fields += [(end + 8, 2), (end + 10, 2), (end + 12, 4), (end + 16, 4), (end + 20, 2)]
    return fields


INTERESTING = st.sampled_from([0, 1, 2, 7, 255, 65535, 2 ** 31 - 1, 2 ** 32 - 1, 10 ** 6, 10 ** 9])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)
META_PATHS = [("version",), ("step",), ("optim_t",), ("dtype",), ("best_val_loss",), ("rng",), ("rng", "batch"),
              ("rng", "batch", "state", "state"), ("config",), ("config", "n_embd"), ("config", "vocab_size"),
              ("config", "block_size"), ("config", "bias"), ("config", "dropout"), ("tokenizer",),
              ("tokenizer", "chars"), ("format",), ("train_args",), ("elapsed_s",)]


@st.composite
def byte_mutation(draw, raw):
    data = bytearray(raw)
    fields = zip_int_fields(raw)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "int", "zipfield"]))
        n = len(data)
        if kind == "flip" and n:
            i = draw(st.integers(0, n - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[draw(st.integers(0, n)):]
        elif kind == "insert":
            i = draw(st.integers(0, n))
            data[i:i] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del data[i:i + draw(st.integers(1, 64))]
        elif kind == "int" and n >= 4:
            i = draw(st.integers(0, n - 4))
            data[i:i + 4] = struct.pack("<I", draw(INTERESTING | st.integers(0, 2 ** 32 - 1)))
        elif kind == "zipfield":
            off, width = draw(st.sampled_from(fields))
            value = draw(INTERESTING) % (1 << (8 * width))
            if off + width <= len(data):
                data[off:off + width] = value.to_bytes(width, "little")
    return bytes(data)


@st.composite
def valid_crc_mutation(draw, raw):
    """Well-formed zips (valid CRCs) whose content is hostile: the JSON metadata or a .npy header changed."""
    entries = members(raw)
    if draw(st.booleans()):
        path = draw(st.sampled_from(META_PATHS))
        delete = draw(st.booleans())
        value = draw(JSON | INTERESTING)

        def change(meta):
            node = meta
            for key in path[:-1]:
                if not isinstance(node, dict) or key not in node:
                    return
                node = node[key]
            if isinstance(node, dict):
                if delete:
                    node.pop(path[-1], None)
                else:
                    node[path[-1]] = value
        return with_meta(raw, change)
    name = draw(st.sampled_from(sorted(k for k in entries if k != "meta.json.npy")))
    arr = np.load(io.BytesIO(entries[name]))
    shape = draw(st.sampled_from([arr.shape, arr.shape[::-1], (), (0,), (2 ** 31,), (2 ** 62, 2 ** 62), (10 ** 9, 8)])
                 | st.lists(st.integers(0, 2 ** 40), max_size=3).map(tuple))
    descr = draw(st.sampled_from(["<f4", ">f4", "<f8", "<i4", "|u1", "|O", "<c8", "|V4"]))
    payload = arr.tobytes()[: draw(st.integers(0, arr.nbytes))] if draw(st.booleans()) else arr.tobytes()
    entries[name] = npy_bytes({"descr": descr, "fortran_order": False, "shape": shape}, payload)
    return rezip(entries)


@settings(max_examples=int(os.environ.get("TINYLM_FUZZ_EXAMPLES", 100)), deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_checkpoints_load_identically_or_fail_with_the_loaders_error(real, tmp_path, data):
    strategy = byte_mutation(real["raw"]) if data.draw(st.integers(0, 2)) else valid_crc_mutation(real["raw"])
    mutated = data.draw(strategy)
    result, peak = load_bounded(tmp_path, mutated)
    outcome = check_outcome(real, result, peak, len(mutated))
    if os.environ.get("TINYLM_FUZZ_LOG"):
        with open(os.environ["TINYLM_FUZZ_LOG"], "a") as f:
            f.write(f"{outcome}\t{peak}\t{len(mutated)}\t{str(result)[:150] if outcome == 'error' else ''}\n")
