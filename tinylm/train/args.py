"""The training run's settings: TrainArgs (one field per flag of train.py), their help, and their checks."""
import dataclasses

import numpy as np

from tinylm.core import gpt2 as G
from tinylm.core.arch import ARCHS
from tinylm.core.llama import LlamaConfig
from tinylm.core.polar import METHODS
from tinylm.errors import TinyLMError
from tinylm.io.checkpoint import CheckpointError
from tinylm.text.data import DEFAULT_DATA, ENCODING_ERRORS

MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "vocab_size")
LLAMA_FIELDS = ("n_kv_head", "ffn_hidden", "rope_theta", "tie_embeddings")     # the flags only --arch llama uses


def model_fields(arch):
    """The flags that set the shape of a model of this arch (a resumed or fine-tuned model keeps them)."""
    return MODEL_FIELDS + LLAMA_FIELDS if arch == "llama" else MODEL_FIELDS


@dataclasses.dataclass
class TrainArgs:
    """Every training setting; the defaults are nanoGPT's CPU recipe for Tiny Shakespeare."""
    data: str = DEFAULT_DATA
    out_dir: str = "out"
    init_from: str = "scratch"
    tokenizer_bin: str = None
    arch: str = "gpt2"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = False
    n_kv_head: int = None           # None: as many as n_head
    ffn_hidden: int = None          # None: Llama's rule, core.llama.default_ffn_hidden
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    batch_size: int = 12
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    seed: int = 1337
    encoding_errors: str = "strict"
    tokenizer: str = "char"
    vocab_size: int = 512
    sample_tokens: int = 300
    progress: bool = True
    track_spectra: bool = False
    mpi_timeout: float = 60.0
    unknown_chars: str = "error"
    replace_char: str = " "
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: str = "all"
    lora_init: str = "lora"
    merge: bool = False
    optimizer: str = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    ns_steps: int = 5
    orthogonalize: str = "eigh"
    overwrite: bool = False


