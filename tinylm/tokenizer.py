"""The character tokenizer: one token per distinct character of the training text, in sorted order.

Encoding goes through NumPy (the text's code points, then a binary search in the
sorted vocabulary), so a large file never becomes a Python object per character.
"""
import numpy as np

from .errors import TinyLMError


def code_points(text):
    """The text's Unicode code points as a uint32 array."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def smallest_id_dtype(vocab_size):
    """uint8 for up to 256 tokens, uint16 up to 65,536, else int32: token ids stay compact."""
    if vocab_size <= 256:
        return np.uint8
    if vocab_size <= 65536:
        return np.uint16
    return np.int32


class CharTokenizer:
    """Token i is the i-th character of `chars` (a string of distinct, sorted characters)."""

    def __init__(self, chars):
        if not isinstance(chars, str) or not chars:
            raise TinyLMError("character tokenizer needs a non-empty string of characters")
        points = code_points(chars)
        if np.any(np.diff(points.astype(np.int64)) <= 0):
            raise TinyLMError("character tokenizer's characters must be distinct and sorted")
        self.chars = chars
        self._points = points
        self.dtype = smallest_id_dtype(len(chars))

    @classmethod
    def from_text(cls, text):
        """The sorted set of the text's characters."""
        if not text:
            raise TinyLMError("cannot build a tokenizer from an empty text")
        points = np.unique(code_points(text))
        return cls(points.tobytes().decode("utf-32-le", "surrogatepass"))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text):
        """str -> 1-D array of token ids (uint8/uint16). Refuses characters outside the vocabulary."""
        points = code_points(text)
        ids = np.searchsorted(self._points, points)
        ids_clipped = np.minimum(ids, len(self._points) - 1)
        unknown = self._points[ids_clipped] != points
        if np.any(unknown):
            bad = sorted({chr(c) for c in points[unknown][:1000]})
            shown = ", ".join(repr(c) for c in bad[:5])
            raise TinyLMError(f"text has character(s) the model never saw: {shown}"
                              f"{' ...' if len(bad) > 5 else ''}; use only characters of its training text")
        return ids.astype(self.dtype)

    def decode(self, ids):
        """Token ids -> str."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise TinyLMError(f"token id out of range for a vocabulary of {self.vocab_size}")
        return self._points[ids].tobytes().decode("utf-32-le", "surrogatepass")

    def to_dict(self):
        """Readable JSON form, kept in the checkpoint."""
        return {"type": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict) or d.get("type") != "char" or not isinstance(d.get("chars"), str):
            raise TinyLMError("tokenizer entry is not a character tokenizer")
        return cls(d["chars"])


def tokenizer_from_dict(d):
    """Rebuild whichever tokenizer a checkpoint names."""
    kind = d.get("type") if isinstance(d, dict) else None
    if kind == "char":
        return CharTokenizer.from_dict(d)
    if kind == "bpe":
        from .bpe import BPETokenizer
        return BPETokenizer.from_dict(d)
    raise TinyLMError(f"unknown tokenizer type {kind!r}")
