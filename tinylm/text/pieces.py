"""Scored pieces: the tokenizer of a llama2.c tokenizer.bin (sentencepiece's vocabulary, as run.c encodes with it).

A vocabulary of byte strings ("pieces"), each with a score. Encoding, as llama2.c's run.c does it: the id of
<s> (1) first, a space (sentencepiece's dummy prefix) when the text is not empty, each character's piece (or,
for a character with no piece of its own, one `<0xXX>` byte token per UTF-8 byte, at id byte + 3), then merge
the adjacent pair whose concatenation is a piece with the highest score, leftmost first, until none is left.
Decoding joins the pieces, `<0xXX>` as the byte it names, ids 0-2 as nothing, and reads the bytes as UTF-8.
"""
import heapq
import re

import numpy as np

from tinylm.errors import TinyLMError

UNK, BOS, EOS = 0, 1, 2          # run.c's fixed ids: <unk>, <s>, </s>
BYTE_OFFSET = 3                   # byte fallback: byte b is id b + 3
BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


class PieceTokenizer:
    """Token i is pieces[i] (bytes) with score scores[i]; see the module's docstring for encode and decode."""

    def __init__(self, pieces, scores):
        if len(pieces) != len(scores) or len(pieces) <= BOS:
            raise TinyLMError("a piece tokenizer needs one score per piece and at least 2 pieces")
        self.pieces = [bytes(p) for p in pieces]
        self.scores = np.asarray(scores, dtype=np.float32)
        self.ids = {}
        for i, p in enumerate(self.pieces):
            self.ids.setdefault(p, i)               # run.c's bsearch finds one of equal pieces; the first here
        self.dtype = np.uint16 if len(pieces) <= 65536 else np.int32
        self.byte_of = {i: int(m.group(1), 16) for i, p in enumerate(self.pieces) if (m := BYTE_PIECE.fullmatch(p))}

    @property
    def vocab_size(self):
        return len(self.pieces)

    def encode(self, text):
        """str -> ids: <s>, the dummy-prefixed text's pieces, merged by score as run.c does (a heap, not its rescans)."""
        ids = [BOS]
        if text:
            if b" " not in self.ids:
                raise TinyLMError("this tokenizer has no ' ' piece, which run.c's encoding puts before every text")
            ids.append(self.ids[b" "])
        for ch in text:
            b = ch.encode("utf-8", "surrogatepass")
            ids += [self.ids[b]] if b in self.ids else [x + BYTE_OFFSET for x in b]
        if max(ids) >= len(self.pieces):
            raise TinyLMError("text needs byte tokens (<0xXX>, ids 3-258) that this vocabulary does not have")
        return np.asarray(self._merge(ids), dtype=self.dtype)

    def _merge(self, ids):
        """Merge the best-scored pair, leftmost among equals, until no pair's concatenation is a piece."""
        nxt, prev, alive = list(range(1, len(ids) + 1)), list(range(-1, len(ids) - 1)), [True] * len(ids)
        nxt[-1] = -1
        heap = []

        def push(i):
            j = nxt[i]
            if j != -1 and (m := self.ids.get(self.pieces[ids[i]] + self.pieces[ids[j]])) is not None:
                heapq.heappush(heap, (-float(self.scores[m]), i, ids[i], ids[j], m))
        for i in range(len(ids)):
            push(i)
        while heap:
            _, i, left, right, merged = heapq.heappop(heap)
            j = nxt[i] if alive[i] else -1
            if j == -1 or ids[i] != left or ids[j] != right:
                continue                            # stale: one side has merged since this pair was pushed
            ids[i], alive[j], nxt[i] = merged, False, nxt[j]
            if nxt[j] != -1:
                prev[nxt[j]] = i
            push(i)
            if prev[i] != -1:
                push(prev[i])
        return [t for t, a in zip(ids, alive) if a]

    def decode(self, ids):
        """ids -> str: pieces joined, `<0xXX>` as its byte, <unk>, <s>, </s> as nothing (as sentencepiece decodes
        them), the bytes read as UTF-8 (bad bytes as U+FFFD)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise TinyLMError(f"token id out of range for a vocabulary of {self.vocab_size}")
        out, prev = [], None
        for i in ids.tolist():
            piece = b"" if i <= EOS else bytes([self.byte_of[i]]) if i in self.byte_of else self.pieces[i]
            if prev == BOS and piece.startswith(b" "):
                piece = piece[1:]                   # as run.c: the dummy prefix after <s> is not shown
            out.append(piece)
            prev = i
        return b"".join(out).decode("utf-8", "replace")

    def to_dict(self):
        """JSON form kept in a checkpoint (every piece is UTF-8 text: io/llama2c.py refuses others)."""
        return {"type": "pieces", "pieces": [p.decode("utf-8") for p in self.pieces],
                "scores": [float(s) for s in self.scores]}

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict) or d.get("type") != "pieces" or not isinstance(d.get("pieces"), list) \
                or not isinstance(d.get("scores"), list) or not all(isinstance(p, str) for p in d["pieces"]) \
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in d["scores"]):
            raise TinyLMError("tokenizer entry is not a piece tokenizer")
        try:
            pieces = [p.encode("utf-8") for p in d["pieces"]]
        except UnicodeEncodeError:
            raise TinyLMError("a piece tokenizer's piece is not UTF-8 text") from None
        return cls(pieces, d["scores"])
