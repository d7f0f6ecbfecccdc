"""Before the first step: OUT_DIR locked, checked and cleared, and the run built: new, fine-tuned or resumed."""
import dataclasses
import json
import os
import tempfile

import numpy as np

from tinylm.atomic import atomic_write, remove_stale_temp_files
from tinylm.files import open_regular
from tinylm.core.arch import arch_of, model_of
from tinylm.core.muon import muon_init
from tinylm.core.optim import adamw_init
from tinylm.errors import TinyLMError
from tinylm.io.checkpoint import CheckpointError, load_checkpoint
from tinylm.text.bpe import train_bpe
from tinylm.text.data import check_long_enough, load_ids, read_text, train_val_split
from tinylm.train import finetune
from tinylm.train.args import TrainArgs, check_arch_args, check_saved_args, model_config, model_fields, validate_args

LOG_FILES = ("metrics.jsonl", "spectra.jsonl")     # one JSON line per evaluation


def read_source_first(a, explicit, dist=None):
    """(config, tokenizer, params) of --init_from, read before OUT_DIR is made or locked, so that a bad source
    leaves nothing written; None for scratch and resume, and off rank 0 (under MPI only rank 0 reads)."""
    if a.init_from in ("scratch", "resume") or (dist is not None and not dist.root):
        return None
    try:
        return finetune.load_source(a, explicit)
    except BaseException:
        if dist is not None:         # the other ranks wait for rank 0's setup in dist.share: it failed
            dist.bcast_bytes(b"", "while rank 0 set up")
        raise


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


def refuse_to_replace(a):
    """A new run into a folder that holds a checkpoint is refused unless --overwrite says to replace it."""
    ckpt = os.path.join(a.out_dir, "ckpt.npz")
    if a.init_from not in ("scratch", "resume"):
        finetune.check_not_source(a.init_from, a.out_dir)      # the more telling reason, when it is the one
    if a.init_from != "resume" and not a.overwrite and os.path.exists(ckpt):
        raise TinyLMError(f"{ckpt} holds an earlier run; continue it with --init_from resume, replace it with "
                          f"--overwrite, or choose another --out_dir")


def start_logs(a, step, log):
    """A new run's logs start empty (an earlier run's checkpoint, under --overwrite, is named before it is
    replaced); a resumed run's keep their whole lines up to its step (a killed run may have logged past it)."""
    if a.init_from == "resume":
        for log_name in LOG_FILES:
            trim_log(os.path.join(a.out_dir, log_name), step)
        return
    if os.path.exists(os.path.join(a.out_dir, "ckpt.npz")):
        log(f"note: --overwrite: {os.path.join(a.out_dir, 'ckpt.npz')} from an earlier run will be replaced at the "
            f"first evaluation")
    for log_name in LOG_FILES:
        path = os.path.join(a.out_dir, log_name)
        if os.path.exists(path):
            os.unlink(path)


def trim_log(path, last_step):
    """Keep only the whole JSON lines of path whose step is at most last_step."""
    if not os.path.exists(path):
        return
    keep = []
    with open_regular(path, "log") as f:        # a FIFO of this name would hang a plain open
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if line.endswith(b"\n") and isinstance(row, dict) and isinstance(row.get("step"), int) \
                    and row["step"] <= last_step:
                keep.append(line)
    atomic_write(path, lambda f: f.writelines(keep))


def init_optimizer(a, params, config):
    """The optimizer state for a new run: AdamW's moments, or Muon's momentum for the block matrices (by the
    config's model's rule: GPT-2's or Llama's is_block_matrix) and AdamW for the rest."""
    if a.optimizer == "muon":
        try:
            return muon_init(params, model_of(config).is_block_matrix)
        except ValueError as e:
            raise TinyLMError(f"--optimizer muon: {e}") from None
    return adamw_init(params)


