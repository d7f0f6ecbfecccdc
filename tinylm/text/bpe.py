"""Byte-level BPE tokenizer, GPT-2 compatible, written with the standard library and NumPy.

The pipeline is GPT-2's:

1. **Pre-tokenize**: cut the text into chunks with GPT-2's pattern
   ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``.
   Python's ``re`` has no ``\\p{L}``, so :func:`pretokenize` is a hand-written scanner
   that classifies characters with :mod:`unicodedata` and reproduces the regex's
   alternation order and backtracking by hand. Merges never cross a chunk boundary.
2. **Bytes to printable stand-ins**: each chunk is UTF-8 encoded and every byte is
   replaced by one of 256 printable characters (:func:`bytes_to_unicode`), so that
   ``vocab.json`` and ``merges.txt`` are plain text, exactly as in GPT-2's files.
3. **Merge**: within a chunk, repeatedly merge the adjacent pair with the lowest
   merge rank until no ranked pair is left, then look every piece up in the vocab.

Because the 256 single bytes are always in the vocabulary, any string can be
encoded, including characters never seen in training, and ``decode(encode(s)) == s``.

The vocabulary layout of a trained tokenizer follows GPT-2: ids 0..255 are the
single bytes (in the order of their stand-in characters), then one id per merge,
and the last id is ``<|endoftext|>``.
"""

from __future__ import annotations

import heapq
import json
import os
import unicodedata
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache

import numpy as np
from tqdm import tqdm

from tinylm.atomic import atomic_write_text
from tinylm.errors import TinyLMError, brief
from tinylm.files import read_json, read_regular

END_OF_TEXT = "<|endoftext|>"
MERGES_HEADER = "#version: 0.2"

# How many merged chunks the encoder remembers; text has a long tail of rare words,
# so the cache is emptied when it grows past this instead of growing forever.
_CACHE_LIMIT = 200_000


# --------------------------------------------------------------------------- bytes


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table byte -> printable stand-in character.

    Bytes that are already printable and not whitespace (``!``..``~``, ``¡``..``¬``,
    ``®``..``ÿ``) stand for themselves; the 68 others (controls, space, soft hyphen...)
    are given the characters U+0100, U+0101, ... in byte order. Hence the space byte
    is ``Ġ`` (U+0120) and the newline byte is ``Ċ`` (U+010A), as in GPT-2's files.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    table = {}
    next_free = 256
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(next_free)
            next_free += 1
    return table


@lru_cache(maxsize=None)
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of :func:`bytes_to_unicode`: stand-in character -> byte."""
    return {char: byte for byte, char in bytes_to_unicode().items()}


def base_vocab() -> dict[str, int]:
    """The 256 single-byte tokens with GPT-2's ids (stand-in characters sorted by code point)."""
    return {char: i for i, char in enumerate(sorted(bytes_to_unicode().values()))}


