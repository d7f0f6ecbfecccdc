"""Tests of the NumPy safetensors reader/writer: round trips and hostile files."""

import json
import os

import numpy as np
import pytest

from tinylm.errors import TinyLMError
from tinylm.io.safetensors import load_file, save_file


def sample_tensors():
    rng = np.random.default_rng(0)
    return {
        "transformer.wte.weight": rng.standard_normal((5, 3)).astype(np.float32),
        "half": rng.standard_normal((2, 2, 2)).astype(np.float16),
        "double": rng.standard_normal(7),
        "steps": np.array([1, -2, 3**30], dtype=np.int64),
        "i32": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
        "bytes": np.arange(11, dtype=np.uint8),  # odd length: later tensors start unaligned
        "mask": np.array([[True, False, True]]),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "empty_too": np.zeros((3, 0), dtype=np.int64),
        "i8": np.array([-128, 127], dtype=np.int8),
        "u16": np.array([65535], dtype=np.uint16),
        "i16": np.array([-32768], dtype=np.int16),
        "u32": np.array([2**32 - 1], dtype=np.uint32),
        "u64": np.array([2**64 - 1], dtype=np.uint64),
    }


def assert_same(loaded, original):
    assert sorted(loaded) == sorted(original)
    for name, array in original.items():
        assert loaded[name].dtype == array.dtype, name
        assert loaded[name].shape == array.shape, name
        assert np.array_equal(loaded[name], array), name


@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip(tmp_path, mmap):
    tensors = sample_tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "np", "step": "12", "ünï": "cödé"})
    loaded, metadata = load_file(path, mmap=mmap)
    assert_same(loaded, tensors)
    assert metadata == {"format": "np", "step": "12", "ünï": "cödé"}
    assert all(type(a) is np.ndarray for a in loaded.values())
    assert all(a.flags.writeable != mmap for a in loaded.values())


def test_round_trip_awkward_layouts(tmp_path):
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    tensors = {"fortran": np.asfortranarray(base), "strided": base[::2, ::3],
               "big_endian": base.astype(">f4"), "transposed": base.T}
    save_file(tensors, tmp_path / "a.safetensors")
    loaded, metadata = load_file(tmp_path / "a.safetensors")
    assert metadata == {}
    for name, array in tensors.items():
        assert np.array_equal(loaded[name], array) and loaded[name].shape == array.shape
    assert loaded["big_endian"].dtype == np.dtype("<f4")


def test_empty_file_round_trip(tmp_path):
    save_file({}, tmp_path / "none.safetensors")
    assert load_file(tmp_path / "none.safetensors") == ({}, {})


def test_layout_is_the_reference_layout(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"b": np.ones(3, np.float32), "a": np.zeros((1, 2), np.float32)}, path, {"k": "v"})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header = raw[8:8 + n]
    assert header == header.rstrip(b" ") + b" " * (len(header) - len(header.rstrip(b" ")))
    parsed = json.loads(header)
    assert parsed["a"] == {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]}   # sorted by name
    assert parsed["b"] == {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]}
    assert len(raw) == 8 + n + 20
    assert raw[8 + n:8 + n + 8] == np.zeros(2, "<f4").tobytes()


def test_bf16_is_widened_to_float32(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 0.0, np.inf], dtype=np.float32)  # exact in bf16
    raw_bf16 = (values.view(np.uint32) >> 16).astype("<u2")
    path = tmp_path / "bf16.safetensors"
    write_raw(path, {"w": {"dtype": "BF16", "shape": [5], "data_offsets": [0, 10]}}, raw_bf16.tobytes())
    loaded, _ = load_file(path)
    assert loaded["w"].dtype == np.float32
    assert np.array_equal(loaded["w"], values)


def test_save_is_atomic_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"x": np.ones(2)}, path)
    with pytest.raises(TinyLMError, match="dtype"):
        save_file({"x": np.ones(2), "y": np.array(["text"])}, path)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]
    assert np.array_equal(load_file(path)[0]["x"], np.ones(2))  # the old file is intact


@pytest.mark.parametrize("tensors, metadata, message", [
    ({"z": np.array([1 + 2j])}, None, "dtype"),
    ({"o": np.array([object()])}, None, "dtype"),
    ({"__metadata__": np.ones(1)}, None, "reserved"),
    ({1: np.ones(1)}, None, "names"),
    ({"x": np.ones(1)}, {"k": 1}, "metadata"),
    ({"x": np.ones(1)}, ["k"], "metadata"),
])
def test_save_refuses_what_the_format_cannot_hold(tmp_path, tensors, metadata, message):
    with pytest.raises(TinyLMError, match=message):
        save_file(tensors, tmp_path / "bad.safetensors", metadata)


# ------------------------------------------------------------------ hostile files

