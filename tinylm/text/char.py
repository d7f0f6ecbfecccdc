"""The character tokenizer: one token per distinct character of the training text, in sorted order.

Encoding goes through NumPy (the text's code points, then a lookup table from code
point to token id), so a large file never becomes a Python object per character;
`encode_points` takes code points directly, so data.py can encode a file chunk by chunk.
"""
import numpy as np

from tinylm.errors import TinyLMError, brief
from tinylm.text.bpe import BPETokenizer
from tinylm.text.pieces import PieceTokenizer


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
        self._lut = None

    @classmethod
    def from_points(cls, points):
        """The tokenizer whose characters are these distinct code points (any integer array)."""
        points = np.unique(np.asarray(points, dtype=np.uint32))
        return cls(points.tobytes().decode("utf-32-le", "surrogatepass"))

    @classmethod
    def from_text(cls, text):
        """The sorted set of the text's characters."""
        if not text:
            raise TinyLMError("cannot build a tokenizer from an empty text")
        return cls.from_points(code_points(text))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text):
        """str -> 1-D array of token ids (uint8/uint16). Refuses characters outside the vocabulary."""
        return self.encode_points(code_points(text))

    def encode_points(self, points):
        """Code points (uint8 or uint32 array) -> token ids, through a table of at most 0x110000 entries."""
        if self._lut is None:
            self._lut = np.full(int(self._points[-1]) + 1, -1, dtype=np.int32)
            self._lut[self._points] = np.arange(len(self._points), dtype=np.int32)
        points = np.asarray(points)
        if points.size and int(points.max()) >= len(self._lut):
            ids = self._lut[np.minimum(points, len(self._lut) - 1)]
            ids[points >= len(self._lut)] = -1
        else:
            ids = self._lut[points]
        unknown = ids < 0
        if np.any(unknown):
            bad = sorted({chr(c) for c in points[unknown][:1000].tolist()})
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
        return BPETokenizer.from_dict(d)
    if kind == "pieces":
        return PieceTokenizer.from_dict(d)
    raise TinyLMError(f"unknown tokenizer type {brief(kind)}")
