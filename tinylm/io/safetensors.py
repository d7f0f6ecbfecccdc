"""Read and write the safetensors format with NumPy alone.

A safetensors file is::

    8 bytes     N, the header length, unsigned little-endian
    N bytes     a UTF-8 JSON object, padded with spaces:
                {"__metadata__": {str: str},            (optional)
                 name: {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
    the rest    the data region: raw little-endian tensor bytes; begin/end count from
                its first byte, and the tensors tile it with no gaps and no overlaps

There is no code in the file, only numbers and a JSON header, so reading one never
runs anything (unlike pickle). Everything the header claims is checked against the
file before any tensor is handed out.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from tinylm.atomic import atomic_write
from tinylm.errors import TinyLMError, brief
from tinylm.files import open_regular

# A header larger than this is refused before it is read (the reference
# implementation uses the same limit): a hostile length must not make us allocate.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype code -> little-endian NumPy dtype. BF16 has no NumPy dtype;
# it is read as raw uint16 and widened to float32 (see _bf16_to_float32).
_DTYPES = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
}
_CODE_OF_KIND = {(dt.kind, dt.itemsize): code for code, dt in _DTYPES.items() if code != "BF16"}


def _dtype_code(name: str, array: np.ndarray) -> str:
    """The safetensors code for a NumPy array's dtype, or TinyLMError if it has none."""
    code = _CODE_OF_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise TinyLMError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store "
                          "(use bool, (u)int8..64 or float16/32/64)")
    return code


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike,
              metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (name -> array) and optional string ``metadata`` to ``path``.

    Tensors are laid out in sorted-name order; the header is compact JSON padded with
    spaces to a multiple of 8 bytes, as the reference implementation writes it. The
    file appears atomically: it is written to a temporary file in the same folder,
    flushed and fsynced, then renamed over ``path``, so a crash never leaves half a file.
    """
    if not isinstance(tensors, dict):
        raise TinyLMError(f"save_file() expects a dict of name -> array, got {type(tensors).__name__}")
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TinyLMError("safetensors metadata must be a dict of str -> str")

    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    arrays = []
    offset = 0
    for name in sorted(tensors):
        if not isinstance(name, str):
            raise TinyLMError(f"tensor names must be strings, got {name!r}")
        if name == "__metadata__":
            raise TinyLMError("'__metadata__' is reserved and cannot name a tensor")
        array = np.asarray(tensors[name])
        code = _dtype_code(name, array)
        # The format is little-endian and C-ordered whatever the machine or the array.
        # (Not np.ascontiguousarray: it would turn a 0-d array into shape (1,).)
        array = array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)
        header[name] = {"dtype": code, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        arrays.append(array)
        offset += array.nbytes

    header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # keeps the data region 8-byte aligned

    def write(f):
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for array in arrays:
            f.write(array.reshape(-1).view(np.uint8).data)    # a byte view: no copy of the tensor

    atomic_write(path, write)


def load_file(path: str | os.PathLike, mmap: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file: returns (name -> array, metadata); metadata is {} if absent.

    With ``mmap=True`` (the default) the data region is memory-mapped and every tensor
    is a read-only view into it, so loading a large model costs no copy and pages are
    read on first touch; call ``.copy()`` to get a writable array. With ``mmap=False``
    the file is read into memory and the arrays are writable.

    BF16 tensors come back as float32: NumPy has no bfloat16, and bfloat16 is exactly
    the top 16 bits of a float32, so shifting each value left by 16 bits is lossless.
    Those tensors are copies, not views.

    Any inconsistency in the file raises TinyLMError with a one-line description.
    """
    path = os.fspath(path)
    try:
        with open_regular(path, "safetensors file") as f:      # not a FIFO or a device: they hang or never end
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise TinyLMError(f"{path}: {file_size} bytes is too short for a safetensors file")
            header_len = int.from_bytes(prefix, "little")
            if header_len > MAX_HEADER_BYTES:
                raise TinyLMError(f"{path}: header length {header_len} is absurd "
                                  f"(limit {MAX_HEADER_BYTES} bytes); not a safetensors file?")
            if header_len > file_size - 8:
                raise TinyLMError(f"{path}: header length {header_len} is larger than the "
                                  f"{file_size - 8} bytes after the length field")
            header_bytes = f.read(header_len)
            data_len = file_size - 8 - header_len
            entries, metadata = _parse_header(path, header_bytes, data_len)
            if not mmap:
                data = bytearray(data_len)              # read straight into it: one copy
                if f.readinto(data) != len(data):
                    raise TinyLMError(f"{path}: the file changed size while being read")
                region = np.frombuffer(data, dtype=np.uint8)
            elif data_len == 0:
                region = np.zeros(0, dtype=np.uint8)    # mmap cannot map zero bytes
            else:
                # Plain ndarray views of the map of the file already open (the map stays open as their .base).
                region = np.asarray(np.memmap(f, dtype=np.uint8, mode="r", offset=8 + header_len,
                                              shape=(data_len,)))
    except OSError as exc:
        raise TinyLMError(f"cannot read {path}: {exc.strerror or exc}") from None

    tensors = {}
    for name, (code, shape, begin, end) in entries.items():
        flat = region[begin:end].view(_DTYPES[code])
        tensor = flat.reshape(shape)
        if code == "BF16":
            tensor = _bf16_to_float32(tensor)
        tensors[name] = tensor
    return tensors, metadata


