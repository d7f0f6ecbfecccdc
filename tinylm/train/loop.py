"""The training loop: batches, AdamW steps, evaluation, metrics log, checkpoints, resume, a sample at the end."""
import dataclasses
import json
import os
import signal
import sys
import tempfile
import time

import numpy as np
from tqdm import tqdm

from tinylm.train import distributed
from tinylm.train import finetune
from tinylm.fast import model as M
from tinylm.core import gpt2 as G
from tinylm.fast import decode as D
from tinylm.lowrank.adapters import adapter_grads_unmerged, adapter_params, merged_params
from tinylm.atomic import atomic_write, remove_stale_temp_files
from tinylm.text.bpe import train_bpe
from tinylm.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinylm.text.data import DEFAULT_DATA, ENCODING_ERRORS, check_long_enough, get_batch, load_ids, read_text, train_val_split
from tinylm.errors import TinyLMError
from tinylm.core.gpt2 import is_block_matrix
from tinylm.core.muon import muon_init
from tinylm.core.optim import adamw_init, clip_factor, global_norm, learning_rate_at
from tinylm.core.polar import METHODS
from tinylm.fast.optim import adamw_step, muon_step
from tinylm.fast.parallel import blas_threads
from tinylm.core.sampling import sample_next
from tinylm.text.char import CharTokenizer
from tinylm.analysis.tracking import log_spectra

LOG_FILES = ("metrics.jsonl", "spectra.jsonl")     # one JSON line per evaluation
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "vocab_size")


@dataclasses.dataclass
class TrainArgs:
    """Every training setting; the defaults are nanoGPT's CPU recipe for Tiny Shakespeare."""
    data: str = DEFAULT_DATA
    out_dir: str = "out"
    init_from: str = "scratch"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = False
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
    "init_from": "'scratch' for a new model, 'resume' to continue from OUT_DIR/ckpt.npz, or a checkpoint file "
                 "or GPT-2 folder to fine-tune (a new run in OUT_DIR; the source is only read)",
    "n_layer": "number of transformer blocks",
    "n_head": "attention heads per block (must divide n_embd)",
    "n_embd": "width of the residual stream",
    "block_size": "context length in tokens",
    "dropout": "dropout probability during training, in [0, 1)",
    "bias": "use biases in linear layers and layer norms (true/false)",
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
                    "attn.c_proj, mlp.c_fc, mlp.c_proj (c_proj is both) or full parameter names",
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
    """The GPTConfig the args describe, validated (its errors name the flag)."""
    return G.GPTConfig(block_size=a.block_size, vocab_size=vocab_size, n_layer=a.n_layer, n_head=a.n_head,
                       n_embd=a.n_embd, dropout=a.dropout, bias=a.bias).validate()


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
    if a.optimizer == "muon" and a.lora_rank:
        raise TinyLMError("--optimizer muon does not step adapters; fine-tune with --lora_rank and the default "
                          "--optimizer adamw, or fully (no --lora_rank) with muon")
    if a.init_from == "scratch":
        model_config(a, 1)            # the model's shape, before any folder is made or data read


