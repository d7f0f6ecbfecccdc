"""Tests of the byte-level BPE tokenizer: pre-tokenizer, training, encoding, files."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm.text.bpe import END_OF_TEXT, BPETokenizer, base_vocab, bytes_to_unicode, pretokenize, train_bpe
from tinylm.errors import TinyLMError

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Worked out by hand from the pattern (and checked against the `regex` module).
EXPECTED_SPLITS = {
    "Hello world": ["Hello", " world"],
    "it's I'm we'll they've you'd we're isn't": [
        "it", "'s", " I", "'m", " we", "'ll", " they", "'ve", " you", "'d", " we", "'re", " isn", "'t"],
    "IT'S": ["IT", "'", "S"],                 # contractions are lower case only
    "'sup": ["'s", "up"],                     # a contraction even at a word start
    "x 'll": ["x", " '", "ll"],               # the space takes the apostrophe, not the contraction
    "!'s": ["!'", "s"],                       # a run of punctuation swallows the apostrophe
    "''s": ["''", "s"],
    "abc123def 4567": ["abc", "123", "def", " 4567"],
    "$1,000.50": ["$", "1", ",", "000", ".", "50"],
    "hello...world ?!": ["hello", "...", "world", " ?!"],
    "a  b": ["a", " ", " b"],                 # last space of a run goes to the next word
    "a   b": ["a", "  ", " b"],
    "a\n\nb": ["a", "\n", "\n", "b"],         # only ' ' can lead a word, so the lone \n stands alone
    "x \n y": ["x", " \n", " y"],
    " \tx": [" ", "\t", "x"],
    "\t\tx": ["\t", "\t", "x"],
    "end  ": ["end", "  "],                   # a run at the end of the text stays whole
    "   ": ["   "],
    "": [],
    "café naïve": ["café", " naïve"],
    "e\u0301": ["e", "\u0301"],               # a combining accent (Mn) is neither letter nor number
    "日本語のテキスト": ["日本語のテキスト"],
    "hi 🙂👍🏽!": ["hi", " 🙂👍🏽!"],
    "½ Ⅻ ²": ["½", " Ⅻ", " ²"],               # No, Nl, No are all numbers
    "x\u00a0y": ["x", "\u00a0", "y"],         # no-break space is white space but cannot lead a word
    "a\x1cb": ["a", "\x1c", "b"],             # U+001C: str.isspace() says yes, \s says no
    "x\u3000\u3000y": ["x", "\u3000", "\u3000", "y"],
}

TRICKY = list(EXPECTED_SPLITS) + [
    "Ünïcödé ÅÄÖ ñ ß ﬁ", "🙂" * 5 + " 👨‍👩‍👧", "中文 한국어 العربية עברית",
    "tabs\tand\r\nwindows\r\nlines", "\x00\x01\x7f binary-ish", "  leading and trailing  ",
    f"two docs{END_OF_TEXT}second doc", END_OF_TEXT, "<|endoftext", "I'VE 've'S",
]


@pytest.fixture(scope="module")
def shakespeare():
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "tinylm" / "data" / "tinyshakespeare.txt"
    return path.read_text(encoding="utf-8")[:60_000]


@pytest.fixture(scope="module")
def tokenizer(shakespeare):
    return train_bpe(shakespeare, 257 + 300)


# ------------------------------------------------------------------ pre-tokenizer

@pytest.mark.parametrize("text", list(EXPECTED_SPLITS))
def test_pretokenize_matches_hand_written_splits(text):
    assert pretokenize(text) == EXPECTED_SPLITS[text]


@pytest.mark.parametrize("text", TRICKY)
def test_pretokenize_matches_gpt2_regex(text):
    regex = pytest.importorskip("regex")
    assert pretokenize(text) == regex.findall(GPT2_PATTERN, text)


def test_hand_written_splits_agree_with_regex():
    regex = pytest.importorskip("regex")
    for text, expected in EXPECTED_SPLITS.items():
        assert regex.findall(GPT2_PATTERN, text) == expected, text


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab's tdlrvem1 \t\n\u00a0\x1c.!é日🙂\u0301")), max_size=30))
def test_pretokenize_equals_regex_on_random_text(text):
    regex = pytest.importorskip("regex")
    assert pretokenize(text) == regex.findall(GPT2_PATTERN, text)


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_pretokenize_tiles_the_text(text):
    chunks = pretokenize(text)
    assert "".join(chunks) == text
    assert all(chunks)


# ------------------------------------------------------------------ byte mapping

def test_byte_mapping_is_gpt2s():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    vocab = base_vocab()
    # Ids as in GPT-2's encoder.json.
    assert vocab["!"] == 0 and vocab["ÿ"] == 187 and vocab["Ā"] == 188
    assert vocab["Ċ"] == 198 and vocab["Ġ"] == 220 and vocab["Ń"] == 255


# ------------------------------------------------------------- training, by hand

def test_hand_computed_merges():
    # "aaabdaaabac": pairs aa:4 ab:2 bd da ba ac:1      -> merge (a, a)
    # aa a b d aa a b a c: (aa,a):2 (a,b):2, tie -> b"a" < b"aa" -> merge (a, b)
    # aa ab d aa ab a c: (aa,ab):2                      -> merge (aa, ab)
    # aaab d aaab a c: all 1, smallest left bytes b"a"  -> merge (a, c)
    # aaab d aaab ac: all 1, left "aaab" twice, right b"ac" < b"d" -> merge (aaab, ac)
    tok = train_bpe("aaabdaaabac", 257 + 5)
    assert tok.merges == [("a", "a"), ("a", "b"), ("aa", "ab"), ("a", "c"), ("aaab", "ac")]
    assert tok.vocab_size == 262
    assert [tok.vocab[t] for t in ("aa", "ab", "aaab", "ac", "aaabac")] == [256, 257, 258, 259, 260]
    assert tok.vocab[END_OF_TEXT] == 261
    assert tok.encode("aaabdaaabac").tolist() == [258, tok.vocab["d"], 260]
    assert tok.encode("aaab").tolist() == [258]
    assert tok.encode("aaa").tolist() == [256, tok.vocab["a"]]  # left to right, no overlap


def test_merges_never_cross_chunks():
    # " ab" is one chunk; "ab" never meets the "." before it or the space between words
    tok = train_bpe("x. ab. ab. ab.", 257 + 10)
    for left, right in tok.merges:
        merged = left + right
        assert not ("." in merged and ("x" in merged or "b" in merged))
    assert ("Ġ", "a") in tok.merges


def test_training_stops_when_pairs_run_out():
    tok = train_bpe("ab", 1000)
    assert tok.merges == [("a", "b")]
    assert tok.vocab_size == 258


@pytest.mark.parametrize("bad", [256, 100, 0, -5, "300", 300.5, True, None])
def test_train_refuses_bad_vocab_size(bad):
    with pytest.raises(TinyLMError, match="vocab_size"):
        train_bpe("some text", bad)


def test_train_refuses_non_text():
    with pytest.raises(TinyLMError, match="str"):
        train_bpe(b"bytes", 300)


def test_training_is_deterministic(shakespeare):
    a = train_bpe(shakespeare[:20000], 400)
    b = train_bpe(shakespeare[:20000], 400)
    assert a.merges == b.merges and a.vocab == b.vocab


def test_training_compresses(tokenizer, shakespeare):
    assert tokenizer.vocab_size == 557
    ids = tokenizer.encode(shakespeare)
    assert len(ids) < 0.6 * len(shakespeare.encode())
    assert ("Ġ", "t") in tokenizer.merges[:5]


# ------------------------------------------------------------ encoding, decoding

@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids.dtype == np.uint16 and ids.ndim == 1
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids.tolist()) == text


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_round_trip_any_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode(text, allow_special=False)) == text


def test_unseen_characters_fall_back_to_bytes(tokenizer):
    text = "日本🙂"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # never seen: one token per byte
    assert tokenizer.decode(ids) == text


def test_end_of_text(tokenizer):
    eot = tokenizer.vocab_size - 1
    ids = tokenizer.encode(f"a{END_OF_TEXT}b").tolist()
    assert ids == [tokenizer.vocab["a"], eot, tokenizer.vocab["b"]]
    plain = tokenizer.encode(f"a{END_OF_TEXT}b", allow_special=False).tolist()
    assert eot not in plain and len(plain) > 3
    assert tokenizer.decode([eot]) == END_OF_TEXT


def test_partial_utf8_decodes_to_replacement(tokenizer):
    ids = tokenizer.encode("é").tolist()  # two bytes, unseen as a pair in Shakespeare
    assert len(ids) == 2
    assert tokenizer.decode(ids[:1]) == "\ufffd"


def test_decode_rejects_bad_ids(tokenizer):
    with pytest.raises(TinyLMError, match="outside"):
        tokenizer.decode([tokenizer.vocab_size])
    with pytest.raises(TinyLMError, match="outside"):
        tokenizer.decode(np.array([-1]))
    with pytest.raises(TinyLMError):
        tokenizer.decode(["a"])


def test_encode_rejects_lone_surrogate(tokenizer):
    with pytest.raises(TinyLMError, match="surrogate"):
        tokenizer.encode("a\ud800b")


def test_encoding_equals_applying_merges_in_training_order(tokenizer, shakespeare):
    # The encoder picks the lowest-ranked pair each time; that must equal applying
    # every merge, in order, to the whole chunk (how training saw it).
    def sequential(chunk):
        table = bytes_to_unicode()
        parts = [table[b] for b in chunk.encode("utf-8")]
        for left, right in tokenizer.merges:
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == left and parts[i + 1] == right:
                    out.append(left + right)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            parts = out
        return [tokenizer.vocab[p] for p in parts]

    for chunk in sorted(set(pretokenize(shakespeare[:5000]))):
        assert tokenizer.encode(chunk).tolist() == sequential(chunk), chunk


def test_large_vocab_uses_int32():
    vocab = dict(base_vocab())
    for i in range(256, 70000):  # filler tokens, enough to pass 65536 ids
        vocab["Ā" + "".join(chr(0x100 + int(d)) for d in str(i))] = i
    tok = BPETokenizer(vocab, [])
    assert tok.encode("hi").dtype == np.int32


# ------------------------------------------------------------------ serialization

def test_dict_round_trip(tokenizer):
    d = tokenizer.to_dict()
    assert d["type"] == "bpe"
    d = json.loads(json.dumps(d))
    again = BPETokenizer.from_dict(d)
    assert again.vocab == tokenizer.vocab and again.merges == tokenizer.merges
    text = "To be, or not to be: that is the question. 日本"
    assert np.array_equal(again.encode(text), tokenizer.encode(text))


def _good_dict():
    return train_bpe("aaabdaaabac", 262).to_dict()


def _break(change):
    d = json.loads(json.dumps(_good_dict()))
    change(d)
    return d


@pytest.mark.parametrize("broken, message", [
    ("not a dict", "must be a dict"),
    (_break(lambda d: d.update(type="char")), "type"),
    (_break(lambda d: d.pop("vocab")), "vocab"),
    (_break(lambda d: d.pop("merges")), "merges"),
    (_break(lambda d: d.update(merges="a a")), "merges"),
    (_break(lambda d: d["merges"].append(["a"])), "pair"),
    (_break(lambda d: d["merges"].append(["a", "zz"])), "not in the vocab"),
    (_break(lambda d: d["merges"].append(["a", "d"])), "not in the vocab"),  # "ad" is no token
    (_break(lambda d: d.update(vocab=[])), "vocab"),
    (_break(lambda d: d["vocab"].update(aa=0)), "more than one"),
    (_break(lambda d: d["vocab"].update(aa=-1)), "ids must be"),
    (_break(lambda d: d["vocab"].update(aa="256")), "ids must be"),
    (_break(lambda d: d["vocab"].update(aa=999)), r"0\.\.261"),
    (_break(lambda d: d["vocab"].pop("Ġ")), "ids must be"),
    (_break(lambda d: d["vocab"].update({"a b": 262})), "stand-in"),
])
def test_from_dict_rejects_malformed(broken, message):
    with pytest.raises(TinyLMError, match=message):
        BPETokenizer.from_dict(broken)


def test_from_dict_requires_all_bytes():
    d = _good_dict()
    vocab = {t: i for t, i in d["vocab"].items() if t != "Ġ"}
    vocab = {t: (i if i < 220 else i - 1) for t, i in vocab.items()}  # keep ids contiguous
    with pytest.raises(TinyLMError, match="single-byte"):
        BPETokenizer.from_dict({"type": "bpe", "vocab": vocab, "merges": d["merges"]})


def test_files_look_like_gpt2s(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2"
    assert lines[-1] == ""
    assert lines[1:-1] == [f"{a} {b}" for a, b in tokenizer.merges]
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["Ġ"] == 220 and vocab[END_OF_TEXT] == len(vocab) - 1


def gpt2_reference_encode(vocab_path, merges_path, text):
    """GPT-2's published algorithm, re-stated independently of tinylm.text.bpe: read the
    files, split with the regex, map bytes, merge the lowest-ranked pair until none."""
    regex = pytest.importorskip("regex")
    encoder = json.loads(open(vocab_path, encoding="utf-8").read())
    merge_lines = open(merges_path, encoding="utf-8").read().split("\n")[1:-1]
    ranks = {tuple(line.split()): r for r, line in enumerate(merge_lines)}
    byte_encoder = bytes_to_unicode()
    ids = []
    for token in regex.findall(GPT2_PATTERN, text):
        word = tuple(byte_encoder[b] for b in token.encode("utf-8"))
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            new_word, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    new_word.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
        ids.extend(encoder[piece] for piece in word)
    return ids


def test_save_and_reload_encode_identically(tokenizer, shakespeare, tmp_path):
    tokenizer.save(tmp_path)
    reloaded = BPETokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert reloaded.vocab == tokenizer.vocab and reloaded.merges == tokenizer.merges
    text = shakespeare[-3000:] + "\n".join(TRICKY)
    assert np.array_equal(reloaded.encode(text), tokenizer.encode(text))


def test_saved_files_encode_as_gpt2s_algorithm_does(tokenizer, shakespeare, tmp_path):
    tokenizer.save(tmp_path)
    reloaded = BPETokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    text = shakespeare[-3000:] + "\n".join(TRICKY)
    ours = reloaded.encode(text, allow_special=False).tolist()
    assert ours == gpt2_reference_encode(tmp_path / "vocab.json", tmp_path / "merges.txt", text)


def test_huggingface_tokenizers_agree(tokenizer, shakespeare, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer.save(tmp_path)
    hf = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(
        str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = shakespeare[:3000] + "\n".join(TRICKY[:-4])
    assert tokenizer.encode(text).tolist() == hf.encode(text).ids


def test_from_files_errors(tmp_path):
    with pytest.raises(TinyLMError, match="cannot read"):
        BPETokenizer.from_files(tmp_path / "nope.json", tmp_path / "nope.txt")
    (tmp_path / "vocab.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(TinyLMError, match="JSON"):
        BPETokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    train_bpe("aaabdaaabac", 262).save(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\na a a\n", encoding="utf-8")
    with pytest.raises(TinyLMError, match="line 2"):
        BPETokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")


def test_from_files_accepts_crlf_and_no_header(tmp_path):
    tok = train_bpe("aaabdaaabac", 262)
    tok.save(tmp_path)
    lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    (tmp_path / "merges.txt").write_bytes("\r\n".join(lines).encode("utf-8"))
    again = BPETokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert again.merges == tok.merges