def _bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 values: the bits become the high half."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_header(path: str, header_bytes: bytes, data_len: int):
    """Check the header against the data region; return ({name: (code, shape, begin, end)}, metadata)."""
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise TinyLMError(f"{path}: header is not valid UTF-8") from None

    def no_duplicates(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise TinyLMError(f"{path}: header names {brief(k)} twice")
            seen.add(k)
        return dict(pairs)

    try:
        header = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise TinyLMError(f"{path}: header is not valid JSON ({exc.msg} at byte {exc.pos})") from None
    except RecursionError:
        raise TinyLMError(f"{path}: header JSON is nested too deeply") from None
    except ValueError:                # an integer of more digits than Python converts
        raise TinyLMError(f"{path}: header JSON holds a number too long to convert") from None
    if not isinstance(header, dict):
        raise TinyLMError(f"{path}: header must be a JSON object, got {type(header).__name__}")

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TinyLMError(f"{path}: __metadata__ must be an object of string values")

    entries = {}
    for name, info in header.items():
        where = f"{path}: tensor {brief(name)}"
        if not isinstance(info, dict):
            raise TinyLMError(f"{where}: entry must be an object, got {type(info).__name__}")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise TinyLMError(f"{where}: entry lacks {', '.join(missing)}")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if code not in _DTYPES:
            raise TinyLMError(f"{where}: unknown or unsupported dtype {brief(code)} "
                              f"(supported: {', '.join(_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise TinyLMError(f"{where}: shape must be a list of integers, got {brief(shape)}")
        if any(d < 0 for d in shape):
            raise TinyLMError(f"{where}: shape {brief(shape)} has a negative dimension")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise TinyLMError(f"{where}: data_offsets must be [begin, end] integers, got {brief(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise TinyLMError(f"{where}: data_offsets {brief(offsets)} must satisfy 0 <= begin <= end")
        if end > data_len:
            raise TinyLMError(f"{where}: data_offsets {brief(offsets)} go past the end of the "
                              f"{data_len}-byte data region")
        expected = math.prod(shape) * _DTYPES[code].itemsize
        if end - begin != expected:
            raise TinyLMError(f"{where}: data_offsets {brief(offsets)} span {end - begin:,} bytes, but shape "
                              f"{brief(shape)} of {code} needs {brief(expected, 40)}")
        entries[name] = (code, tuple(shape), begin, end)

    # The tensors must tile the data region exactly: sorted by position, each one
    # starts where the previous one ended, and the last ends where the file ends.
    position, previous = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin < position:
            raise TinyLMError(f"{path}: tensors {brief(previous)} and {brief(name)} overlap in the data region")
        if begin > position:
            raise TinyLMError(f"{path}: bytes {position}..{begin} of the data region belong to no tensor "
                              f"(gap before {brief(name)})")
        position, previous = end, name
    if position != data_len:
        raise TinyLMError(f"{path}: the last {data_len - position} bytes of the data region "
                          "belong to no tensor")
    return entries, metadata