def write_raw(path, header, data=b"", header_len=None, pad=True):
    """Write a file by hand, with whatever header (dict or raw bytes) and data we like."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    if pad:
        body += b" " * (-len(body) % 8)
    length = len(body) if header_len is None else header_len
    path.write_bytes(length.to_bytes(8, "little") + body + data)
    return path


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def hostile(tmp_path, header, data=b"\0" * 8, **kwargs):
    return write_raw(tmp_path / "hostile.safetensors", header, data, **kwargs)


def test_control_file_is_fine(tmp_path):
    loaded, _ = load_file(hostile(tmp_path, {"a": F32x2}))
    assert loaded["a"].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("header, data, kwargs, message", [
    # header length
    ({"a": F32x2}, b"\0" * 8, {"header_len": 10_000}, "larger than"),
    ({"a": F32x2}, b"\0" * 8, {"header_len": 200_000_000}, "absurd"),
    ({"a": F32x2}, b"\0" * 8, {"header_len": 2**64 - 1}, "absurd"),
    # header content
    (b"{not json", b"", {}, "not valid JSON"),
    (b"\xff\xfe{}", b"", {}, "UTF-8"),
    (b"[1, 2]", b"", {}, "JSON object"),
    (b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},'
     b' "a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}', b"", {}, "twice"),
    (b"[" * 100_000 + b"]" * 100_000, b"", {}, "JSON"),
    ({"__metadata__": {"k": 1}, "a": F32x2}, b"\0" * 8, {}, "__metadata__"),
    ({"__metadata__": "v", "a": F32x2}, b"\0" * 8, {}, "__metadata__"),
    ({"a": [1, 2]}, b"\0" * 8, {}, "must be an object"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, {}, "lacks data_offsets"),
    # dtype
    ({"a": {**F32x2, "dtype": "F128"}}, b"\0" * 8, {}, "unknown or unsupported dtype 'F128'"),
    ({"a": {**F32x2, "dtype": "f32"}}, b"\0" * 8, {}, "dtype"),
    ({"a": {**F32x2, "dtype": 3}}, b"\0" * 8, {}, "dtype"),
    # shape
    ({"a": {**F32x2, "shape": [-2]}}, b"\0" * 8, {}, "negative"),
    ({"a": {**F32x2, "shape": [-1, -2]}}, b"\0" * 8, {}, "negative"),
    ({"a": {**F32x2, "shape": [2.0]}}, b"\0" * 8, {}, "list of integers"),
    ({"a": {**F32x2, "shape": [True, 2]}}, b"\0" * 8, {}, "list of integers"),
    ({"a": {**F32x2, "shape": "2"}}, b"\0" * 8, {}, "list of integers"),
    # offsets against shape and file
    ({"a": {**F32x2, "shape": [3]}}, b"\0" * 8, {}, "needs 12"),
    ({"a": {**F32x2, "shape": [2**62, 2**62]}}, b"\0" * 8, {}, "needs"),
    ({"a": {**F32x2, "data_offsets": [0, 16], "shape": [4]}}, b"\0" * 8, {}, "past the end"),
    ({"a": {**F32x2, "data_offsets": [8, 0]}}, b"\0" * 8, {}, "begin <= end"),
    ({"a": {**F32x2, "data_offsets": [-8, 0]}}, b"\0" * 8, {}, "begin <= end"),
    ({"a": {**F32x2, "data_offsets": [0]}}, b"\0" * 8, {}, "begin, end"),
    ({"a": {**F32x2, "data_offsets": [0.0, 8.0]}}, b"\0" * 8, {}, "begin, end"),
    # coverage of the data region
    ({"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}}, b"\0" * 12, {}, "overlap"),
    ({"a": F32x2, "b": F32x2}, b"\0" * 8, {}, "overlap"),
    ({"a": {**F32x2, "data_offsets": [4, 12]}}, b"\0" * 12, {}, "belong to no tensor"),
    ({"a": F32x2, "b": {**F32x2, "data_offsets": [12, 20]}}, b"\0" * 20, {}, "gap before 'b'"),
    ({"a": F32x2}, b"\0" * 9, {}, "last 1 bytes"),
])
def test_hostile_files_raise_one_clear_error(tmp_path, mmap, header, data, kwargs, message):
    path = hostile(tmp_path, header, data, **kwargs)
    with pytest.raises(TinyLMError, match=message) as info:
        load_file(path, mmap=mmap)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("raw", [b"", b"\1\0\0", b"\0" * 7])
def test_too_short_files(tmp_path, raw):
    (tmp_path / "short.safetensors").write_bytes(raw)
    with pytest.raises(TinyLMError, match="too short"):
        load_file(tmp_path / "short.safetensors")


def test_missing_file(tmp_path):
    with pytest.raises(TinyLMError, match="cannot read"):
        load_file(tmp_path / "absent.safetensors")


def test_truncated_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(sample_tensors(), path)
    raw = path.read_bytes()
    for cut in (len(raw) - 1, len(raw) // 2, 12):
        path.write_bytes(raw[:cut])
        with pytest.raises(TinyLMError):
            load_file(path)


# ------------------------------------------------------- the reference implementation

def test_reference_reads_ours_and_we_read_theirs(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    tensors = sample_tensors()
    ours = tmp_path / "ours.safetensors"
    save_file(tensors, ours, metadata={"who": "tinylm"})
    assert_same(st.load_file(str(ours)), tensors)

    theirs = tmp_path / "theirs.safetensors"
    st.save_file(tensors, str(theirs), metadata={"who": "reference"})
    for mmap in (True, False):
        loaded, metadata = load_file(theirs, mmap=mmap)
        assert_same(loaded, tensors)
        assert metadata == {"who": "reference"}


def test_single_dtype_files_are_byte_identical_to_the_reference(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    # The reference orders by dtype, then name; with one dtype that is our order.
    tensors = {"b": np.ones((2, 3), np.float32), "a": np.arange(5, dtype=np.float32),
               "c": np.array(1.5, np.float32)}
    save_file(tensors, tmp_path / "ours.safetensors", {"k": "v"})
    st.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"k": "v"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
