"""GPT-2 and Llama checkpoints in the Hugging Face folder layout: export a tinylm model, import any GPT-2 or Llama.

The Llama's own parts (config.json's fields, a tokenizer.json for transformers) are in hf_llama.py; the
writing, the reading and every check of the tensors against config.json are here, shared. A GPT-2
folder holds::

    config.json          GPT2Config's field names (n_positions, n_embd, n_layer, n_head, ...)
    model.safetensors    the weights under GPT-2's names; the four linear weights of a block are
                         stored (in, out), the transpose of tinylm's (out, in)
    vocab.json           byte-level BPE vocabulary   } the tokenizer, read by tinylm's BPETokenizer
    merges.txt           ranked merges               } and by transformers' GPT2Tokenizer
    tinylm_tokenizer.json   only for a character-level tinylm model (see `export_hf`)

tinylm's parameter names are already those of nanoGPT, which are those that
`GPT2LMHeadModel.save_pretrained` writes (`transformer.h.0.attn.c_attn.weight`, ...).
OpenAI's original GPT-2 files, as uploaded to the Hugging Face hub, use the same names
without the `transformer.` prefix and also hold the attention-mask buffers
`h.{i}.attn.bias` / `h.{i}.attn.masked_bias`; the importer accepts both forms and skips
those buffers. Reading goes through tinylm's own safetensors reader (tinylm/io/safetensors.py),
memory-mapped by default, so a 124M-parameter model is not copied into memory to load it.

The public functions: `export_hf`, `import_hf`, `load_any`, `hf_config`, `folder_config`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import numpy as np

from tinylm.atomic import atomic_write_text, replace_folder
from tinylm.files import parse_json, read_json
from tinylm.io.checkpoint import check_finite, check_meta_fields, load_checkpoint, load_meta
from tinylm.io.llama2c import load_llama2c
from tinylm.errors import TinyLMError, brief
from tinylm.core import gpt2, llama
from tinylm.core.arch import arch_of
from tinylm.core.gpt2 import GPTConfig, param_shapes
from tinylm.io.fields import check_flag, check_int, is_number
from tinylm.io.hf_llama import fast_tokenizer_files, llama_config_from_hf, llama_hf_config
from tinylm.io.safetensors import load_file, save_file
from tinylm.text.char import CharTokenizer, tokenizer_from_dict
from tinylm.text.pieces import PieceTokenizer
from tinylm.lowrank.factorized import dense_params, ranks_of
from tinylm.text.bpe import BPETokenizer, END_OF_TEXT, MERGES_HEADER, bytes_to_unicode

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
TINYLM_TOKENIZER_FILE = "tinylm_tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
HF_TOKENIZER_FILE = "tokenizer.json"

# Files that an export replaces; if one of them is left from an earlier export into the same
# folder and this export does not write it, it would contradict the new model, so it is removed.
OWNED_FILES = (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE, MERGES_FILE, TINYLM_TOKENIZER_FILE,
               TOKENIZER_CONFIG_FILE, HF_TOKENIZER_FILE, "special_tokens_map.json", "added_tokens.json",
               "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin")

# Keys in the safetensors __metadata__. transformers refuses a file whose "format" is not
# one of its frameworks, so that key says "pt"; tinylm's own keys are namespaced.
META_FORMAT = "tinylm.format"
META_VERSION = "tinylm.version"
META_CONFIG = "tinylm.config"
META_INFO = "tinylm.meta"
FORMAT_NAME = "tinylm-gpt2-folder"
FORMAT_NAMES = {"gpt2": FORMAT_NAME, "llama": "tinylm-llama-folder"}
# The reading and writing that differ by arch: the model's core module, its name in messages, its token embedding.
MODELS = {"gpt2": gpt2, "llama": llama}
LABELS = {"gpt2": "GPT-2", "llama": "Llama"}
EMBEDDINGS = {"gpt2": "transformer.wte.weight", "llama": "model.embed_tokens.weight"}
FORMAT_VERSION = 1

# Linear weights that GPT-2 stores as Conv1D, i.e. (in, out): transposed relative to tinylm.
TRANSPOSED_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# What GPT2Config assumes for a field that config.json leaves out.
GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                 "n_inner": None, "activation_function": "gelu_new", "resid_pdrop": 0.1, "embd_pdrop": 0.1,
                 "attn_pdrop": 0.1, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
                 "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                 "add_cross_attention": False}
GPT2_ARCHITECTURES = {"GPT2LMHeadModel", "GPT2Model"}
# Both names mean GELU with the tanh approximation, which is what tinylm computes.
TANH_GELUS = {"gelu_new", "gelu_pytorch_tanh"}
LAYER_NORM_EPS = 1e-5

FLOAT_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


def is_transposed(name):
    """True for the linear weights that GPT-2's files store (in, out)."""
    return name.endswith(TRANSPOSED_SUFFIXES)


