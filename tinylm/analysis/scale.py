"""How the analysis scales to a large vocabulary and a long context: every rule in one place.

A character model (vocab ~65, block_size ≤ 256, under a few million parameters) is analysed
in full, as before. A GPT-2 (vocab 50257, block 1024, 85M block parameters) cannot be: a
nearest-neighbour list for every token is V²·C work and a huge JSON, a one-hot probe over
50257 classes does not fit, and one NumPy forward pass over a 1024-token window takes
seconds. So:

- vocab_size > LARGE_VOCAB: the token-level views (neighbour lists, case analogies, the
  PCA map) use `token_subset`: every single-character printable token, then the most
  frequent tokens of the evaluation text, SUBSET_SIZE tokens in all. Neighbours are still
  searched among the whole vocabulary; analogies rank only the subset. Probes read the
  PROBE_CLASSES most frequent tokens (the rest is one class "other") and, in place of the
  vowel property, whether the next token starts with a space (begins a word). The logit
  lens reads the first LOGIT_LENS_TOKENS tokens (whole windows).
- evaluation windows are at most MAX_WINDOW tokens long (block_size when smaller), and a
  big model (over BIG_MODEL block parameters) uses BIG_EVAL_SEQS windows by default,
  low-rank compression tries BIG_FRACTIONS on the first BIG_LOWRANK_SEQS windows (still
  truncating every layer, so the curve keeps its meaning), and alpha's bootstrap defaults
  to BIG_N_BOOT resamples, and head ablation (a forward pass per head) uses BIG_ABLATION_SEQS windows.
- attention maps are drawn for the last MAX_PROMPT tokens of the prompt, position-embedding
  similarities for at most MAX_POSITIONS evenly spaced positions.
"""
import numpy as np
from tinylm.text.bpe import unicode_to_bytes

LARGE_VOCAB = 512          # above this, token-level views use a subset of the vocabulary
SUBSET_SIZE = 512          # tokens in that subset
PROBE_CLASSES = 64         # token-identity probes of a large vocabulary: the 63 most frequent tokens + "other"
LOGIT_LENS_TOKENS = 1024   # logit lens of a large vocabulary: whole windows up to this many tokens
MAX_WINDOW = 256           # tokens per evaluation window (probes, low rank, head patterns)
BIG_MODEL = 10_000_000     # block parameters (non-embedding) above which a model is "big"
DEFAULT_EVAL_SEQS = 32     # evaluation windows, small models
DEFAULT_N_BOOT = 100       # bootstrap resamples of alpha, small models
BIG_EVAL_SEQS = 8          # evaluation windows, big models: a 124M forward on 8×256 tokens takes ~15 s (1 core)
BIG_LOWRANK_SEQS = 2       # windows for each low-rank loss of a big model (each fraction costs a forward)
BIG_ABLATION_SEQS = 2      # windows for head ablation of a big model (a forward per head: 144 for GPT-2)
BIG_N_BOOT = 20            # bootstrap resamples of alpha, big models (each refits a tail of C eigenvalues: O(C²))
BIG_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4)
MAX_PROMPT = 64            # tokens of the prompt whose attention is drawn
MAX_POSITIONS = 256        # positions in the position-embedding cosine map


def is_large_vocab(config):
    return config.vocab_size > LARGE_VOCAB


def block_params(config):
    """Parameters of the transformer blocks (what a forward pass multiplies by per token): 12 L C² (+ biases, norms)."""
    C = config.n_embd
    return config.n_layer * (12 * C * C + 13 * C)


def is_big_model(config):
    return block_params(config) > BIG_MODEL


def eval_window(config):
    """Tokens per evaluation window: min(block_size, MAX_WINDOW)."""
    return min(config.block_size, MAX_WINDOW)


def default_eval_seqs(config):
    return BIG_EVAL_SEQS if is_big_model(config) else DEFAULT_EVAL_SEQS


def default_n_boot(config):
    return BIG_N_BOOT if is_big_model(config) else DEFAULT_N_BOOT


def token_labels(tok, vocab_size):
    """The text of every token: a character tokenizer's characters, a BPE's decoded bytes.   -> [str] * V

    A byte-level BPE token may hold part of a multi-byte UTF-8 character; its bytes are
    shown as escapes ('\\xe2') rather than as U+FFFD, so that different tokens keep different labels.
    """
    chars = getattr(tok, "chars", None)
    if chars is not None:
        return list(chars)
    vocab = getattr(tok, "vocab", None)
    if vocab is None:
        return [str(i) for i in range(vocab_size)]
    to_byte = unicode_to_bytes()
    labels = [str(i) for i in range(vocab_size)]
    for token, i in vocab.items():
        if all(c in to_byte for c in token):
            labels[i] = bytes(to_byte[c] for c in token).decode("utf-8", errors="backslashreplace")
        else:
            labels[i] = token          # a special token such as <|endoftext|> that is not byte-encoded
    return labels


def frequent_tokens(ids, vocab_size, k):
    """The k most frequent token ids in ids, most frequent first (ties: smaller id first).   -> (≤k,)"""
    counts = np.bincount(np.asarray(ids, dtype=np.intp).ravel(), minlength=vocab_size)
    order = np.argsort(-counts, kind="stable")
    return order[:k][counts[order[:k]] > 0]


def token_subset(labels, text_ids, size=SUBSET_SIZE):
    """Ids of the tokens the token-level views use for a large vocabulary.   -> (ids (≤size,) sorted, rule text)

    First every token whose label is one printable character (for a byte-level BPE: the
    printable ASCII bytes, so the letters of the case analogies are there), then the most
    frequent tokens of text_ids until `size` tokens.
    """
    single = [i for i, s in enumerate(labels) if len(s) == 1 and s.isprintable()][:size]
    chosen = set(single)
    for i in frequent_tokens(text_ids, len(labels), size + len(chosen)):
        if len(chosen) >= size:
            break
        chosen.add(int(i))
    rule = (f"{len(chosen)} of {len(labels)} tokens: the {len(single)} single-character printable tokens "
            f"and the {len(chosen) - len(single)} most frequent other tokens of the evaluation text")
    return np.array(sorted(chosen), dtype=np.intp), rule


def position_subset(block_size, size=MAX_POSITIONS):
    """At most `size` evenly spaced positions 0, s, 2s, ... (all of them when block_size ≤ size).   -> (n,)"""
    step = -(-block_size // size)
    return np.arange(0, block_size, step)