def _to_standins(text: str) -> str:
    """UTF-8 bytes of ``text`` written with the printable stand-ins."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in _utf8(text))


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # Only lone surrogates get here: they are not Unicode scalar values and
        # have no UTF-8 form, so there are no bytes to tokenize.
        raise TinyLMError(
            f"text contains a lone surrogate {text[exc.start]!r} at index {exc.start}, "
            "which is not valid Unicode") from None


# ------------------------------------------------------------------ pre-tokenizing

# Character classes of GPT-2's pattern.
_LETTER, _NUMBER, _SPACE, _OTHER = "L", "N", "S", "O"

# \s in the `regex` module is the Unicode White_Space property. It differs from
# str.isspace(), which also accepts the separators U+001C..U+001F.
_WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")

_CONTRACTIONS_2 = ("'s", "'t", "'m", "'d")
_CONTRACTIONS_3 = ("'re", "'ve", "'ll")


@lru_cache(maxsize=65536)
def _char_class(char: str) -> str:
    """The class of one character: letter (L*), number (N*), white space, or other."""
    if char in _WHITE_SPACE:
        return _SPACE
    category = unicodedata.category(char)
    if category[0] == "L":
        return _LETTER
    if category[0] == "N":
        return _NUMBER
    return _OTHER


def _class_string(text: str) -> str:
    """One class letter per character of ``text``, computed with one C-level translate."""
    table = {ord(c): _char_class(c) for c in set(text)}
    return text.translate(table)


def pretokenize(text: str) -> list[str]:
    """Split ``text`` into chunks exactly as GPT-2's pattern does with the ``regex`` module.

    At each position the alternatives are tried in the pattern's order:

    1. a contraction ``'s 't 're 've 'm 'll 'd`` (lower case only);
    2. an optional single space ``' '`` followed by a run of letters, or of numbers,
       or of "other" characters (neither letter, number nor white space);
    3. a run of white space that is not followed by a non-space, i.e. the run up to
       the end of the text, or the run minus its last character, which is left to
       start the next chunk (so ``"  word"`` gives ``" ", " word"``);
    4. otherwise a run of white space (a single white-space character before a word).

    Every character falls in some class, so the chunks tile the text:
    ``"".join(pretokenize(t)) == t``.
    """
    classes = _class_string(text)
    n = len(text)
    chunks = []
    i = 0
    while i < n:
        char = text[i]
        if char == "'":
            if text[i:i + 2] in _CONTRACTIONS_2:
                chunks.append(text[i:i + 2])
                i += 2
                continue
            if text[i:i + 3] in _CONTRACTIONS_3:
                chunks.append(text[i:i + 3])
                i += 3
                continue
        # ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: only the plain space U+0020
        # may lead, and only when a non-space follows it.
        run_start = i + 1 if (char == " " and i + 1 < n and classes[i + 1] != _SPACE) else i
        kind = classes[run_start]
        if kind != _SPACE:
            end = run_start + 1
            while end < n and classes[end] == kind:
                end += 1
            chunks.append(text[i:end])
            i = end
            continue
        # White space: greedy `\s+` then `(?!\S)`. If a non-space follows the run,
        # the regex backtracks one character (if it can) so the lookahead sees space.
        end = i + 1
        while end < n and classes[end] == _SPACE:
            end += 1
        if end < n and end - i > 1:
            end -= 1
        chunks.append(text[i:end])
        i = end
    return chunks


def _split_special(text: str, allow_special: bool) -> list[tuple[str, bool]]:
    """Cut ``text`` around ``<|endoftext|>``: a list of (piece, is_special)."""
    if not allow_special or END_OF_TEXT not in text:
        return [(text, False)]
    pieces = []
    for k, part in enumerate(text.split(END_OF_TEXT)):
        if k > 0:
            pieces.append((END_OF_TEXT, True))
        if part:
            pieces.append((part, False))
    return pieces


# ---------------------------------------------------------------------- tokenizer


class BPETokenizer:
    """A byte-level BPE tokenizer defined by a vocab (token string -> id) and ranked merges.

    Token strings are written with GPT-2's printable byte stand-ins, so a tokenizer
    read from GPT-2's ``vocab.json``/``merges.txt`` encodes as GPT-2 does.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        """Build from a validated vocab and merge list; use :meth:`from_dict`,
        :meth:`from_files` or :func:`train_bpe` rather than calling this directly."""
        _validate(vocab, merges)
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._id_to_bytes = [b""] * len(self.vocab)
        decode_byte = unicode_to_bytes()
        for token, i in self.vocab.items():
            self._id_to_bytes[i] = bytes(decode_byte[c] for c in token)
        self.end_of_text_id = self.vocab.get(END_OF_TEXT)
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        """Number of token ids (ids are 0..vocab_size-1)."""
        return len(self.vocab)

    @property
    def dtype(self) -> np.dtype:
        """The integer dtype of encoded arrays: uint16 if every id fits, else int32."""
        return np.dtype(np.uint16) if self.vocab_size <= 65536 else np.dtype(np.int32)

    # -- encoding

    def _merge_chunk(self, chunk: str) -> list[int]:
        """Ids of one pre-tokenized chunk: its bytes, merged lowest rank first (cached)."""
        ids = self._cache.get(chunk)
        if ids is not None:
            return ids
        parts = list(_to_standins(chunk))
        ranks = self._ranks
        while len(parts) > 1:
            best_rank, best_pair = None, None
            for pair in zip(parts, parts[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best_pair = rank, pair
            if best_pair is None:
                break
            parts = _merge_pair(parts, best_pair, best_pair[0] + best_pair[1])
        ids = [self.vocab[p] for p in parts]
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[chunk] = ids
        return ids

    def encode(self, text: str, allow_special: bool = True) -> np.ndarray:
        """Token ids of ``text`` as a 1-D array (dtype uint16, or int32 for vocabularies over 65536).

        With ``allow_special`` (the default, as Hugging Face's GPT-2 tokenizer does),
        the literal string ``<|endoftext|>`` becomes the single end-of-text id; without
        it, that string is encoded as ordinary text (as OpenAI's original encoder does).
        Both choices round-trip through :meth:`decode`.
        """
        if not isinstance(text, str):
            raise TinyLMError(f"encode() expects a str, got {type(text).__name__}")
        ids: list[int] = []
        for piece, is_special in _split_special(text, allow_special and self.end_of_text_id is not None):
            if is_special:
                ids.append(self.end_of_text_id)
                continue
            for chunk in pretokenize(piece):
                ids.extend(self._merge_chunk(chunk))
        return np.array(ids, dtype=self.dtype)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """The text of a sequence of ids. Byte sequences that are not valid UTF-8
        (e.g. half of a multi-byte character) become U+FFFD, as in GPT-2."""
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise TinyLMError(f"decode() expects a 1-D integer array, got shape {ids.shape} "
                                  f"and dtype {ids.dtype}")
            ids = ids.tolist()
        pieces = []
        table = self._id_to_bytes
        for i in ids:
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                raise TinyLMError(f"decode() expects integer ids, got {i!r}")
            if not 0 <= i < len(table):
                raise TinyLMError(f"token id {int(i)} is outside the vocabulary (0..{len(table) - 1})")
            pieces.append(table[i])
        return b"".join(pieces).decode("utf-8", errors="replace")

    # -- serialization

    def to_dict(self) -> dict:
        """A JSON-serializable description from which :meth:`from_dict` rebuilds this tokenizer."""
        return {"type": "bpe", "vocab": dict(self.vocab), "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_dict(cls, d: dict) -> "BPETokenizer":
        """Rebuild a tokenizer from :meth:`to_dict` output; raises TinyLMError if it is malformed."""
        if not isinstance(d, dict):
            raise TinyLMError(f"BPE tokenizer description must be a dict, got {type(d).__name__}")
        if d.get("type") != "bpe":
            raise TinyLMError(f"BPE tokenizer description has type {brief(d.get('type'))}, expected 'bpe'")
        for key in ("vocab", "merges"):
            if key not in d:
                raise TinyLMError(f"BPE tokenizer description lacks the '{key}' entry")
        merges = d["merges"]
        if not isinstance(merges, list):
            raise TinyLMError("BPE tokenizer 'merges' must be a list of [left, right] pairs")
        pairs = []
        for k, m in enumerate(merges):
            if not (isinstance(m, (list, tuple)) and len(m) == 2):
                raise TinyLMError(f"BPE merge #{k} must be a [left, right] pair, got {brief(m)}")
            pairs.append((m[0], m[1]))
        return cls(d["vocab"], pairs)

    @classmethod
    def from_files(cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike) -> "BPETokenizer":
        """Read GPT-2's ``vocab.json`` (token -> id) and ``merges.txt`` (one ``left right`` per line).

        Both are read only from regular files (files.py), and the JSON's depth is bounded.
        """
        vocab = read_json(vocab_path, "vocab file")
        try:
            data = read_regular(merges_path, "merges file")
        except OSError as exc:
            raise TinyLMError(f"cannot read merges file {merges_path}: {exc.strerror}") from None
        try:
            lines = data.decode("utf-8").split("\n")
        except UnicodeDecodeError as exc:
            raise TinyLMError(f"merges file {merges_path} is not valid UTF-8: {exc}") from None
        merges = []
        for line_no, line in enumerate(lines, start=1):
            line = line.removesuffix("\r")
            if not line or (line_no == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise TinyLMError(f"{merges_path}, line {line_no}: expected 'left right', got {brief(line)}")
            merges.append((parts[0], parts[1]))
        return cls(vocab, merges)

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``vocab.json`` and ``merges.txt`` in GPT-2's format into ``folder`` (created if needed)."""
        os.makedirs(folder, exist_ok=True)
        vocab_text = json.dumps(self.vocab, ensure_ascii=False, separators=(",", ":"))
        merges_text = "\n".join([MERGES_HEADER] + [f"{a} {b}" for a, b in self.merges]) + "\n"
        atomic_write_text(os.path.join(folder, "vocab.json"), vocab_text)
        atomic_write_text(os.path.join(folder, "merges.txt"), merges_text)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)})"