# ----------------------------------------------------------------------------- export


def hf_config(config, tokenizer=None, dtype="float32"):
    """The config.json dict of a tinylm GPTConfig, in GPT2Config's field names."""
    eot = getattr(tokenizer, "end_of_text_id", None)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,          # the old name of n_positions, still read by some tools
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,                     # None means 4 * n_embd
        "activation_function": "gelu_new",   # GELU, tanh approximation
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot,                 # GPT2Config's default 50256 would be out of range
        "eos_token_id": eot,                 # for a small vocabulary
        "torch_dtype": dtype,
    }


def _hf_tensors(params, config, dtype):
    """tinylm params -> GPT-2 tensors (Conv1D weights transposed, zero biases added when bias=False)."""
    out = {}
    for name, shape in param_shapes(dataclasses.replace(config, bias=True)).items():
        if name in params:
            array = params[name]
            if is_transposed(name):
                array = array.T
            out[name] = np.asarray(array, dtype=dtype)
        else:   # GPT-2 always has biases: a bias-free model is the same function with zero biases
            out[name] = np.zeros(shape, dtype=dtype)
    return out


def _llama_tensors(params, config, dtype):
    """tinylm's Llama params are LlamaForCausalLM's tensors already: the same names, every linear (out, in)."""
    return {name: np.asarray(params[name], dtype=dtype) for name in llama.param_shapes(config)}


def _char_tokenizer_as_bpe_files(tok):
    """vocab.json/merges.txt text that makes GPT-2's byte-level BPE encode as `tok` does, or None.

    Possible when every character is one UTF-8 byte (ASCII): with no merges, GPT-2's
    tokenizer cuts text into single bytes, and the vocabulary maps each byte's stand-in
    character to the character's id. A multi-byte character would need merges whose
    halves are tokens too, and the character vocabulary has no ids to spare for them.
    """
    if any(ord(c) > 127 for c in tok.chars):
        return None
    standin = bytes_to_unicode()
    vocab = {standin[ord(c)]: i for i, c in enumerate(tok.chars)}
    return json.dumps(vocab, ensure_ascii=False), MERGES_HEADER + "\n"


def _tokenizer_files(tok, config, notes):
    """{file name: text} of the tokenizer for the folder of config's arch; a line in notes for what cannot be had.

    GPT-2: vocab.json + merges.txt (see export_hf). Llama: tokenizer.json + tokenizer_config.json, a
    PreTrainedTokenizerFast (hf_llama.fast_tokenizer_files). A character model also gets tinylm_tokenizer.json,
    which tinylm's importer prefers.
    """
    written = {}
    if arch_of(config) == "llama":
        if isinstance(tok, CharTokenizer):
            written[TINYLM_TOKENIZER_FILE] = json.dumps(tok.to_dict(), ensure_ascii=False)
        written.update(fast_tokenizer_files(tok, config.block_size))
        return written
    if isinstance(tok, CharTokenizer):
        written[TINYLM_TOKENIZER_FILE] = json.dumps(tok.to_dict(), ensure_ascii=False)
        files = _char_tokenizer_as_bpe_files(tok)
        if files is None:
            notes.append("the character tokenizer has non-ASCII characters, which GPT-2's byte-level "
                         f"tokenizer cannot reproduce: only {TINYLM_TOKENIZER_FILE} was written "
                         "(tinylm reads it; transformers needs a tokenizer of its own)")
        else:
            written[VOCAB_FILE], written[MERGES_FILE] = files
    elif hasattr(tok, "vocab") and hasattr(tok, "merges"):
        written[VOCAB_FILE] = json.dumps(tok.vocab, ensure_ascii=False, separators=(",", ":"))
        written[MERGES_FILE] = "\n".join([MERGES_HEADER] + [f"{a} {b}" for a, b in tok.merges]) + "\n"
    else:
        raise TinyLMError(f"cannot export a tokenizer of type {type(tok).__name__}")
    if VOCAB_FILE in written:
        tok_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": config.block_size,
                      "add_prefix_space": False}
        eot = getattr(tok, "end_of_text_id", None)
        if eot is not None:
            tok_config.update(bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT)
        written[TOKENIZER_CONFIG_FILE] = json.dumps(tok_config, indent=2)
    return written