def setup(a, explicit=(), log=print, source=None):
    """Build or resume everything training needs: (args, config, tokenizer, params, opt_state, state, splits).

    With adapters, params are the frozen weights, state['adapters'] the trained ones and opt_state theirs.
    source: read_source_first's (config, tokenizer, params) of --init_from, when it was read already.
    """
    if a.init_from == "resume":
        a, config, tokenizer, params, opt_state, state, ids = resume(a, explicit, log)
    elif a.init_from != "scratch":           # fine-tuning: a new run from another model's weights
        config, tokenizer, params = source or finetune.load_source(a, explicit)
        a = dataclasses.replace(a, arch=arch_of(config))          # the source's model, whatever --arch said
        check_arch_args(a)
        lora, params, adapters = finetune.new_adapters(a, config, params, log)
        ids = finetune.encode_for_model(a, tokenizer, log)
        opt_state = init_optimizer(a, params, config) if lora is None else adamw_init(adapters)
        state = dict(new_state(a), lora=lora, adapters=adapters)
    else:
        config, tokenizer, params, ids = new_model(a)
        opt_state = init_optimizer(a, params, config)
        state = dict(new_state(a), lora=None, adapters=None)
    train_ids, val_ids = train_val_split(ids)
    check_long_enough(train_ids, val_ids, config.block_size)
    return a, config, tokenizer, params, opt_state, state, {"train": train_ids, "val": val_ids}


def new_state(a):
    """What a new run's checkpoint will carry besides the weights: step 0, no best loss, the seeded generators."""
    return {"step": 0, "best_val_loss": None, "elapsed_s": 0.0,
            "batch_rng": np.random.default_rng([a.seed, 1]).bit_generator.state,
            "dropout_rng": np.random.default_rng([a.seed, 2]).bit_generator.state}


def new_model(a):
    """(config, tokenizer, params, ids) of a run from scratch: the text's tokenizer, a freshly initialized model."""
    if a.tokenizer == "bpe":
        text = read_text(a.data, a.encoding_errors)          # read once: learn the merges, then encode
        tokenizer = train_bpe(text, a.vocab_size, verbose=a.progress)
        ids = tokenizer.encode(text)
        del text
    else:
        tokenizer, ids = load_ids(a.data, a.encoding_errors)
    config = model_config(a, tokenizer.vocab_size)
    return config, tokenizer, model_of(config).init_params(config, seed=a.seed), ids


def resume(a, explicit, log):
    """(args, config, tokenizer, params, opt_state, state, ids) of the run in OUT_DIR/ckpt.npz."""
    ckpt_path = os.path.join(a.out_dir, "ckpt.npz")
    ckpt = load_checkpoint(ckpt_path, merge_adapters=False)
    if ckpt["opt_state"] is None:
        raise CheckpointError(f"{ckpt_path} has no optimizer state, so it cannot be resumed")
    meta = ckpt["meta"]
    for field in ("step", "rng"):
        if field not in meta:
            raise CheckpointError(f"{ckpt_path} has no {field!r} in its metadata, so it cannot be resumed")
    a, saved = resumed_args(a, explicit, ckpt, ckpt_path)
    lora, adapters = finetune.resume_adapters(ckpt, a, explicit, ckpt_path)
    state = {"step": int(meta["step"]), "best_val_loss": meta.get("best_val_loss"),
             "batch_rng": meta["rng"]["batch"], "dropout_rng": meta["rng"]["dropout"],
             "elapsed_s": float(meta.get("elapsed_s", 0.0)), "lora": lora, "adapters": adapters}
    if "data" in explicit and saved.get("data") not in (None, a.data):
        log(f"note: the best val loss so far ({state['best_val_loss']}) and best.npz were measured on "
            f"{saved['data']}; to fine-tune on {a.data} as a new run, use --init_from {ckpt_path} "
            f"--out_dir NEW_FOLDER")
    ids = finetune.encode_for_model(a, ckpt["tokenizer"], log)
    return a, ckpt["config"], ckpt["tokenizer"], ckpt["params"], ckpt["opt_state"], state, ids


def resumed_args(a, explicit, ckpt, ckpt_path):
    """(args, saved settings): the checkpoint's settings, overridden by the flags given now, validated."""
    meta, config = ckpt["meta"], ckpt["config"]
    saved = check_saved_args(meta.get("train_args", {}), ckpt_path)
    arch = arch_of(config)
    if "arch" in explicit and a.arch != arch:
        raise TinyLMError(f"--arch {a.arch} differs from the resumed checkpoint's {arch}; a resumed model keeps "
                          f"its architecture (start a new run in another --out_dir)")
    saved["arch"] = arch                   # the model's, whatever the saved settings say
    for name in model_fields(arch):
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
    return a, saved
