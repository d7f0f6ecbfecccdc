"""Read a text file, turn it into token ids, split it, and draw random training windows."""
import os

import numpy as np

from .errors import TinyLMError

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "data", "tinyshakespeare.txt")


def read_text(path, errors="strict"):
    """The file's text, decoded as UTF-8 (a byte-order mark dropped, Windows line endings made \\n).

    errors: 'strict' refuses bytes that are not UTF-8 and says where the first one is;
    'replace' turns them into U+FFFD.
    """
    if not os.path.exists(path):
        raise TinyLMError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise TinyLMError(f"data path is a directory, not a text file: {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise TinyLMError(f"cannot read data file {path}: {e.strerror}") from None
    if not raw:
        raise TinyLMError(f"data file is empty: {path}")
    if b"\x00" in raw[:65536] and errors == "strict":
        raise TinyLMError(f"data file looks binary (it has NUL bytes), not text: {path}")
    try:
        text = raw.decode("utf-8-sig", errors=errors)
    except UnicodeDecodeError as e:
        raise TinyLMError(f"data file is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} of {path}; "
                          f"pass --encoding_errors replace to read it anyway") from None
    return text.replace("\r\n", "\n")


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