def export_hf(source, folder, dtype=np.float32):
    """Write a tinylm model as a Hugging Face GPT-2 or Llama folder, by its arch; returns {"folder", "files", "notes"}.

    source: a checkpoint path, a model folder, or the dict that load_checkpoint/import_hf return.
    dtype: of the stored weights, float32 (default, as GPT-2's files), float16 or float64.

    The files are written into a new folder beside `folder`, which then takes its place in one step,
    so an interrupt at any moment leaves the earlier export there or the new one, each whole
    (atomic.replace_folder). Tokenizer: a BPE model gets GPT-2's
    vocab.json + merges.txt. A character model gets tinylm_tokenizer.json (which tinylm's
    importer prefers), plus, when all its characters are ASCII, a vocab.json + merges.txt
    with no merges that make transformers' GPT2Tokenizer give the same ids. A Llama gets config.json in
    LlamaConfig's names (hf_llama.llama_hf_config), its tensors under their own names, and a tokenizer.json
    for transformers' PreTrainedTokenizerFast (with tinylm_tokenizer.json for a character model).
    Other files in the folder are kept; files of an earlier export that this one does not write are dropped.
    "notes" lists, one line each, what a user should know (zero biases, no HF tokenizer).
    """
    ckpt = source if isinstance(source, dict) else load_any(source)
    try:
        params, config, tok = ckpt["params"], ckpt["config"], ckpt["tokenizer"]
    except (KeyError, TypeError):
        raise TinyLMError("export_hf() needs a checkpoint path or the dict that load_checkpoint returns") from None
    dtype = np.dtype(dtype)
    if dtype.name not in FLOAT_DTYPES:
        raise TinyLMError(f"export dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype.name}")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise TinyLMError(f"export folder {folder} exists and is not a folder")
    if isinstance(tok, PieceTokenizer):          # before any folder is made
        raise TinyLMError("a llama2.c tokenizer has no Hugging Face form tinylm writes; use --format llama2c")
    parent = os.path.dirname(os.path.realpath(folder))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise TinyLMError(f"cannot create the folder {parent} for the export: {e.strerror or e}") from None
    notes, arch = [], arch_of(config)
    if ranks_of(params):              # GPT-2 and Llama have no factorized layers: write what they compute
        notes.append(f"{len(ranks_of(params))} factorized (low-rank) layers were written as their dense products "
                     f"A B ({LABELS[arch]} has no factorized layers): the same function, at the dense model's size")
        params = dense_params(params)
    if arch == "gpt2" and not config.bias:
        notes.append("the model has no biases; GPT-2 always has them, so zero biases were written "
                     "(the same function; tinylm's importer drops them again)")

    meta = ckpt.get("meta") or {}
    info = {k: meta[k] for k in ("step", "best_val_loss", "train_args") if k in meta}
    info["dtype"] = str(params[EMBEDDINGS[arch]].dtype)
    metadata = {"format": "pt", META_FORMAT: FORMAT_NAMES[arch], META_VERSION: str(FORMAT_VERSION),
                META_CONFIG: json.dumps(config.to_dict()), META_INFO: json.dumps(info)}

    # tokenizer files first, weights next, config.json last
    written = _tokenizer_files(tok, config, notes)

    def fill(new):
        for name, text in written.items():
            atomic_write_text(os.path.join(new, name), text)
        tensors, hf_dict = (_llama_tensors, llama_hf_config) if arch == "llama" else (_hf_tensors, hf_config)
        save_file(tensors(params, config, dtype), os.path.join(new, WEIGHTS_FILE), metadata)
        atomic_write_text(os.path.join(new, CONFIG_FILE), json.dumps(hf_dict(config, tok, dtype.name), indent=2) + "\n")

    # The new folder is written beside the old one and takes its place in one step (atomic.replace_folder): an
    # interrupt leaves the old export or the new one. The old folder's other files come along; its model and
    # tokenizer files (OWNED_FILES) do not, since a leftover one would contradict the new model.
    try:
        replace_folder(folder, fill, keep=lambda name: name not in OWNED_FILES)
    except OSError as e:
        raise TinyLMError(f"cannot write the export {folder}: {e.strerror or e}; any earlier export there "
                          "is unchanged") from None
    files = sorted([CONFIG_FILE, WEIGHTS_FILE, *written])
    return {"folder": folder, "files": files, "notes": notes}


