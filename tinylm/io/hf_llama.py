"""The Llama's side of a Hugging Face folder: its config.json both ways and a tokenizer.json transformers reads.

A Llama folder holds config.json (LlamaConfig's field names), model.safetensors (the weights under
LlamaForCausalLM's names, which are tinylm's own, every linear weight (out, in) as in tinylm) and, for
`transformers.AutoTokenizer`, tokenizer.json + tokenizer_config.json (a PreTrainedTokenizerFast). hf.py writes and
reads the folder, the same way for GPT-2 and Llama; this module, below it, knows what is the Llama's own. The
typed-field checks both readers use are here too (hf.py imports this module, never the other way round).

A config.json field tinylm does not compute (rotary scaling, biases, a sliding window, a head width other
than C/H, an activation other than SiLU, ...) is refused by name, never ignored: the model would load and
compute something else.
"""
import json
import math

from tinylm.core.llama import LlamaConfig
from tinylm.errors import TinyLMError, brief
from tinylm.text.bpe import END_OF_TEXT, BPETokenizer
from tinylm.text.char import CharTokenizer

LLAMA_ARCHITECTURES = {"LlamaForCausalLM"}

# What LlamaConfig assumes for a field that config.json leaves out.
LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
                  "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                  "rope_theta": 10000.0, "attention_dropout": 0.0, "head_dim": None}

# Fields whose only value tinylm computes: any other is refused by name. transformers 4 spells the rotary
# settings rope_theta + rope_scaling, transformers 5 rope_parameters (read in rope_theta_of).
ONLY_VALUES = {"hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,), "pretraining_tp": (1, None),
               "rope_scaling": (None,), "sliding_window": (None,), "use_sliding_window": (False, None),
               "quantization_config": (None,), "is_encoder_decoder": (False,), "add_cross_attention": (False,)}
ROPE_KEYS = {"rope_type", "type", "rope_theta"}


def check_int(cfg, key, path):
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TinyLMError(f"{path}: {key} must be a positive integer, got {brief(value)}")
    return value


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_flag(cfg, key, path):
    value = cfg[key]
    if not isinstance(value, bool):
        raise TinyLMError(f"{path}: {key} must be true or false, got {brief(value)}")
    return value


def check_positive_number(value, key, path):
    """value as a float when it is a JSON number in (0, ∞) (NaN, infinities and strings refused)."""
    try:
        ok = is_number(value) and 0 < float(value) < math.inf
    except OverflowError:          # an integer beyond any float
        ok = False
    if not ok:
        raise TinyLMError(f"{path}: {key} must be a positive finite number, got {brief(value)}")
    return float(value)


# ----------------------------------------------------------------------------- export


def llama_hf_config(config, tokenizer=None, dtype="float32"):
    """The config.json dict of a tinylm LlamaConfig, in LlamaConfig's field names (both transformers 4's and 5's)."""
    eot = getattr(tokenizer, "end_of_text_id", None)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.n_embd // config.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,          # tinylm's dropout is a training setting, kept in its own saved config
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": eot,               # LlamaConfig's defaults 1 and 2 would name ordinary tokens here
        "eos_token_id": eot,
        "pad_token_id": None,
        "torch_dtype": dtype,
    }


def _fast_tokenizer(model, pre_tokenizer, decoder, added_tokens):
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens, "normalizer": None,
            "pre_tokenizer": pre_tokenizer, "post_processor": None, "decoder": decoder, "model": model}


