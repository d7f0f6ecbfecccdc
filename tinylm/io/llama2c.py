"""llama2.c's files, out and in: run.c's legacy model.bin and its tokenizer.bin, in NumPy.

model.bin: a header of 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; vocab_size
is negative when the classifier is not the embedding), then float32 arrays in run.c's order: the embedding
(V, C), every layer's attention RMS weight (L, C), wq (L, H·D, C), wk (L, Hkv·D, C), wv, wo (L, C, H·D), every
layer's FFN RMS weight, w1 = gate (L, F, C), w2 = down (L, C, F), w3 = up, the final RMS weight (C,), the
rotary cos and sin tables (seq_len, D/2) each, which run.c now skips, and the classifier (V, C) when it is not
shared. tokenizer.bin: int32 max_token_length, then per token float32 score, int32 length, the bytes.

Two conventions differ from tinylm's (see docs/guide.md, "llama2.c"):
- rotary pairs: tinylm (and Hugging Face) turn coordinate j with j + D/2, run.c turns 2j with 2j + 1. The same
  rotation in another basis: the rows of q_proj and k_proj are permuted per head (`interleave_permutation`).
- run.c's ids 0, 1, 2 are <unk>, <s>, </s>. A character model is written with those three first and its
  characters at ids 3 …; <s> (which run.c feeds first) reads as '\\n' (else the first character), and the three
  get the mean of the characters' classifier rows, so their logit is the mean logit: never the greedy pick, and
  at most 1/V of the probability each when sampling (the geometric mean of the characters' probabilities).
"""
import math
import os
import struct

import numpy as np

from tinylm.atomic import replace_folder
from tinylm.core.llama import LlamaConfig, block_prefix
from tinylm.errors import TinyLMError
from tinylm.files import open_regular
from tinylm.io.checkpoint import check_finite
from tinylm.lowrank.factorized import dense_params, ranks_of
from tinylm.text.char import CharTokenizer, code_points
from tinylm.text.pieces import PieceTokenizer

MODEL_FILE, TOKENIZER_FILE = "model.bin", "tokenizer.bin"
HEADER = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
RUN_C_THETA, RUN_C_EPS = 10000.0, 1e-5
INT32_MAX = 2 ** 31 - 1
MAX_SEQ_LEN = 1 << 20     # as io/hf_llama.py's MAX_POSITIONS: the tables are then at most 2^20 x head_dim floats
SPECIALS = (b"<unk>", b"\n<s>\n", b"\n</s>\n")      # sentencepiece's strings, as llama2.c's own tokenizer.bin has
PER_LAYER = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "post_attention_layernorm", "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj")