# ----------------------------------------------------------------------------- import


def config_from_hf(cfg, path="config.json"):
    """GPTConfig (bias=True, as every GPT-2) from a config.json dict; TinyLMError for what tinylm cannot run.

    Every field tinylm reads is checked for its type before it is used, and a value quoted in a
    message is cut short (errors.brief): a stranger's config.json is only data.
    """
    if not isinstance(cfg, dict):
        raise TinyLMError(f"{path}: must hold a JSON object")
    model_type = cfg.get("model_type")
    if model_type != "gpt2":
        raise TinyLMError(f"{path}: model_type is {brief(model_type)}; tinylm reads only GPT-2 (model_type 'gpt2')")
    archs = cfg.get("architectures")
    if archs is None:
        archs = []
    if not isinstance(archs, list) or not all(isinstance(a, str) and a in GPT2_ARCHITECTURES for a in archs):
        raise TinyLMError(f"{path}: unsupported architecture {brief(archs)}; tinylm reads GPT2LMHeadModel or GPT2Model")
    cfg = {**GPT2_DEFAULTS, **cfg}
    dims = {k: check_int(cfg, k, path) for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")}
    n_inner = cfg["n_inner"]
    if n_inner is not None and (isinstance(n_inner, bool) or n_inner != 4 * dims["n_embd"]):
        raise TinyLMError(f"{path}: n_inner is {brief(n_inner)}; tinylm's MLP is 4 * n_embd = {4 * dims['n_embd']} wide")
    act = cfg["activation_function"]
    if not isinstance(act, str) or act not in TANH_GELUS:
        raise TinyLMError(f"{path}: activation_function {brief(act)} is not supported; tinylm computes GELU "
                          f"with the tanh approximation ({' or '.join(sorted(TANH_GELUS))})")
    eps = cfg["layer_norm_epsilon"]
    try:
        eps_ok = is_number(eps) and abs(float(eps) - LAYER_NORM_EPS) <= 1e-12      # False for NaN
    except OverflowError:                                                           # an int beyond any float
        eps_ok = False
    if not eps_ok:
        raise TinyLMError(f"{path}: layer_norm_epsilon is {brief(eps)}; tinylm's layer norm uses {LAYER_NORM_EPS}")
    flags = {k: check_flag(cfg, k, path) for k in ("tie_word_embeddings", "scale_attn_weights",
                                                    "scale_attn_by_inverse_layer_idx", "add_cross_attention")}
    if not flags["tie_word_embeddings"]:
        raise TinyLMError(f"{path}: tie_word_embeddings is false; tinylm's output "
                          "head is the token embedding (untied heads are not supported)")
    if not flags["scale_attn_weights"] or flags["scale_attn_by_inverse_layer_idx"]:
        raise TinyLMError(f"{path}: attention scaling other than 1/sqrt(head_dim) is not supported")
    if flags["add_cross_attention"]:
        raise TinyLMError(f"{path}: cross-attention (add_cross_attention) is not supported")
    dropout = cfg["resid_pdrop"]
    if not is_number(dropout) or not 0 <= dropout < 1:
        raise TinyLMError(f"{path}: resid_pdrop must be a number in [0, 1), got {brief(dropout)}")
    try:
        return GPTConfig(block_size=dims["n_positions"], vocab_size=dims["vocab_size"], n_layer=dims["n_layer"],
                         n_head=dims["n_head"], n_embd=dims["n_embd"], dropout=float(dropout), bias=True).validate()
    except TinyLMError as e:
        raise TinyLMError(f"{path}: {e}".replace("--", "")) from None


def _tinylm_metadata(metadata, path, format_name=FORMAT_NAME):
    """(config dict or None, info dict) from a tinylm export's __metadata__; (None, {}) for a foreign file."""
    if metadata.get(META_FORMAT) != format_name:
        return None, {}
    text = metadata.get(META_VERSION, "")
    version = int(text) if text.isascii() and text.isdigit() and len(text) < 10 else None
    if version is None or not 1 <= version <= FORMAT_VERSION:
        raise TinyLMError(f"{path}: tinylm export version {brief(text, 20)}; this tinylm reads "
                          f"version {FORMAT_VERSION} (upgrade tinylm to read newer files)")
    config = parse_json(metadata.get(META_CONFIG, "null"), f"{path}: tinylm metadata")
    info = parse_json(metadata.get(META_INFO, "{}"), f"{path}: tinylm metadata")
    if not isinstance(config, dict) or not isinstance(info, dict):
        raise TinyLMError(f"{path}: tinylm metadata has the wrong form")
    check_meta_fields(info, path)
    return config, info


def _exists(path):
    """Something is there (a FIFO or a device too, which the readers then refuse by name)."""
    return os.path.lexists(path)


def _bpe_merges(raw, path):
    """A tokenizer.json's merges, 'left right' strings or [left, right] lists, as pairs of strings."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise TinyLMError(f"{path}: the BPE merges are {type(raw).__name__}, not a list")
    merges = []
    for k, m in enumerate(raw):
        pair = m.split(" ") if isinstance(m, str) else m
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise TinyLMError(f"{path}: merge #{k} is {brief(m)}, not a pair of tokens ('left right' or [left, right])")
        merges.append(tuple(pair))
    return merges


def _adds_no_tokens(post):
    """True for a tokenizer.json post_processor that leaves a text's ids alone: none, ByteLevel (offsets only), a
    template of the sequence alone (as transformers' save_pretrained writes), or a Sequence of those."""
    kind = post.get("type") if isinstance(post, dict) else None
    if kind == "TemplateProcessing":
        single = post.get("single")
        return isinstance(single, list) and all(isinstance(s, dict) and set(s) == {"Sequence"} for s in single)
    if kind == "Sequence":
        return isinstance(post.get("processors"), list) and all(map(_adds_no_tokens, post["processors"]))
    return post is None or kind == "ByteLevel"


def _check_what_tinylm_bpe_does_not_do(data, pre, end_of_text_id, path):
    """One line for a byte-level tokenizer.json the tokenizers library reads otherwise than tinylm's BPE: a space
    put before the text (add_prefix_space), or an added token other than <|endoftext|> at its vocabulary id
    (the library matches added tokens whole, before the BPE), or a post-processor that adds tokens (a template)."""
    prefix = pre.get("add_prefix_space", False)
    if prefix is not False:
        shown = json.dumps(prefix) if prefix in (True, None) else brief(prefix)
        raise TinyLMError(f"{path}: pre_tokenizer.add_prefix_space is {shown}; the "
                          "tokenizers library then puts a space before the text and tinylm's BPE does not")
    post = data.get("post_processor")
    if not _adds_no_tokens(post):
        kind = post.get("type") if isinstance(post, dict) else post
        raise TinyLMError(f"{path}: post_processor {brief(kind, 40)} adds tokens (such as <s>) to the text's "
                          "ids, which tinylm's BPE does not")
    added = data.get("added_tokens") or []
    if not isinstance(added, list):
        raise TinyLMError(f"{path}: added_tokens is {brief(added)}, not a list")
    for t in added:
        content, i = (t.get("content"), t.get("id")) if isinstance(t, dict) else (t, None)
        if content != END_OF_TEXT:
            raise TinyLMError(f"{path}: added token {brief(content, 40)} (id {brief(i, 20)}); tinylm's BPE matches "
                              f"only {END_OF_TEXT} whole, so its ids would differ from the tokenizers library's")
        if type(i) is not int or i != end_of_text_id:
            raise TinyLMError(f"{path}: the added token {END_OF_TEXT} has id {brief(i, 20)}, but the vocabulary "
                              f"gives it {end_of_text_id}; tinylm's ids would differ from the tokenizers library's")


def _load_tokenizer(folder):
    """tinylm_tokenizer.json if present, else vocab.json + merges.txt, else a tokenizer.json's BPE model."""
    path = os.path.join(folder, TINYLM_TOKENIZER_FILE)
    if _exists(path):
        return tokenizer_from_dict(read_json(path, "tokenizer file"))
    vocab, merges = os.path.join(folder, VOCAB_FILE), os.path.join(folder, MERGES_FILE)
    if _exists(vocab) and _exists(merges):
        return BPETokenizer.from_files(vocab, merges)
    path = os.path.join(folder, HF_TOKENIZER_FILE)
    if _exists(path):
        data = read_json(path, "tokenizer file")
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise TinyLMError(f"{path}: not a byte-level BPE tokenizer; add GPT-2's vocab.json and merges.txt")
        # SentencePiece-style BPE (a normalizer, a Metaspace or regex-free pre-tokenizer, byte fallback) cuts text
        # otherwise than GPT-2's pattern, which is what tinylm's BPE follows: its ids would silently differ.
        pre = data.get("pre_tokenizer", {"type": "ByteLevel"})    # none at all: a bare vocabulary and merges
        if data.get("normalizer") is not None or model.get("byte_fallback") or not isinstance(pre, dict) or \
                pre.get("type") != "ByteLevel" or pre.get("use_regex") is False:
            raise TinyLMError(f"{path}: a BPE tokenizer that is not GPT-2's byte-level one (normalizer, "
                              "pre_tokenizer or byte_fallback); tinylm's BPE would give other ids")
        tok = BPETokenizer(model["vocab"], _bpe_merges(model.get("merges"), path))     # checks the vocabulary first
        _check_what_tinylm_bpe_does_not_do(data, pre, tok.end_of_text_id, path)
        return tok
    raise TinyLMError(f"no tokenizer in {folder}: expected {VOCAB_FILE} and {MERGES_FILE} "
                      f"(GPT-2's), a byte-level BPE {HF_TOKENIZER_FILE}, or {TINYLM_TOKENIZER_FILE}")


def folder_config(cfg, path="config.json"):
    """GPTConfig or LlamaConfig from a config.json dict, the reader picked by its model_type ('gpt2' or 'llama')."""
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type == "llama":
        return llama_config_from_hf(cfg, path)
    if model_type == "gpt2" or not isinstance(cfg, dict):
        return config_from_hf(cfg, path)
    raise TinyLMError(f"{path}: model_type is {brief(model_type)}; tinylm reads GPT-2 (model_type 'gpt2') and "
                      "Llama (model_type 'llama') folders")


def _weights_path(folder):
    """The folder's model.safetensors, or one line saying why tinylm cannot read the weights there."""
    weights_path = os.path.join(folder, WEIGHTS_FILE)
    if _exists(weights_path):
        return weights_path
    if os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
        raise TinyLMError(f"{folder} holds a sharded model (model.safetensors.index.json); "
                          f"tinylm reads a single {WEIGHTS_FILE}")
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        raise TinyLMError(f"{folder} has pytorch_model.bin but no {WEIGHTS_FILE}; tinylm reads only "
                          "safetensors (a .bin is a pickle, which could run code)")
    raise TinyLMError(f"{folder} has no {WEIGHTS_FILE}")


def _gpt2_names(tensors, weights_path):
    """(tensors under nanoGPT's names, lm_head or None): the hub's original files have no "transformer." prefix,
    save_pretrained's do; older transformers saved the causal mask as a buffer, which is skipped."""
    found, lm_head = {}, None
    for name, array in tensors.items():
        if name == "lm_head.weight":
            lm_head = array
            continue
        key = name if name.startswith("transformer.") else "transformer." + name
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if key in found:
            raise TinyLMError(f"{weights_path}: tensor {brief(name)} appears both with and without the "
                              "transformer. prefix")
        found[key] = array
    return found, lm_head


def _checked_params(found, config, dtype, weights_path):
    """{name: array (out, in), in dtype} of exactly the tensors config implies, each of its shape; one line if not."""
    arch, model = arch_of(config), MODELS[arch_of(config)]
    what = f"a {LABELS[arch]} with n_layer={config.n_layer:,}"
    # The tensors config.json claims are compared with those the file holds before their list is built: a
    # config.json of n_layer 10⁸ beside a small file is refused at once, in the file's own time and memory.
    if model.count_tensors(config) > len(found):
        missing = list(itertools.islice((k for k, _ in model.iter_param_shapes(config) if k not in found), 4))
        raise TinyLMError(f"{weights_path}: missing tensor(s) {', '.join(missing[:3])}"
                          f"{' ...' if len(missing) > 3 else ''} for {what} "
                          f"({model.count_tensors(config):,} tensors; the file holds {len(found):,})")
    shapes = model.param_shapes(config)
    missing = [k for k in shapes if k not in found]
    if missing:
        raise TinyLMError(f"{weights_path}: missing tensor(s) {', '.join(missing[:3])}"
                          f"{' ...' if len(missing) > 3 else ''} for {what}")
    unexpected = sorted(set(found) - set(shapes))
    if unexpected:
        raise TinyLMError(f"{weights_path}: unexpected tensor(s) {', '.join(brief(n) for n in unexpected[:3])}; "
                          f"not a {LABELS[arch]} of the shape config.json describes")
    params = {}
    for name, shape in shapes.items():
        array = found[name]
        stored = tuple(shape[::-1]) if is_transposed(name) else tuple(shape)
        if array.shape != stored:
            raise TinyLMError(f"{weights_path}: tensor {name!r} has shape {array.shape}, expected {stored} "
                              f"from {CONFIG_FILE}")
        if array.dtype.kind != "f":
            raise TinyLMError(f"{weights_path}: tensor {name!r} has dtype {array.dtype}, expected floating point")
        if is_transposed(name):
            array = array.T                       # a view: (in, out) -> (out, in)
        if array.dtype != dtype:
            array = array.astype(dtype)           # float16/bfloat16 -> float32: a copy, in the view's order
        params[name] = array
    return params


def import_hf(folder, dtype=np.float32, mmap=True):
    """Read a GPT-2 or Llama folder: {'params', 'config', 'tokenizer', 'opt_state': None, 'meta'}, as load_checkpoint.

    config.json's model_type picks the reader ('gpt2' or 'llama', folder_config). params are under tinylm's
    names (nanoGPT's; a Llama's are LlamaForCausalLM's own) with linear weights (out, in). With mmap
    (the default) and weights stored in `dtype`, every array is a read-only view into the
    memory-mapped file; GPT-2's (out, in) weights are transposed views of the stored (in, out)
    ones, so nothing is copied and pages are read on first use. Other stored dtypes
    (float16, bfloat16) are converted, which copies. mmap=False reads the file into memory once.
    A model exported by tinylm with bias=False comes back without biases (when they are still zero).
    Raises TinyLMError with one line for a missing file, bad JSON, an architecture or config field tinylm
    cannot run, a missing or unexpected tensor, or a shape that does not match config.json.
    """
    dtype = np.dtype(dtype)
    if dtype.name not in ("float32", "float64"):
        raise TinyLMError(f"import dtype must be float32 or float64, got {dtype.name}")
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "not found"
        raise TinyLMError(f"model folder {what}: {folder}")
    config_path = os.path.join(folder, CONFIG_FILE)
    if not _exists(config_path):
        raise TinyLMError(f"{folder} has no {CONFIG_FILE}: not a Hugging Face model folder")
    config = folder_config(read_json(config_path, "model config"), config_path)
    arch = arch_of(config)
    weights_path = _weights_path(folder)
    tensors, metadata = load_file(weights_path, mmap=mmap)
    if arch == "gpt2":
        found, lm_head = _gpt2_names(tensors, weights_path)
    else:              # a tied Llama's head is the embedding; transformers may save it all the same
        found = dict(tensors)
        lm_head = found.pop("lm_head.weight", None) if config.tie_embeddings else None
    params = _checked_params(found, config, dtype, weights_path)
    if lm_head is not None:
        embedding = params[EMBEDDINGS[arch]]
        if lm_head.shape != embedding.shape or not np.array_equal(lm_head.astype(dtype, copy=False), embedding):
            raise TinyLMError(f"{weights_path}: lm_head.weight differs from the token embedding; " + (
                "tinylm supports only GPT-2's tied output head" if arch == "gpt2" else
                "but tie_word_embeddings is true"))

    check_finite(params, weights_path)
    saved_config, info = _tinylm_metadata(metadata, weights_path, FORMAT_NAMES[arch])
    if saved_config is not None:
        if arch == "gpt2" and saved_config.get("bias") is False:        # a Llama has no biases to drop
            biases = [k for k in params if k.endswith(".bias")]
            if all(not np.any(params[k]) for k in biases):
                params = {k: v for k, v in params.items() if not k.endswith(".bias")}
                config = dataclasses.replace(config, bias=False)
        dropout = saved_config.get("dropout")
        if isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1:
            config = dataclasses.replace(config, dropout=float(dropout))

    tokenizer = _load_tokenizer(folder)
    if tokenizer.vocab_size != config.vocab_size:
        raise TinyLMError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but {CONFIG_FILE} "
                          f"says vocab_size {config.vocab_size}")
    stored_dtypes = sorted({str(found[k].dtype) for k in params})
    meta = {"format": FORMAT_NAMES[arch] if saved_config is not None else "hf-" + arch,
            "source": os.path.abspath(folder), "dtype": dtype.name, "stored_dtype": ",".join(stored_dtypes),
            "step": info.get("step"), "best_val_loss": info.get("best_val_loss"),
            "train_args": info.get("train_args") or {}, "config": config.to_dict(), "tokenizer": tokenizer.to_dict()}
    return {"params": params, "config": config, "tokenizer": tokenizer, "opt_state": None, "meta": meta}


def tokenizer_kind(path):
    """'char' or 'bpe': the kind of tokenizer of a checkpoint (read from its metadata alone) or of a GPT-2 folder
    (a tinylm_tokenizer.json means a character model), without loading any weight."""
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.basename(path) in (CONFIG_FILE, WEIGHTS_FILE):
        path = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "char" if _exists(os.path.join(path, TINYLM_TOKENIZER_FILE)) else "bpe"
    if path.endswith(".bin"):
        return None                  # a llama2.c model.bin: its tokenizer.bin says, once it is read
    kind = (load_meta(path).get("tokenizer") or {}).get("type")
    return kind if isinstance(kind, str) else None


def load_any(path, with_optimizer=False, dtype=np.float32, mmap=True, tokenizer_bin=None):
    """A tinylm checkpoint (.npz file), a GPT-2 or Llama folder (config.json + model.safetensors) or a llama2.c
    model.bin (with tokenizer_bin, else the tokenizer.bin beside it), read the same way.

    Returns the dict of load_checkpoint. A folder's config.json or model.safetensors may also
    be named directly. dtype and mmap apply to folders only (a .npz keeps its own dtype).
    """
    path = os.fspath(path)
    if path.endswith(".bin") and not os.path.isdir(path):
        return load_llama2c(path, tokenizer_bin)
    if os.path.isfile(path) and os.path.basename(path) in (CONFIG_FILE, WEIGHTS_FILE):
        path = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        if _exists(os.path.join(path, CONFIG_FILE)):
            return import_hf(path, dtype=dtype, mmap=mmap)
        hint = next((f" (did you mean {os.path.join(path, n)}?)" for n in ("ckpt.npz", "best.npz")
                     if os.path.isfile(os.path.join(path, n))), "")
        raise TinyLMError(f"{path} is a folder without {CONFIG_FILE}: neither a Hugging Face model folder "
                          f"nor a tinylm checkpoint file{hint}")
    return load_checkpoint(path, with_optimizer=with_optimizer)
