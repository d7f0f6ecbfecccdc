"""Read a text file, turn it into token ids, split it, and draw random training windows.

A training file is read in chunks of CHUNK_BYTES and encoded with NumPy, never held as one
Python string: an ASCII chunk becomes its bytes as uint8 code points directly, any other chunk
is decoded by an incremental UTF-8 decoder. Token ids are kept as uint8 (up to 256 distinct
characters) or uint16, so a 200 MB ASCII file costs about 200 MB of ids and a few chunks.
"""
import codecs
import os

import numpy as np

from tinylm.errors import TinyLMError, brief
from tinylm.files import open_regular
from tinylm.text.char import CharTokenizer

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tinyshakespeare.txt")
ENCODING_ERRORS = ("strict", "replace", "bytes")
CHUNK_BYTES = 1 << 20
BOM = codecs.BOM_UTF8
CR, LF = 13, 10


def _open_data(path):
    """The text file, opened only if it is a regular file: a FIFO would hang the read and /dev/zero never end."""
    if not os.path.exists(path):
        raise TinyLMError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise TinyLMError(f"data path is a directory, not a text file: {path}")
    try:
        return open_regular(path, "data file")
    except OSError as e:
        raise TinyLMError(f"cannot read data file {path}: {e.strerror}") from None


def iter_code_points(path, errors="strict", chunk_bytes=CHUNK_BYTES):
    """The file's characters as arrays of code points, chunk by chunk (uint8 for ASCII chunks or
    errors='bytes', uint32 otherwise): a UTF-8 byte-order mark dropped, Windows line endings made \\n.

    errors: 'strict' refuses bytes that are not UTF-8 and says where the first one is;
    'replace' turns them into U+FFFD; 'bytes' reads every byte as one character
    (U+0000..U+00FF, the Latin-1 mapping), which never fails.
    """
    if errors not in ENCODING_ERRORS:
        raise TinyLMError(f"--encoding_errors must be one of {', '.join(ENCODING_ERRORS)}, got {brief(errors)}")
    with _open_data(path) as f:
        try:
            head = f.read(65536)
            if not head:
                raise TinyLMError(f"data file is empty: {path}")
            if errors == "strict" and b"\x00" in head:
                raise TinyLMError(f"data file looks binary (it has NUL bytes), not text: {path}; "
                                  f"pass --encoding_errors bytes to read it byte by byte")
            offset = len(BOM) if head.startswith(BOM) else 0
            f.seek(offset)
            decoder = None if errors == "bytes" else codecs.getincrementaldecoder("utf-8")(errors)
            carry_cr, total = False, 0
            while True:
                chunk = f.read(chunk_bytes)
                final = not chunk
                pending = decoder.getstate()[0] if decoder is not None else b""
                if decoder is None or (not pending and chunk.isascii()):
                    points = np.frombuffer(chunk, dtype=np.uint8)
                else:
                    try:
                        points = _code_points(decoder.decode(chunk, final))
                    except UnicodeDecodeError as e:
                        at = offset - len(pending) + e.start
                        raise TinyLMError(
                            f"data file is not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {at} of {path}; "
                            f"pass --encoding_errors replace (bad bytes become U+FFFD) or "
                            f"--encoding_errors bytes (one token per byte) to read it anyway") from None
                offset += len(chunk)
                if carry_cr:
                    points = np.concatenate([np.array([CR], dtype=points.dtype), points])
                carry_cr = not final and len(points) > 0 and points[-1] == CR
                if carry_cr:                  # a \r\n may straddle two chunks
                    points = points[:-1]
                if len(points) > 1:
                    crlf = (points[:-1] == CR) & (points[1:] == LF)
                    if crlf.any():
                        keep = np.ones(len(points), dtype=bool)
                        keep[:-1] = ~crlf
                        points = points[keep]
                total += len(points)
                if len(points):
                    yield points
                if final:
                    break
        except OSError as e:
            raise TinyLMError(f"cannot read data file {path}: {e.strerror or e}") from None
    if total == 0:
        raise TinyLMError(f"data file is empty: {path}")


def _code_points(text):
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _to_str(points):
    if points.dtype == np.uint8:
        return points.tobytes().decode("latin-1")
    return points.astype(np.uint32).tobytes().decode("utf-32-le", "surrogatepass")


def read_text(path, errors="strict"):
    """The file's text as one str (for prompts and small files; training uses load_ids).

    A byte-order mark is dropped and Windows line endings become \\n. errors: see iter_code_points.
    """
    return "".join(_to_str(p) for p in iter_code_points(path, errors))


def load_ids(path, errors="strict", tokenizer=None, chunk_bytes=CHUNK_BYTES):
    """(tokenizer, ids): the file encoded chunk by chunk into a uint8/uint16 array of token ids.

    Two passes over the file: the first finds the characters (unless a tokenizer is given) and
    counts them, the second encodes into one preallocated array. Peak memory is the ids plus a chunk.
    """
    seen = np.zeros(0x110000, dtype=bool) if tokenizer is None else None
    n = 0
    for points in iter_code_points(path, errors, chunk_bytes):
        n += len(points)
        if seen is not None and points.dtype == np.uint8:     # counting 256 bins is ~10x faster than scattering
            seen[:256] |= np.bincount(points, minlength=256) > 0
        elif seen is not None:
            seen[points] = True
    if tokenizer is None:
        tokenizer = CharTokenizer.from_points(np.flatnonzero(seen))
    ids = np.empty(n, dtype=tokenizer.dtype)
    pos = 0
    for points in iter_code_points(path, errors, chunk_bytes):
        if pos + len(points) > n:
            raise TinyLMError(f"data file changed while it was being read: {path}")
        ids[pos:pos + len(points)] = tokenizer.encode_points(points)
        pos += len(points)
    if pos != n:
        raise TinyLMError(f"data file changed while it was being read: {path}")
    return tokenizer, ids


def train_val_split(ids, val_fraction=0.1):
    """The first 90% of the tokens for training, the last 10% for validation (as nanoGPT)."""
    n = int(len(ids) * (1.0 - val_fraction))
    return ids[:n], ids[n:]


def check_long_enough(train_ids, val_ids, block_size):
    """Both splits need at least one window of block_size + 1 tokens (inputs and their next tokens)."""
    need = block_size + 1
    if len(train_ids) < need or len(val_ids) < need:
        total = len(train_ids) + len(val_ids)
        raise TinyLMError(f"text is too short: {total} tokens, but the 90/10 train/validation split needs "
                          f"at least {need} tokens in each part (about {need * 10} in all); "
                          f"use a longer text or a smaller --block_size")


def get_batch(ids, block_size, batch_size, rng):
    """batch_size random windows: x (B,T) and y (B,T) = x shifted by one token, as intp arrays."""
    starts = rng.integers(0, len(ids) - block_size, size=batch_size)
    offsets = starts[:, None] + np.arange(block_size + 1)
    window = ids[offsets].astype(np.intp)
    return window[:, :-1], window[:, 1:]


def encode_file(path, errors, tokenizer):
    """The file's token ids under an existing tokenizer: chunked for characters, whole text for BPE."""
    if isinstance(tokenizer, CharTokenizer):
        return load_ids(path, errors, tokenizer)[1]
    return tokenizer.encode(read_text(path, errors))