HELP = {
    "data": "UTF-8 text file to train on (default: the bundled Tiny Shakespeare)",
    "out_dir": "folder for ckpt.npz (latest state), best.npz (best validation loss) and metrics.jsonl",
    "init_from": "'scratch' for a new model, 'resume' to continue from OUT_DIR/ckpt.npz, or a checkpoint file, "
                 "GPT-2 or Llama folder or llama2.c model.bin to fine-tune (a new run in OUT_DIR; the source is only "
                 "read)",
    "tokenizer_bin": "with --init_from a llama2.c model.bin: its tokenizer.bin (default: the tokenizer.bin beside it)",
    "arch": "'gpt2' (learned positions, layer norm, GELU) or 'llama' (rotary positions, RMSNorm, SwiGLU, "
            "shared K/V heads, no biases; Hugging Face's LlamaForCausalLM names); a resumed or fine-tuned run keeps "
            "its model's",
    "n_layer": "number of transformer blocks",
    "n_head": "attention heads per block (must divide n_embd)",
    "n_embd": "width of the residual stream",
    "block_size": "context length in tokens",
    "dropout": "dropout probability during training, in [0, 1)",
    "bias": "use biases in linear layers and layer norms (true/false; GPT-2 only: Llama has none)",
    "n_kv_head": "with --arch llama: key/value heads per block, each shared by n_head/n_kv_head query heads "
                 "(must divide n_head; default: n_head, no sharing)",
    "ffn_hidden": "with --arch llama: width of the SwiGLU MLP (default: 2/3 of 4·n_embd rounded up to a "
                  "multiple of 32)",
    "rope_theta": "with --arch llama: base of the rotary angles, pair j turning by rope_theta^(-2j/head width) a "
                  "position",
    "tie_embeddings": "with --arch llama: the output head is the token embedding, stored once (true/false)",
    "batch_size": "sequences per step",
    "max_iters": "total optimizer steps",
    "learning_rate": "peak learning rate, reached after warmup",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_iters": "steps of linear warmup",
    "lr_decay_iters": "step at which the cosine decay reaches min_lr; on the command line it follows --max_iters unless given",
    "weight_decay": "AdamW decoupled weight decay, applied to matrices only (with --optimizer muon: to the "
                    "embeddings; the block matrices get none)",
    "beta1": "AdamW first-moment decay",
    "beta2": "AdamW second-moment decay",
    "grad_clip": "clip the global gradient L2 norm to this value (0 disables)",
    "eval_interval": "evaluate, log and checkpoint every this many steps",
    "eval_iters": "batches per loss estimate at each evaluation",
    "seed": "random seed for initialization, batches and dropout",
    "tokenizer": "'char' (one token per distinct character) or 'bpe' (byte-level BPE learned from the text)",
    "vocab_size": "with --tokenizer bpe: vocabulary size, at least 257 (256 bytes + <|endoftext|>)",
    "encoding_errors": "'strict' refuses text that is not UTF-8 (naming the first bad byte); 'replace' reads it "
                       "with U+FFFD for bad bytes; 'bytes' reads every byte as one character (Latin-1), never fails",
    "sample_tokens": "length of the sample printed at the end (0 for none)",
    "progress": "show the progress bar (true/false)",
    "track_spectra": "at every evaluation, log each weight matrix's spectral metrics to OUT_DIR/spectra.jsonl",
    "mpi_timeout": "under mpiexec: seconds a rank waits for the others at a step (longer after an evaluation, "
                   "20 times as long for rank 0's setup) before it gives up with one line",
    "unknown_chars": "fine-tuning a character model on text with characters its vocabulary lacks: 'error' names "
                     "them, 'drop' leaves them out, 'replace' writes --replace_char instead",
    "replace_char": "with --unknown_chars replace: the vocabulary's character written for an unknown one",
    "lora_rank": "fine-tune low-rank adapters of this rank R instead of every weight: each target W becomes "
                 "W + (α/R)·B A, only A and B trained (no weight decay), the rest frozen; 0 for full fine-tuning",
    "lora_alpha": "adapter scale α (α/R multiplies B A); 0 means α = R",
    "lora_targets": "matrices that get adapters: 'all' block matrices or a comma list of attn.c_attn, "
                    "attn.c_proj, mlp.c_fc, mlp.c_proj (c_proj is both); a Llama's of q_proj, k_proj, v_proj, "
                    "o_proj, gate_proj, up_proj, down_proj; or full parameter names",
    "lora_init": "'lora' (A random, B zero) or 'pissa' (A, B from the top-R singular triplets of W, the "
                 "residual frozen)",
    "merge": "with adapters: at the end write OUT_DIR/merged.npz, best.npz with W + (α/R)·B A folded in",
    "overwrite": "a new run (not --init_from resume) into an --out_dir that holds a checkpoint: replace it "
                 "(without this flag such a run is refused, so that no finished run is lost by a slip)",
    "optimizer": "'adamw' (nanoGPT's) or 'muon': the block matrices' updates orthogonalized (every singular "
                 "value set to 1, see tinylm/core/muon.py), AdamW at --learning_rate for embeddings and gains",
    "muon_lr": "with --optimizer muon: peak learning rate of the block matrices (same warmup and cosine "
               "shape as --learning_rate's)",
    "muon_momentum": "with --optimizer muon: Nesterov momentum of the block matrices",
    "ns_steps": "with --orthogonalize newton_schulz: iterations of the quintic Newton-Schulz",
    "orthogonalize": "with --optimizer muon: how the polar factor U Vᵀ is found: 'eigh' (eigendecomposition "
                     "of the small Gram matrix, exact), 'svd' (exact, slower) or 'newton_schulz' (approximate, "
                     "products only)",
}


def model_config(a, vocab_size):
    """The GPTConfig or LlamaConfig the args describe, validated (its errors name the flag)."""
    if a.arch == "llama":
        return LlamaConfig(block_size=a.block_size, vocab_size=vocab_size, n_layer=a.n_layer, n_head=a.n_head,
                           n_kv_head=a.n_kv_head, n_embd=a.n_embd, ffn_hidden=a.ffn_hidden, rope_theta=a.rope_theta,
                           tie_embeddings=a.tie_embeddings, dropout=a.dropout).validate()
    return G.GPTConfig(block_size=a.block_size, vocab_size=vocab_size, n_layer=a.n_layer, n_head=a.n_head,
                       n_embd=a.n_embd, dropout=a.dropout, bias=a.bias).validate()


FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(TrainArgs)}
OPTIMIZERS = ("adamw", "muon")


def check_muon_args(optimizer, muon_lr, muon_momentum, ns_steps, orthogonalize_method):
    """The reason the Muon settings cannot work, or None."""
    if optimizer not in OPTIMIZERS:
        return f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}"
    if not (np.isfinite(muon_lr) and muon_lr > 0):
        return f"--muon_lr must be a finite number > 0, got {muon_lr}"
    if not 0.0 <= muon_momentum < 1.0:
        return f"--muon_momentum must be in [0, 1), got {muon_momentum}"
    if ns_steps < 1:
        return f"--ns_steps must be at least 1, got {ns_steps}"
    if orthogonalize_method not in METHODS:
        return f"--orthogonalize must be one of {', '.join(METHODS)}, got {orthogonalize_method!r}"
    return None