def _merge_pair(parts: list, pair: tuple, merged) -> list:
    """Replace every occurrence of ``pair`` in ``parts``, scanning left to right
    without overlaps (so ``a a a`` with pair ``(a, a)`` gives ``aa a``)."""
    left, right = pair
    out = []
    i, n = 0, len(parts)
    while i < n:
        if i + 1 < n and parts[i] == left and parts[i + 1] == right:
            out.append(merged)
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return out


def _validate(vocab, merges) -> None:
    """Raise TinyLMError unless vocab and merges describe a usable byte-level BPE."""
    if not isinstance(vocab, dict) or not vocab:
        raise TinyLMError("BPE vocab must be a non-empty dict from token string to id")
    standins = unicode_to_bytes()
    seen_ids = set()
    for token, i in vocab.items():
        if not isinstance(token, str) or not token:
            raise TinyLMError(f"BPE vocab has a token that is not a non-empty string: {brief(token)}")
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise TinyLMError(f"BPE vocab gives token {brief(token)} the id {brief(i)}; ids must be integers >= 0")
        if i in seen_ids:
            raise TinyLMError(f"BPE vocab gives id {i} to more than one token")
        seen_ids.add(i)
        bad = next((c for c in token if c not in standins), None)
        if bad is not None:
            raise TinyLMError(f"BPE vocab token {brief(token)} contains {brief(bad)}, "
                              "which is not one of GPT-2's byte stand-in characters")
    if max(seen_ids) != len(vocab) - 1:
        raise TinyLMError(f"BPE vocab ids must be exactly 0..{len(vocab) - 1}, "
                          f"but the largest is {max(seen_ids)}")
    missing = [c for c in standins if c not in vocab]
    if missing:
        raise TinyLMError(f"BPE vocab lacks {len(missing)} of the 256 single-byte tokens "
                          f"(e.g. {missing[0]!r}), so some text could not be encoded")
    if not isinstance(merges, list):
        raise TinyLMError("BPE merges must be a list of (left, right) pairs")
    for k, (left, right) in enumerate(merges):
        if not (isinstance(left, str) and isinstance(right, str)):
            raise TinyLMError(f"BPE merge #{k} must be a pair of strings, got ({brief(left)}, {brief(right)})")
        # Encoding looks every piece up in the vocab, so both halves and the result must be there.
        for part in (left, right, left + right):
            if part not in vocab:
                raise TinyLMError(f"BPE merge #{k} ({brief(left)}, {brief(right)}) uses or makes a token "
                                  f"not in the vocab: {brief(part)}")