def _bpe_model(vocab, merges):
    """The tokenizers library's BPE model; ignore_merges false, so a word is merged by rank as tinylm does."""
    return {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": [list(m) for m in merges]}


def fast_tokenizer_files(tok, block_size):
    """{file name: text} of tokenizer.json and tokenizer_config.json: a PreTrainedTokenizerFast giving tinylm's ids.

    BPE: GPT-2's byte-level pre-tokenizer (its pattern, which text/bpe.py's pretokenize follows) and tinylm's
    vocabulary and ranked merges; <|endoftext|> is a special token, as tinylm encodes it. Characters: a BPE model
    without merges and without a pre-tokenizer cuts the text into characters, each looked up in the vocabulary
    (any character, not only ASCII); the Fuse decoder joins them back without spaces.
    """
    if isinstance(tok, CharTokenizer):
        data = _fast_tokenizer(_bpe_model({c: i for i, c in enumerate(tok.chars)}, []), None, {"type": "Fuse"}, [])
        special = {}
    elif isinstance(tok, BPETokenizer):
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        added = [] if tok.end_of_text_id is None else [
            {"id": tok.end_of_text_id, "content": END_OF_TEXT, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}]
        data = _fast_tokenizer(_bpe_model(tok.vocab, tok.merges), byte_level, byte_level, added)
        special = {} if tok.end_of_text_id is None else {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT}
    else:
        raise TinyLMError(f"cannot export a tokenizer of type {type(tok).__name__}")
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
                  "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False, **special}
    return {"tokenizer.json": json.dumps(data, ensure_ascii=False, separators=(",", ":")),
            "tokenizer_config.json": json.dumps(tok_config, indent=2)}


# ----------------------------------------------------------------------------- import


def _check_only_values(cfg, path):
    """Refuse, by name, a field set to something tinylm's Llama does not compute (True is not 1, nor 1.0 1)."""
    for key, allowed in ONLY_VALUES.items():
        value = cfg.get(key, allowed[0])
        if not any(type(value) is type(a) and value == a for a in allowed):
            shown = " or ".join(json.dumps(a) for a in allowed)
            raise TinyLMError(f"{path}: {key} is {brief(value)}; tinylm's Llama computes only {key} = {shown}")


def rope_theta_of(cfg, path):
    """θ of the rotary angles from config.json as written (before defaults): transformers 5's rope_parameters,
    transformers 4's rope_theta, or both (then equal), else LlamaConfig's default 10000."""
    theta = check_positive_number(cfg["rope_theta"], "rope_theta", path) if "rope_theta" in cfg else None
    rope = cfg.get("rope_parameters")
    if rope is None:
        return LLAMA_DEFAULTS["rope_theta"] if theta is None else theta
    if not isinstance(rope, dict):
        raise TinyLMError(f"{path}: rope_parameters must be an object or null, got {brief(rope)}")
    for key in rope:
        if key not in ROPE_KEYS:
            raise TinyLMError(f"{path}: rope_parameters.{brief(key, 40)} is not supported; tinylm's rotary "
                              "embedding has no scaling (rope_type 'default', rope_theta)")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise TinyLMError(f"{path}: rope_parameters.rope_type is {brief(kind)}; tinylm computes only 'default' "
                          "(unscaled) rotary angles")
    if "rope_theta" not in rope:
        return LLAMA_DEFAULTS["rope_theta"] if theta is None else theta
    inner = check_positive_number(rope["rope_theta"], "rope_parameters.rope_theta", path)
    if theta is not None and inner != theta:
        raise TinyLMError(f"{path}: rope_theta {theta:g} and rope_parameters.rope_theta {inner:g} differ")
    return inner


def llama_config_from_hf(cfg, path="config.json"):
    """LlamaConfig from a config.json dict (model_type 'llama'); TinyLMError naming the first field tinylm cannot run.

    Every field read is type-checked before it is used (JSON NaN and infinities refused); a value quoted in a
    message is cut short (errors.brief): a stranger's config.json is only data.
    """
    archs = cfg.get("architectures")
    if archs is None:
        archs = []
    if not isinstance(archs, list) or not all(isinstance(a, str) and a in LLAMA_ARCHITECTURES for a in archs):
        raise TinyLMError(f"{path}: unsupported architecture {brief(archs)} for model_type 'llama'; tinylm "
                          "reads LlamaForCausalLM")
    _check_only_values(cfg, path)
    theta = rope_theta_of(cfg, path)
    cfg = {**LLAMA_DEFAULTS, **cfg}
    dims = {k: check_int(cfg, k, path) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                  "num_hidden_layers", "num_attention_heads", "max_position_embeddings")}
    n_head = dims["num_attention_heads"]
    n_kv_head = n_head if cfg["num_key_value_heads"] is None else check_int(cfg, "num_key_value_heads", path)
    if cfg["head_dim"] is not None and (check_int(cfg, "head_dim", path) * n_head != dims["hidden_size"]):
        raise TinyLMError(f"{path}: head_dim is {cfg['head_dim']}; tinylm's heads are hidden_size / "
                          f"num_attention_heads = {dims['hidden_size'] / n_head:g} wide")
    eps = check_positive_number(cfg["rms_norm_eps"], "rms_norm_eps", path)
    tied = check_flag(cfg, "tie_word_embeddings", path)
    dropout = cfg["attention_dropout"]
    if not is_number(dropout) or not 0 <= dropout < 1:
        raise TinyLMError(f"{path}: attention_dropout must be a number in [0, 1), got {brief(dropout)}")
    try:
        return LlamaConfig(block_size=dims["max_position_embeddings"], vocab_size=dims["vocab_size"],
                           n_layer=dims["num_hidden_layers"], n_head=n_head, n_kv_head=n_kv_head,
                           n_embd=dims["hidden_size"], ffn_hidden=dims["intermediate_size"], rope_theta=theta,
                           norm_eps=eps, tie_embeddings=tied).validate()
    except TinyLMError as e:
        raise TinyLMError(f"{path}: {e}".replace("--", "")) from None