def interleave_permutation(head_dim):
    """perm with perm[2j] = j, perm[2j+1] = j + D/2: the permutation matrix P (P[r, perm[r]] = 1) that takes
    a head's half-split coordinates (pair j = (j, j + D/2), tinylm's and Hugging Face's rotary) to interleaved
    ones (pair j = (2j, 2j+1), run.c's). P is orthogonal (Pᵀ = P⁻¹), so W' = P W (the export, rows W[perm])
    gives scores (P q)·(P k) = q·k, and P R_half Pᵀ = R_interleaved; the import applies Pᵀ (rows W'[argsort(perm)])."""
    half = np.arange(head_dim // 2)
    return np.stack([half, half + head_dim // 2], axis=1).reshape(-1)


def permute_heads(w, n_heads, perm):
    """Each head's D rows of w (H·D, C) reordered by perm (D,): (H·D, C) -> (H·D, C)."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, D, -1)[:, perm].reshape(w.shape)


def check_run_c_config(config):
    """One line for what run.c cannot run: its θ and ε are fixed, only a Llama has its layout, the header holds
    int32s (a character model's vocabulary gains 3 specials), and the rotary tables are bounded (MAX_SEQ_LEN)."""
    if getattr(config, "arch", None) != "llama":
        raise TinyLMError("--format llama2c writes Llamas only (run.c runs Llamas); this is a GPT-2: "
                          "export it with --format hf")
    fields = (config.n_embd, config.ffn_hidden, config.n_layer, config.n_head, config.n_kv_head,
              config.vocab_size + len(SPECIALS), config.block_size)
    for name, value in zip(HEADER, fields):
        if value > INT32_MAX:
            raise TinyLMError(f"model.bin's header holds int32s; this model's {name} is {value:,}, above "
                              f"2^31 - 1, so llama2.c's format cannot hold it")
    if config.block_size > MAX_SEQ_LEN:
        raise TinyLMError(f"model.bin holds rotary tables of seq_len x head_dim floats; this model's block_size "
                          f"{config.block_size:,} is above the {MAX_SEQ_LEN:,} positions tinylm writes")
    if config.rope_theta != RUN_C_THETA:
        raise TinyLMError(f"run.c fixes the rotary base at {RUN_C_THETA:g}; this model has --rope_theta "
                          f"{config.rope_theta:g}, so llama2.c's format cannot hold it")
    if config.norm_eps != RUN_C_EPS:
        raise TinyLMError(f"run.c fixes RMSNorm's epsilon at {RUN_C_EPS:g}; this model's config has norm_eps "
                          f"{config.norm_eps:g}, so llama2.c's format cannot hold it")


def rotary_tables(seq_len, head_dim):
    """cos and sin of position t times pair j's speed θ^(−2j/D), (seq_len, D/2) each, in float32: the tables an
    earlier run.c read and today's skips (written, as llama2.c's own export writes them)."""
    speeds = np.float32(1) / np.float32(RUN_C_THETA) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    angles = np.outer(np.arange(seq_len, dtype=np.float32), speeds).astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def model_arrays(params, config, head):
    """The float32 arrays of model.bin in run.c's order (q and k rows interleaved); head: the classifier or None."""
    L, D = config.n_layer, config.n_embd // config.n_head
    perm = interleave_permutation(D)
    per_layer = {name: [params[f"{block_prefix(i)}{name}.weight"] for i in range(L)] for name in PER_LAYER}
    per_layer["self_attn.q_proj"] = [permute_heads(w, config.n_head, perm) for w in per_layer["self_attn.q_proj"]]
    per_layer["self_attn.k_proj"] = [permute_heads(w, config.n_kv_head, perm) for w in per_layer["self_attn.k_proj"]]
    arrays = [params["model.embed_tokens.weight"]] + [np.stack(per_layer[n]) for n in PER_LAYER]
    arrays += [params["model.norm.weight"], *rotary_tables(config.block_size, D)]
    return [np.ascontiguousarray(a, dtype="<f4") for a in arrays + ([head] if head is not None else [])]


def write_model_bin(f, params, config, head=None):
    """Write model.bin to the binary file f. head (V, C): a classifier not shared with params' embedding (a tied
    model's head is its embedding; an untied one's is lm_head). vocab_size comes from the embedding's rows."""
    if head is None and not config.tie_embeddings:
        head = params["lm_head.weight"]
    V = params["model.embed_tokens.weight"].shape[0]
    header = [config.n_embd, config.ffn_hidden, config.n_layer, config.n_head, config.n_kv_head,
              V if head is None else -V, config.block_size]
    f.write(np.asarray(header, dtype="<i4").tobytes())
    for a in model_arrays(params, config, head):
        f.write(a.tobytes())


def write_tokenizer_bin(f, pieces, scores):
    """Write tokenizer.bin: int32 max length, then per piece float32 score, int32 length, the bytes."""
    f.write(np.int32(max(len(p) for p in pieces)).astype("<i4").tobytes())
    for p, s in zip(pieces, scores):
        f.write(np.float32(s).astype("<f4").tobytes() + np.int32(len(p)).astype("<i4").tobytes() + p)


def char_export(params, config, tok):
    """(params, head, pieces, notes) for a character model: <unk>, <s>, </s> at ids 0-2, the characters from 3.

    run.c feeds <s> first and puts ' ' before a prompt: the three read as the start character and get the
    mean classifier row (module docstring). A vocabulary without ' ' or with NUL is refused (run.c needs ' ';
    C strings cannot hold NUL)."""
    if " " not in tok.chars:
        raise TinyLMError("the model's characters have no ' ', which run.c's encoder puts before every prompt; "
                          "llama2.c's format cannot run it")
    if "\0" in tok.chars:
        raise TinyLMError("the model's characters include NUL, which run.c's C strings cannot hold")
    start = "\n" if "\n" in tok.chars else tok.chars[0]
    emb = params["model.embed_tokens.weight"]
    head = emb if config.tie_embeddings else params["lm_head.weight"]
    start_row = emb[tok.chars.index(start)]
    new = dict(params)
    new["model.embed_tokens.weight"] = np.concatenate([np.stack([start_row] * 3), emb])
    head = np.concatenate([np.stack([head.mean(axis=0)] * 3), head])
    pieces = list(SPECIALS) + [c.encode("utf-8", "surrogatepass") for c in tok.chars]
    notes = [f"run.c starts every text with <s> (id 1), which this export embeds as {start!r}; ids 0-2 are <unk> <s> "
             f"</s> and the model's {len(tok.chars)} characters are ids 3-{len(tok.chars) + 2}; run.c stops at "
             f"seq_len = {config.block_size} positions, the prompt's included"]
    return new, head, pieces, notes


def export_llama2c(ckpt, folder):
    """Write folder/model.bin and folder/tokenizer.bin for run.c, the folder swapped in whole; -> {"files", "notes"}.

    ckpt: the dict load_any returns (a Llama with a character tokenizer, or one read from a model.bin)."""
    params, config, tok = ckpt["params"], ckpt["config"], ckpt["tokenizer"]
    check_run_c_config(config)
    factorized = []
    if ranks_of(params):              # as export_hf: run.c has no factorized layers, so write what they compute
        factorized = [f"{len(ranks_of(params))} factorized (low-rank) layers were written as their dense products "
                      "A B (model.bin has no factorized layers): the same function, at the dense model's size"]
        params = dense_params(params)
    if isinstance(tok, CharTokenizer):
        params, head, pieces, notes = char_export(params, config, tok)
        scores = np.zeros(len(pieces))
    elif isinstance(tok, PieceTokenizer):
        head, pieces, scores, notes = None, tok.pieces, tok.scores, []
    else:
        raise TinyLMError("--format llama2c writes character models and models read from a tokenizer.bin; this "
                          "BPE model's byte-level tokenizer has no tokenizer.bin form that run.c encodes with")

    def fill(new):
        with open(os.path.join(new, MODEL_FILE), "wb") as f:
            write_model_bin(f, params, config, head)
        with open(os.path.join(new, TOKENIZER_FILE), "wb") as f:
            write_tokenizer_bin(f, pieces, scores)
    try:
        replace_folder(folder, fill, keep=lambda name: name not in (MODEL_FILE, TOKENIZER_FILE))
    except OSError as e:
        raise TinyLMError(f"cannot write the export {folder}: {e.strerror or e}; any earlier export there "
                          "is unchanged") from None
    return {"folder": folder, "files": [MODEL_FILE, TOKENIZER_FILE], "notes": factorized + notes}


# ----------------------------------------------------------------------------- import


def check_header(h, path):
    """One line for a header run.c would misread: a dimension ≤ 0, heads that do not divide, an odd head width."""
    for name in HEADER:
        if h[name] <= 0:
            raise TinyLMError(f"{path}: the header's {name} is {h[name]}; it must be positive")
    if h["dim"] % h["n_heads"]:
        raise TinyLMError(f"{path}: dim {h['dim']} is not divisible by n_heads {h['n_heads']}")
    if h["n_heads"] % h["n_kv_heads"]:
        raise TinyLMError(f"{path}: n_heads {h['n_heads']} is not divisible by n_kv_heads {h['n_kv_heads']}")
    if (h["dim"] // h["n_heads"]) % 2:
        raise TinyLMError(f"{path}: the head width dim/n_heads = {h['dim'] // h['n_heads']} is odd; rotary pairs "
                          "need it even")


def array_shapes(h, shared):
    """(name, shape) of model.bin's arrays in order, from the header h (names: run.c's)."""
    C, F, L, V, D = h["dim"], h["hidden_dim"], h["n_layers"], h["vocab_size"], h["dim"] // h["n_heads"]
    Hq, Hkv = h["n_heads"] * D, h["n_kv_heads"] * D
    shapes = [("token_embedding", (V, C)), ("rms_att", (L, C)), ("wq", (L, Hq, C)), ("wk", (L, Hkv, C)),
              ("wv", (L, Hkv, C)), ("wo", (L, C, Hq)), ("rms_ffn", (L, C)), ("w1", (L, F, C)), ("w2", (L, C, F)),
              ("w3", (L, F, C)), ("rms_final", (C,)), ("freq_cis", (h["seq_len"] * D,))]
    return shapes if shared else shapes + [("wcls", (V, C))]


def read_model_bin(path):
    """(arrays by run.c's name, header dict, shared): model.bin read after its header is checked against its size."""
    with open_regular(path, "llama2.c model") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(4 * len(HEADER))
        if len(raw) < 4 * len(HEADER):
            raise TinyLMError(f"{path}: {size} bytes, shorter than model.bin's 28-byte header")
        h = dict(zip(HEADER, (int(x) for x in np.frombuffer(raw, dtype="<i4"))))
        shared = h["vocab_size"] > 0
        h["vocab_size"] = abs(h["vocab_size"])
        check_header(h, path)
        shapes = array_shapes(h, shared)
        expected = 4 * len(HEADER) + 4 * sum(int(np.prod(s, dtype=object)) for _, s in shapes)
        if expected != size:
            raise TinyLMError(f"{path}: its header describes {expected} bytes but the file has {size}; not a "
                              "llama2.c model.bin (legacy format), or cut short")
        arrays = {}
        for name, shape in shapes:
            n = int(np.prod(shape, dtype=object))
            a = np.frombuffer(f.read(4 * n), dtype="<f4")
            if a.size != n:
                raise TinyLMError(f"{path}: the file changed while it was being read")
            arrays[name] = a.reshape(shape).astype(np.float32)
    return arrays, h, shared


def read_tokenizer_bin(path, vocab_size):
    """(pieces, scores) of tokenizer.bin: exactly vocab_size tokens (run.c reads that many), each at most the
    header's max_token_length bytes long, and nothing after them. A file larger than those tokens can be,
    4 + V·(8 + max_token_length) bytes, is refused before it is read. Lengths are Python ints (no wrap-around)."""
    with open_regular(path, "llama2.c tokenizer") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(4)
        if len(head) < 4:
            raise TinyLMError(f"{path}: truncated: {len(head)} bytes, shorter than tokenizer.bin's 4-byte header")
        max_len, = struct.unpack("<i", head)
        if max_len < 0:
            raise TinyLMError(f"{path}: the header's max_token_length is {max_len}; it must not be negative")
        if size > 4 + vocab_size * (8 + max_len):
            raise TinyLMError(f"{path}: {size} bytes, more than {vocab_size} tokens of at most {max_len} bytes "
                              f"(max_token_length) can take; not the tokenizer.bin of this model")
        data = head + f.read(size - 4)
    pieces, scores, at = [], [], 4
    while len(pieces) < vocab_size:
        if at + 8 > len(data):
            raise TinyLMError(f"{path}: truncated inside token {len(pieces)}; the model's vocab_size is {vocab_size}")
        score, n = struct.unpack_from("<fi", data, at)
        if n < 0 or n > max_len:
            raise TinyLMError(f"{path}: token {len(pieces)} has length {n}, outside 0 … {max_len} "
                              "(max_token_length)")
        if at + 8 + n > len(data):
            raise TinyLMError(f"{path}: truncated inside token {len(pieces)} (length {n})")
        if not math.isfinite(score):
            raise TinyLMError(f"{path}: token {len(pieces)}'s score is {score}; run.c's merges need finite scores")
        pieces.append(data[at + 8:at + 8 + n])
        scores.append(score)
        at += 8 + n
    if at != len(data):
        raise TinyLMError(f"{path}: {len(data) - at} bytes after the model's {vocab_size} tokens (vocab_size); "
                          "not the tokenizer.bin of this model")
    return pieces, np.asarray(scores, dtype=np.float32)


def tokenizer_of(pieces, scores, path):
    """(tokenizer, first): a CharTokenizer when the pieces are a tinylm character export (the three specials, then
    distinct single characters in code-point order; first = 3, the rows to drop), else a PieceTokenizer (first 0)."""
    try:
        texts = [p.decode("utf-8") for p in pieces]
    except UnicodeDecodeError:
        raise TinyLMError(f"{path}: a token is not UTF-8 text; tinylm cannot represent this tokenizer") from None
    chars = "".join(texts[3:])
    if tuple(pieces[:3]) == SPECIALS and len(texts) > 3 and all(len(t) == 1 for t in texts[3:]):
        points = code_points(chars).astype(np.int64)
        if np.all(np.diff(points) > 0):
            return CharTokenizer(chars), 3
    return PieceTokenizer(pieces, scores), 0


def params_from_arrays(a, h, shared, first):
    """tinylm's Llama params (q and k rows back to half-split) from run.c's arrays, rows first … of the vocabulary."""
    L, D = h["n_layers"], h["dim"] // h["n_heads"]
    back = np.argsort(interleave_permutation(D))
    names = dict(zip(PER_LAYER, ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3")))
    params = {"model.embed_tokens.weight": a["token_embedding"][first:]}
    for i in range(L):
        for hf_name, run_name in names.items():
            params[f"{block_prefix(i)}{hf_name}.weight"] = a[run_name][i]
        p = block_prefix(i) + "self_attn."
        params[p + "q_proj.weight"] = permute_heads(params[p + "q_proj.weight"], h["n_heads"], back)
        params[p + "k_proj.weight"] = permute_heads(params[p + "k_proj.weight"], h["n_kv_heads"], back)
    params["model.norm.weight"] = a["rms_final"]
    head = a["token_embedding" if shared else "wcls"][first:]
    if not np.array_equal(head, params["model.embed_tokens.weight"]):
        params["lm_head.weight"] = head
    return params


def load_llama2c(path, tokenizer_path=None):
    """A llama2.c model.bin (and its tokenizer.bin: tokenizer_path, else beside it) as load_checkpoint's dict.

    The config: run.c's θ = 10000 and ε = 1e-5; the head is tied when the classifier equals the embedding."""
    arrays, h, shared = read_model_bin(path)
    if tokenizer_path is not None and not os.path.exists(tokenizer_path):
        raise TinyLMError(f"the tokenizer.bin given for {path}, {tokenizer_path}, does not exist")
    tokenizer_path = tokenizer_path or os.path.join(os.path.dirname(os.path.abspath(path)), TOKENIZER_FILE)
    if not os.path.exists(tokenizer_path):
        raise TinyLMError(f"no tokenizer.bin beside {path}; pass --tokenizer_bin FILE (llama2.c's tokenizer.bin)")
    pieces, scores = read_tokenizer_bin(tokenizer_path, h["vocab_size"])
    tok, first = tokenizer_of(pieces, scores, tokenizer_path)
    params = params_from_arrays(arrays, h, shared, first)
    check_finite(params, path)
    config = LlamaConfig(block_size=h["seq_len"], vocab_size=h["vocab_size"] - first, n_layer=h["n_layers"],
                         n_head=h["n_heads"], n_kv_head=h["n_kv_heads"], n_embd=h["dim"], ffn_hidden=h["hidden_dim"],
                         rope_theta=RUN_C_THETA, norm_eps=RUN_C_EPS,
                         tie_embeddings="lm_head.weight" not in params).validate()
    meta = {"format": "llama2c", "source": os.path.abspath(path), "dtype": "float32", "step": None,
            "best_val_loss": None, "train_args": {}, "config": config.to_dict(), "tokenizer": tok.to_dict()}
    return {"params": params, "config": config, "tokenizer": tok, "opt_state": None, "meta": meta}