# ----------------------------------------------------------------------- training


def train_bpe(text: str, vocab_size: int, verbose: bool = False) -> BPETokenizer:
    """Learn a byte-level BPE of ``vocab_size`` tokens from ``text``.

    The vocab is 256 single bytes + the learned merges + ``<|endoftext|>`` (last id),
    so ``vocab_size`` must be at least 257; it gives ``vocab_size - 257`` merges.

    Each step merges the most frequent adjacent pair, counted inside pre-tokenized
    chunks (never across them) and weighted by how often each chunk occurs.
    Ties are broken by the pair's bytes: the smaller left token's bytes first, then
    the smaller right token's bytes (plain ``bytes`` comparison). Training stops
    early, with a smaller vocab, if the text runs out of pairs.

    A pair whose merged bytes are already a token (``a+bc`` when ``ab+c`` exists)
    would be skipped: ``vocab.json`` cannot give one string two ids, and keeping every
    merge's result new means the encoder (lowest rank first) reproduces exactly the
    split that training arrived at. This is a safety net; it never fired on Tiny
    Shakespeare (5000 merges) nor on 200,000 random small texts.

    ``<|endoftext|>`` in ``text`` separates documents and is not learned from.

    Speed: pairs are counted once over the unique chunks, and after each merge only
    the chunks containing the merged pair are updated, along with the counts of the
    pairs they contain; the next best pair comes from a heap with lazy deletion.
    """
    if not isinstance(text, str):
        raise TinyLMError(f"train_bpe() expects the text as a str, got {type(text).__name__}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise TinyLMError(f"vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < 257:
        raise TinyLMError(f"vocab_size must be at least 257 (256 byte tokens + <|endoftext|>), "
                          f"got {vocab_size}")
    vocab_size = int(vocab_size)

    vocab = base_vocab()
    token_bytes = [b""] * 256  # id -> bytes, grows with each merge
    for char, i in vocab.items():
        token_bytes[i] = bytes([unicode_to_bytes()[char]])
    byte_to_id = {b[0]: i for i, b in enumerate(token_bytes)}
    known_bytes = set(token_bytes)

    chunk_counts: Counter[str] = Counter()
    for piece, is_special in _split_special(text, True):
        if not is_special:
            chunk_counts.update(pretokenize(piece))
    words = [[byte_to_id[b] for b in _utf8(chunk)] for chunk in chunk_counts]
    freqs = list(chunk_counts.values())

    pair_counts: Counter[tuple[int, int]] = Counter()
    pair_words: dict[tuple[int, int], set[int]] = {}
    for w, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            pair_words.setdefault(pair, set()).add(w)

    def heap_entry(pair):
        # heapq pops the smallest: highest count first, then smallest bytes.
        return (-pair_counts[pair], token_bytes[pair[0]], token_bytes[pair[1]], pair)

    heap = [heap_entry(p) for p in pair_counts]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    target = vocab_size - 1  # the last id is reserved for <|endoftext|>
    progress = tqdm(total=target - 256, desc="BPE merges", unit="merge", disable=not verbose)
    while len(token_bytes) < target and heap:
        neg_count, left_bytes, right_bytes, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count:
            continue  # stale entry: the pair's count changed and a fresher entry exists
        merged_bytes = left_bytes + right_bytes
        if merged_bytes in known_bytes:
            continue  # would duplicate an existing token; skip this pair for good
        new_id = len(token_bytes)
        token_bytes.append(merged_bytes)
        known_bytes.add(merged_bytes)
        merges.append(pair)

        changed = set()
        for w in pair_words.pop(pair, ()):
            word = words[w]
            new_word = _merge_pair(word, pair, new_id)
            if len(new_word) == len(word):
                continue  # stale index: an earlier merge already consumed the pair here
            freq = freqs[w]
            for p in zip(word, word[1:]):
                pair_counts[p] -= freq
                changed.add(p)
            for p in zip(new_word, new_word[1:]):
                pair_counts[p] += freq
                changed.add(p)
                pair_words.setdefault(p, set()).add(w)
            words[w] = new_word
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, heap_entry(p))
            else:
                del pair_counts[p]
        progress.update(1)
    progress.close()
    if verbose and len(token_bytes) < target:
        print(f"BPE: the text ran out of pairs after {len(merges)} merges; "
              f"vocab_size is {len(token_bytes) + 1}, not {vocab_size}")

    to_standins = bytes_to_unicode()
    id_to_token = ["".join(to_standins[b] for b in tb) for tb in token_bytes]
    final_vocab = {token: i for i, token in enumerate(id_to_token)}
    final_vocab[END_OF_TEXT] = len(final_vocab)
    merge_strings = [(id_to_token[a], id_to_token[b]) for a, b in merges]
    return BPETokenizer(final_vocab, merge_strings)