def validate_args(a):
    """Refuse settings that cannot work, naming the flag."""
    positive_ints = ("batch_size", "eval_interval", "eval_iters")
    for name in positive_ints:
        if getattr(a, name) <= 0:
            raise TinyLMError(f"--{name} must be a positive integer, got {getattr(a, name)}")
    for name in ("max_iters", "warmup_iters", "lr_decay_iters", "sample_tokens"):
        if getattr(a, name) < 0:
            raise TinyLMError(f"--{name} must be >= 0, got {getattr(a, name)}")
    for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
        value = getattr(a, name)
        if not np.isfinite(value) or value < 0:
            raise TinyLMError(f"--{name} must be a finite number >= 0, got {value}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(a, name) < 1.0:
            raise TinyLMError(f"--{name} must be in [0, 1), got {getattr(a, name)}")
    if a.tokenizer not in ("char", "bpe"):
        raise TinyLMError(f"--tokenizer must be 'char' or 'bpe', got {a.tokenizer!r}")
    if a.tokenizer == "bpe" and a.vocab_size < 257:
        raise TinyLMError(f"--vocab_size must be at least 257 for --tokenizer bpe, got {a.vocab_size}")
    if a.encoding_errors not in ENCODING_ERRORS:
        raise TinyLMError(f"--encoding_errors must be one of {', '.join(ENCODING_ERRORS)}, got {a.encoding_errors!r}")
    if a.seed < 0:
        raise TinyLMError(f"--seed must be >= 0, got {a.seed}")
    problem = check_muon_args(a.optimizer, a.muon_lr, a.muon_momentum, a.ns_steps, a.orthogonalize)
    if problem:
        raise TinyLMError(problem)
    check_arch_args(a)
    if a.optimizer == "muon" and a.lora_rank:
        raise TinyLMError("--optimizer muon does not step adapters; fine-tune with --lora_rank and the default "
                          "--optimizer adamw, or fully (no --lora_rank) with muon")
    if a.init_from == "scratch":
        model_config(a, 1)            # the model's shape, before any folder is made or data read


def check_arch_args(a):
    """--arch, and what a Llama cannot do yet, each refused with one line rather than silently ignored."""
    if a.arch not in ARCHS:
        raise TinyLMError(f"--arch must be one of {', '.join(ARCHS)}, got {a.arch!r}")
    if a.arch != "llama":
        return
    if a.bias:
        raise TinyLMError("--bias true: a Llama has no biases; leave --bias out with --arch llama")


def check_saved_args(saved, ckpt_path):
    """Training settings kept in a checkpoint, each of the type its flag takes (a stranger's file is only data)."""
    defaults = TrainArgs()
    good = {}
    for k, v in saved.items():
        if k not in HELP:
            continue
        want = FIELD_TYPES[k]
        if v is None and getattr(defaults, k) is None:     # a setting whose default is worked out from others
            good[k] = None
            continue
        ok = (isinstance(v, bool) if want is bool else
              isinstance(v, (int, float)) and not isinstance(v, bool) if want is float else
              isinstance(v, int) and not isinstance(v, bool) if want is int else isinstance(v, want))
        if not ok:
            raise CheckpointError(f"checkpoint {ckpt_path}: saved setting {k!r} is {v!r}, not of type {want.__name__}")
        good[k] = want(v)
    return good


def unused_flag_notes(a, explicit):
    """Notes for flags given that this run does not use (Muon's settings under AdamW, Newton-Schulz's under eigh,
    Llama's under GPT-2 and GPT-2's under Llama)."""
    notes = []
    llama_only = [f"--{k}" for k in LLAMA_FIELDS if k in explicit]
    if a.arch != "llama" and llama_only:
        notes.append(f"note: {', '.join(llama_only)} {'only applies' if len(llama_only) == 1 else 'only apply'} with "
                     f"--arch llama; this run is {a.arch}")
    if a.arch == "llama" and "bias" in explicit:
        notes.append("note: --bias only applies with --arch gpt2; a Llama has no biases")
    muon_only = [f"--{k}" for k in ("muon_lr", "muon_momentum", "ns_steps", "orthogonalize") if k in explicit]
    if a.optimizer != "muon" and muon_only:
        notes.append(f"note: {', '.join(muon_only)} {'only applies' if len(muon_only) == 1 else 'only apply'} with "
                     f"--optimizer muon; this run uses {a.optimizer}")
    elif a.optimizer == "muon" and "ns_steps" in explicit and a.orthogonalize != "newton_schulz":
        notes.append(f"note: --ns_steps only applies with --orthogonalize newton_schulz; this run uses {a.orthogonalize}")
    return notes