def prepare_out_dir(out_dir):
    """Create out_dir and prove it is writable now, not after an hour of training; clear temp files of a crash."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir) as f:
            f.write(b"tinylm")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise TinyLMError(f"cannot write to --out_dir {out_dir}: {e.strerror or e}") from None
    remove_stale_temp_files(out_dir, ("ckpt.npz", "best.npz", "merged.npz") + LOG_FILES)


def check_saved_args(saved, ckpt_path):
    """Training settings kept in a checkpoint, each of the type its flag takes (a stranger's file is only data)."""
    defaults = TrainArgs()
    good = {}
    for k, v in saved.items():
        if k not in HELP:
            continue
        want = type(getattr(defaults, k))
        ok = (isinstance(v, bool) if want is bool else
              isinstance(v, (int, float)) and not isinstance(v, bool) if want is float else
              isinstance(v, int) and not isinstance(v, bool) if want is int else isinstance(v, want))
        if not ok:
            raise CheckpointError(f"checkpoint {ckpt_path}: saved setting {k!r} is {v!r}, not of type {want.__name__}")
        good[k] = want(v)
    return good


def unused_flag_notes(a, explicit):
    """Notes for flags given that this run does not use (Muon's settings under AdamW, Newton-Schulz's under eigh)."""
    notes = []
    muon_only = [f"--{k}" for k in ("muon_lr", "muon_momentum", "ns_steps", "orthogonalize") if k in explicit]
    if a.optimizer != "muon" and muon_only:
        notes.append(f"note: {', '.join(muon_only)} only apply with --optimizer muon; this run uses {a.optimizer}")
    elif a.optimizer == "muon" and "ns_steps" in explicit and a.orthogonalize != "newton_schulz":
        notes.append(f"note: --ns_steps only applies with --orthogonalize newton_schulz; this run uses {a.orthogonalize}")
    return notes


def init_optimizer(a, params):
    """The optimizer state for a new run: AdamW's moments, or Muon's momentum and AdamW for the rest."""
    if a.optimizer == "muon":
        try:
            return muon_init(params)
        except ValueError as e:
            raise TinyLMError(f"--optimizer muon: {e}") from None
    return adamw_init(params)


def refuse_to_replace(a):
    """A new run into a folder that holds a checkpoint is refused unless --overwrite says to replace it."""
    ckpt = os.path.join(a.out_dir, "ckpt.npz")
    if a.init_from not in ("scratch", "resume"):
        finetune.check_not_source(a.init_from, a.out_dir)      # the more telling reason, when it is the one
    if a.init_from != "resume" and not a.overwrite and os.path.exists(ckpt):
        raise TinyLMError(f"{ckpt} holds an earlier run; continue it with --init_from resume, replace it with "
                          f"--overwrite, or choose another --out_dir")


def start_fresh(out_dir, log):
    """A new run: its logs start empty, and an earlier run's checkpoint (--overwrite) is named before it is replaced."""
    if os.path.exists(os.path.join(out_dir, "ckpt.npz")):
        log(f"note: --overwrite: {os.path.join(out_dir, 'ckpt.npz')} from an earlier run will be replaced at the "
            f"first evaluation")
    for log_name in LOG_FILES:
        path = os.path.join(out_dir, log_name)
        if os.path.exists(path):
            os.unlink(path)


def trim_metrics(metrics_path, last_step):
    """On resume: keep only whole log lines up to the resumed step (a killed run may have logged past it)."""
    if not os.path.exists(metrics_path):
        return
    keep = []
    with open(metrics_path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if line.endswith(b"\n") and isinstance(row, dict) and isinstance(row.get("step"), int) \
                    and row["step"] <= last_step:
                keep.append(line)
    atomic_write(metrics_path, lambda f: f.writelines(keep))


def estimate_loss(params, config, splits, a, step):
    """Mean loss over eval_iters batches of each split, without dropout; its own RNG, so training's is untouched."""
    out = {}
    with blas_threads(1):     # small products: one BLAS thread is as fast, and far faster on a busy machine
        for name, ids in splits.items():
            rng = np.random.default_rng([a.seed, step, len(name)])
            losses = []
            for _ in range(a.eval_iters):
                x, y = get_batch(ids, config.block_size, a.batch_size, rng)
                losses.append(M.forward(params, config, x, y, for_backward=False)[1])
            out[name] = float(np.mean(losses))
    return out


class StopRequested:
    """Turns the first Ctrl-C (or SIGTERM) into a flag checked between steps; a second one stops at once."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM") if hasattr(signal, n))

    def __init__(self):
        self.requested = False
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:       # not in the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def __exit__(self, *exc):
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
        return False


class Interrupted(TinyLMError):
    """Training stopped by Ctrl-C after saving; exit status 130 (143 for SIGTERM). Printed without 'error:'."""
    exit_code = 130
    prefix = ""

    def __init__(self, message, signum=None):
        super().__init__(message)
        if signum is not None:
            self.exit_code = 128 + int(signum)


def setup(a, explicit=(), log=print):
    """Build or resume everything training needs: (args, config, tokenizer, params, opt_state, state, splits).

    With adapters, params are the frozen weights, state['adapters'] the trained ones and opt_state theirs.
    """
    ckpt_path = os.path.join(a.out_dir, "ckpt.npz")
    lora = adapters = None
    if a.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path, merge_adapters=False)
        if ckpt["opt_state"] is None:
            raise CheckpointError(f"{ckpt_path} has no optimizer state, so it cannot be resumed")
        meta = ckpt["meta"]
        for field in ("step", "rng"):
            if field not in meta:
                raise CheckpointError(f"{ckpt_path} has no {field!r} in its metadata, so it cannot be resumed")
        saved = check_saved_args(meta.get("train_args", {}), ckpt_path)
        config = ckpt["config"]
        for name in MODEL_FIELDS:
            if name in explicit and getattr(a, name) != getattr(config, name):
                raise TinyLMError(f"--{name} {getattr(a, name)} differs from the resumed checkpoint's "
                                  f"{getattr(config, name)}; a resumed model keeps its shape")
        saved_optimizer = meta.get("optimizer", "adamw")
        if "optimizer" in explicit and a.optimizer != saved_optimizer:
            raise TinyLMError(f"--optimizer {a.optimizer} differs from the resumed run's {saved_optimizer}: its "
                              f"state cannot carry over; resume with --optimizer {saved_optimizer}, or start a new "
                              f"run from it with --init_from {ckpt_path} --out_dir NEW_FOLDER")
        saved["optimizer"] = saved_optimizer
        merged = {**dataclasses.asdict(TrainArgs()), **saved}
        merged.update({k: getattr(a, k) for k in explicit})
        merged["init_from"] = "resume"
        merged["out_dir"] = a.out_dir          # where the checkpoint was found, not where it was first written
        a = TrainArgs(**merged)
        validate_args(a)
        tokenizer = ckpt["tokenizer"]
        params, opt_state = ckpt["params"], ckpt["opt_state"]
        lora, adapters = finetune.resume_adapters(ckpt, a, explicit, ckpt_path)
        state = {"step": int(meta["step"]), "best_val_loss": meta.get("best_val_loss"),
                 "batch_rng": meta["rng"]["batch"], "dropout_rng": meta["rng"]["dropout"],
                 "elapsed_s": float(meta.get("elapsed_s", 0.0))}
        if "data" in explicit and saved.get("data") not in (None, a.data):
            log(f"note: the best val loss so far ({state['best_val_loss']}) and best.npz were measured on "
                f"{saved['data']}; to fine-tune on {a.data} as a new run, use --init_from {ckpt_path} "
                f"--out_dir NEW_FOLDER")
        ids = finetune.encode_for_model(a, tokenizer, log)
        for log_name in LOG_FILES:
            trim_metrics(os.path.join(a.out_dir, log_name), state["step"])
    elif a.init_from != "scratch":           # fine-tuning: a new run from another model's weights
        config, tokenizer, params = finetune.load_source(a, explicit)
        lora, params, adapters = finetune.new_adapters(a, config, params, log)
        ids = finetune.encode_for_model(a, tokenizer, log)
        opt_state = init_optimizer(a, params) if lora is None else adamw_init(adapters)
        state = {"step": 0, "best_val_loss": None, "elapsed_s": 0.0,
                 "batch_rng": np.random.default_rng([a.seed, 1]).bit_generator.state,
                 "dropout_rng": np.random.default_rng([a.seed, 2]).bit_generator.state}
    else:
        if a.tokenizer == "bpe":
            text = read_text(a.data, a.encoding_errors)          # read once: learn the merges, then encode
            tokenizer = train_bpe(text, a.vocab_size, verbose=a.progress)
            ids = tokenizer.encode(text)
            del text
        else:
            tokenizer, ids = load_ids(a.data, a.encoding_errors)
        config = model_config(a, tokenizer.vocab_size)
        params = G.init_params(config, seed=a.seed)
        opt_state = init_optimizer(a, params)
        state = {"step": 0, "best_val_loss": None, "elapsed_s": 0.0,
                 "batch_rng": np.random.default_rng([a.seed, 1]).bit_generator.state,
                 "dropout_rng": np.random.default_rng([a.seed, 2]).bit_generator.state}
    state.update(lora=lora, adapters=adapters)
    train_ids, val_ids = train_val_split(ids)
    check_long_enough(train_ids, val_ids, config.block_size)
    return a, config, tokenizer, params, opt_state, state, {"train": train_ids, "val": val_ids}


def adapter_step(fn, *args):
    """The adapters' thin products on one BLAS thread: at R = 16 a multi-threaded BLAS left its threads
    spinning after them, and the model's threaded step that follows ran about 1.8x slower."""
    with blas_threads(1):
        return fn(*args)


def rng_from_state(bit_state):
    rng = np.random.default_rng()
    rng.bit_generator.state = bit_state
    return rng


def train(a, explicit=(), log=print, dist=None):
    """Train as the args say. Returns a summary dict. Raises TinyLMError on any problem the user can fix.

    Started by mpiexec, every process runs this loop as one rank of distributed.py (dist)."""
    if dist is None and distributed.launched_size() > 1:
        return distributed.run(train, a, explicit, log)
    validate_args(a)
    root = dist is None or dist.root        # under MPI only rank 0 reads, evaluates, logs and writes
    finetune.validate_finetune_args(a, explicit)
    if dist is not None and a.lora_rank:
        raise TinyLMError("--lora_rank is not supported under mpiexec: fine-tune adapters in one process "
                          "(python train.py ...); full fine-tuning (--init_from CKPT without --lora_rank) works")
    lock = lock_out_dir(a.out_dir) if root else None     # first: a second trainer must not even clean the folder
    try:
        if root:
            prepare_out_dir(a.out_dir)
            refuse_to_replace(a)
        return _train(a, explicit, log, dist, root)
    finally:
        unlock(lock)


def lock_out_dir(out_dir):
    """Hold an exclusive lock on the OUT_DIR folder itself for the run: a second trainer on the same folder
    refuses at once instead of overwriting the first one's checkpoints. The kernel drops the lock when
    the process ends, however it ends, so a killed run leaves nothing behind (no lock file). Returns the
    folder's descriptor; None where there is no fcntl (not POSIX: no lock)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(out_dir, os.O_RDONLY)
    except OSError as e:
        raise TinyLMError(f"cannot write to --out_dir {out_dir}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise TinyLMError(f"another trainer is using --out_dir {out_dir}; wait for it to end or choose another "
                          f"--out_dir") from None
    return fd


def unlock(fd):
    if fd is not None:
        os.close(fd)             # closing the descriptor releases the lock


def _train(a, explicit, log, dist, root):
    """train()'s body, with the arguments validated and OUT_DIR prepared and locked (by rank 0)."""
    a, config, tokenizer, params, opt_state, state, splits = (dist.share(lambda a, e: setup(a, e, log), a, explicit)
                                                               if dist else setup(a, explicit, log))
    lora, adapters = state.get("lora"), state.get("adapters")
    trained = params if lora is None else adapters       # what the optimizer steps
    run_params = (lambda: params) if lora is None else (lambda: adapter_step(merged_params, params, adapters, lora))
    # a training step runs the adapters unmerged: the target matrices then get no dW (adapters.py)
    step_params = (lambda: params) if lora is None else (lambda: adapter_params(params, adapters, lora))
    ckpt_path = os.path.join(a.out_dir, "ckpt.npz")
    best_path = os.path.join(a.out_dir, "best.npz")
    metrics_path = os.path.join(a.out_dir, "metrics.jsonl")
    batch_rng = rng_from_state(state["batch_rng"])
    dropout_rng = rng_from_state(state["dropout_rng"])
    start = state["step"]
    best = state["best_val_loss"]
    tokens_per_step = a.batch_size * config.block_size
    if a.init_from != "resume":
        if root:
            start_fresh(a.out_dir, log)
    elif start >= a.max_iters:
        log(f"nothing to do: the run in {a.out_dir} is at step {start}, which is --max_iters; to train on, "
            f"pass a larger --max_iters (and --lr_decay_iters, for the learning rate to keep decaying)")
        if a.merge and lora is not None:
            finetune.write_merged(best_path, os.path.join(a.out_dir, "merged.npz"), log)
        return {"step": start, "best_val_loss": best, "elapsed_s": 0.0, "checkpoint": ckpt_path}
    if root:
        for note in unused_flag_notes(a, explicit):
            log(note)
    begin = ("resuming at step " + str(start) if start else
             "from scratch" if a.init_from == "scratch" else "fine-tuning " + a.init_from)
    log(f"tinylm: {sum(p.size for p in params.values()):,} parameters, vocab {config.vocab_size}, "
        f"{len(splits['train']):,} training tokens; {begin}")

    def save(step, path=ckpt_path, with_optimizer=True):
        if not root:
            return
        bad = [k for k, p in trained.items() if not np.isfinite(p).all()]
        if bad:        # never replace a good checkpoint with a broken state
            raise TinyLMError(f"training diverged before step {step}: {bad[0]} is not finite; "
                              f"{ckpt_path} keeps the last good state; try a lower --learning_rate")
        meta = {"step": step, "best_val_loss": best, "train_args": dataclasses.asdict(a),
                "rng": {"batch": batch_rng.bit_generator.state, "dropout": dropout_rng.bit_generator.state},
                "elapsed_s": elapsed(), **(finetune.lora_meta(lora) if lora else {})}
        save_checkpoint(path, params, config, tokenizer, opt_state if with_optimizer else None, meta, adapters)

    lr_at = lambda s: learning_rate_at(s, a.learning_rate, a.min_lr, a.warmup_iters, a.lr_decay_iters)
    muon_lr_at = lambda s: learning_rate_at(s, a.muon_lr, a.muon_lr * (a.min_lr / a.learning_rate if a.learning_rate
                                                                      else 0.1), a.warmup_iters, a.lr_decay_iters)
    t0 = time.perf_counter()
    elapsed = lambda: state["elapsed_s"] + time.perf_counter() - t0
    tok_s = 0.0           # tokens/s, smoothed over steps
    bar = tqdm(total=a.max_iters, initial=start, unit="step", disable=not a.progress, dynamic_ncols=True,
               desc="train", file=sys.stderr)
    step = start
    last_update = None
    with StopRequested() as stop, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        try:      # floating-point warnings stay quiet: a non-finite loss or gradient is checked below
            while True:
                is_eval = step % a.eval_interval == 0 or step == a.max_iters
                if is_eval and root and not (step == start and a.init_from == "resume"):   # evaluated before it was saved
                    losses = estimate_loss(run_params(), config, splits, a, step)
                    if not all(np.isfinite(v) for v in losses.values()):
                        raise TinyLMError(f"training diverged at step {step}: evaluation loss {losses['train']} (train), "
                                          f"{losses['val']} (val); {ckpt_path} keeps the last good state; "
                                          f"try a lower --learning_rate")
                    if best is None or losses["val"] < best:
                        best = losses["val"]
                        save(step, best_path, with_optimizer=False)
                    record = {"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                              "lr": lr_at(step), **({"muon_lr": muon_lr_at(step)} if a.optimizer == "muon" else {}),
                              "elapsed_s": round(elapsed(), 3), "tokens_per_s": round(tok_s, 1)}
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if a.track_spectra:
                        with blas_threads(1):
                            log_spectra(run_params(), config, step, os.path.join(a.out_dir, "spectra.jsonl"),
                                        last_update, a.optimizer)
                    save(step)
                    bar.write(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if step >= a.max_iters:
                    break
                if dist.stopping if dist else stop.requested:      # checked between steps, so the saved state is always whole
                    save(step)
                    signum = dist.stop_signum if dist else stop.signum
                    raise Interrupted(f"interrupted at step {step}; saved {ckpt_path}; "
                                      f"continue with: python train.py --out_dir {a.out_dir} --init_from resume",
                                      signum if signum != getattr(signal, "SIGINT", None) else None)
                lr = lr_at(step)
                # --track_spectra: keep the step before an evaluation's ΔW of the block matrices, to log its spectrum
                next_is_eval = (step + 1) % a.eval_interval == 0 or step + 1 == a.max_iters
                before = ({k: p.copy() for k, p in trained.items() if is_block_matrix(k, p.shape)}
                          if a.track_spectra and root and next_is_eval else None)
                t_step = time.perf_counter()
                x, y = get_batch(splits["train"], config.block_size, a.batch_size, batch_rng)
                loss, grads = (dist.loss_and_grads(step_params(), config, x, y, dropout_rng, stop.signum, is_eval) if dist
                               else M.loss_and_grads_parallel(step_params(), config, x, y, train=True, rng=dropout_rng))
                if lora is not None:
                    grads = adapter_grads_unmerged(grads, lora)        # d(s·B) -> dB, and only the adapters
                norm = global_norm(grads)
                if not (np.isfinite(loss) and np.isfinite(norm)):
                    raise TinyLMError(f"training diverged at step {step}: loss {loss}, gradient norm {norm}; "
                                      f"{ckpt_path} keeps the last good state; try a lower --learning_rate")
                if a.optimizer == "muon":
                    muon_step(trained, grads, opt_state, lr, muon_lr_at(step), a.muon_momentum, a.orthogonalize,
                              a.ns_steps, a.beta1, a.beta2, weight_decay=a.weight_decay,
                              grad_scale=clip_factor(norm, a.grad_clip))
                else:
                    adamw_step(trained, grads, opt_state, lr, a.beta1, a.beta2,
                               weight_decay=a.weight_decay if lora is None else 0.0,
                               grad_scale=clip_factor(norm, a.grad_clip))      # clipping, folded into the update
                step += 1
                dt = time.perf_counter() - t_step
                last_update = {k: w - trained[k] for k, w in before.items()} if before else None
                tok_s = tokens_per_step / dt if tok_s == 0 else 0.9 * tok_s + 0.1 * tokens_per_step / dt
                bar.update(1)
                if step % 10 == 0 or step == a.max_iters:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                    **({"muon_lr": f"{muon_lr_at(step - 1):.2e}"} if a.optimizer == "muon" else {}),
                                    tok_s=f"{tok_s:.0f}", refresh=False)
        finally:
            bar.close()

    summary = {"step": step, "best_val_loss": best, "elapsed_s": elapsed(), "checkpoint": ckpt_path}
    if a.sample_tokens:
        rng = np.random.default_rng(a.seed)
        try:
            prompt = tokenizer.encode("\n")
        except TinyLMError:        # a text without line breaks: start from its first token
            prompt = np.array([0])
        pick = lambda logits: sample_next(logits, temperature=0.8, top_k=200, rng=rng)
        with blas_threads(1):
            text = tokenizer.decode(list(D.generate(run_params(), config, prompt, a.sample_tokens, pick)))
        log(f"--- sample after {step} steps ---\n{text}\n---")
        summary["sample"] = text
    best_text = "n/a" if best is None else f"{best:.4f}"
    log(f"done: {step} steps in {summary['elapsed_s']:.1f}s, best val loss {best_text}; saved {ckpt_path} and {best_path}")
    if a.merge and lora is not None:
        summary["merged"] = finetune.write_merged(best_path, os.path.join(a.out_dir, "merged.npz"), log)
    return summary
