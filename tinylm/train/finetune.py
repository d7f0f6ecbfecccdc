"""Fine-tuning setup: start from a checkpoint or GPT-2 folder, fit the new text to its vocabulary, add adapters.

    python train.py --init_from out/ckpt.npz --data mine.txt --out_dir out-mine              # full fine-tuning
    python train.py --init_from out/ckpt.npz --data mine.txt --out_dir out-lora --lora_rank 4 [--lora_init pissa]
    python train.py --init_from resume --out_dir out-lora --merge true                       # fold B A into W

A fine-tuning run is a new run in its own folder: step 0, fresh optimizer moments, its own metrics, best
validation loss and best.npz, all on the new text; the source checkpoint is only read. With adapters the
folder's ckpt.npz/best.npz hold the frozen weights and the adapters in one file (checkpoint.py), and
`--merge` writes merged.npz, a plain checkpoint of best.npz's W + (α/R)·B A.
"""
import hashlib
import os

import numpy as np

from tinylm.lowrank import adapters as AD
from tinylm.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinylm.text.data import iter_code_points
from tinylm.errors import TinyLMError
from tinylm.core.arch import arch_of, model_of
from tinylm.text.char import CharTokenizer, code_points
from tinylm.io.hf import load_any
from tinylm.lowrank.factorized import ranks_of
from tinylm.text.data import read_text

UNKNOWN_CHARS = ("error", "drop", "replace")
LORA_FLAGS = ("lora_alpha", "lora_targets", "lora_init")
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
LLAMA_SHAPE_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "rope_theta", "tie_embeddings",
                      "block_size", "vocab_size")


def validate_finetune_args(a, explicit):
    """The fine-tuning flags, each refused with one line naming it, before any folder is made."""
    if a.unknown_chars not in UNKNOWN_CHARS:
        raise TinyLMError(f"--unknown_chars must be one of {', '.join(UNKNOWN_CHARS)}, got {a.unknown_chars!r}")
    if len(a.replace_char) != 1:
        raise TinyLMError(f"--replace_char must be exactly one character, got {a.replace_char!r}")
    if "replace_char" in explicit and a.unknown_chars != "replace":
        raise TinyLMError("--replace_char is used only with --unknown_chars replace")
    if ("lora_rank" in explicit or a.lora_rank != 0) and a.lora_rank <= 0:
        raise TinyLMError(f"--lora_rank must be a positive integer, got {a.lora_rank}")
    if a.lora_init not in AD.INITS:
        raise TinyLMError(f"--lora_init must be one of {', '.join(AD.INITS)}, got {a.lora_init!r}")
    if not np.isfinite(a.lora_alpha) or a.lora_alpha < 0:
        raise TinyLMError(f"--lora_alpha must be a finite number >= 0 (0 means the rank), got {a.lora_alpha}")
    if a.init_from == "resume":
        return                      # the adapters' settings come from the checkpoint, checked in resume_adapters
    if a.tokenizer_bin is not None and not a.init_from.endswith(".bin"):
        raise TinyLMError("--tokenizer_bin goes with --init_from a llama2.c model.bin; a tinylm checkpoint or a "
                          "GPT-2 folder carries its own tokenizer")
    given = [f for f in LORA_FLAGS if f in explicit]
    if a.lora_rank == 0 and given:
        raise TinyLMError(f"--{given[0]} needs --lora_rank R (adapters of rank R)")
    if a.lora_rank and a.init_from == "scratch":
        raise TinyLMError("--lora_rank adapts a trained model: give --init_from CHECKPOINT (a .npz file or a "
                          "GPT-2 folder), not scratch")
    if a.merge and not a.lora_rank:
        raise TinyLMError("--merge folds adapters into their matrices: it needs --lora_rank (or --init_from "
                          "resume of a run with adapters)")
    if a.init_from != "scratch" and not os.path.exists(a.init_from):
        raise TinyLMError(f"--init_from must be 'scratch', 'resume', or a checkpoint file or GPT-2 folder; "
                          f"{a.init_from} does not exist")


def check_not_source(source, out_dir):
    """The source checkpoint is never written: refuse an --out_dir whose ckpt.npz, best.npz or merged.npz it is."""
    src = os.path.realpath(source)
    for name in ("ckpt.npz", "best.npz", "merged.npz"):
        if os.path.realpath(os.path.join(out_dir, name)) == src:
            raise TinyLMError(f"--init_from {source} is {name} of --out_dir {out_dir}, which fine-tuning would "
                              f"overwrite; choose a new --out_dir (or --init_from resume to continue that run)")


def encode_for_vocabulary(path, errors, tokenizer, policy="error", replace_char=" ", log=print):
    """The file's token ids under a base model's character vocabulary, handling characters it lacks.

    policy 'error' names a few of them and their count; 'drop' leaves them out; 'replace' writes
    replace_char (one of the vocabulary's characters) instead. Chunk by chunk, as data.load_ids.
    """
    vocab = code_points(tokenizer.chars)
    if policy == "replace":
        if replace_char not in tokenizer.chars:
            raise TinyLMError(f"--replace_char {replace_char!r} is not in the base model's vocabulary; choose one "
                              f"of its characters, e.g. {tokenizer.chars[:20]!r}")
        replacement = code_points(replace_char)[0]
    parts, unknown = [], {}
    for points in iter_code_points(path, errors):
        bad = ~np.isin(points, vocab)
        if bad.any():
            chars, counts = np.unique(points[bad], return_counts=True)
            for c, n in zip(chars.tolist(), counts.tolist()):
                unknown[c] = unknown.get(c, 0) + n
            if policy == "drop":
                points = points[~bad]
            elif policy == "replace":
                points = np.where(bad, replacement, points)
        if policy == "error" and unknown:
            continue                 # count them all before refusing
        parts.append(tokenizer.encode_points(points))
    if unknown:
        total = sum(unknown.values())
        common = sorted(unknown, key=lambda c: (-unknown[c], c))
        shown = ", ".join(f"{chr(c)!r} ({unknown[c]:,})" for c in common[:6]) + (" ..." if len(common) > 6 else "")
        what = (f"{path} has {total:,} character(s) of {len(common)} kind(s) that the base model's "
                f"vocabulary lacks: {shown}")
        if policy == "error":
            raise TinyLMError(f"{what}; pass --unknown_chars drop (leave them out) or --unknown_chars replace "
                              f"(with --replace_char, default ' ')")
        log(f"note: {what}; {'dropped' if policy == 'drop' else f'replaced by {replace_char!r}'}")
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=tokenizer.dtype)
    if ids.size == 0:
        raise TinyLMError(f"data file {path} has no characters left after --unknown_chars {policy}")
    return ids


def encode_for_model(a, tokenizer, log=print):
    """The training file under an existing tokenizer: characters through --unknown_chars, BPE whole (byte-level)."""
    if isinstance(tokenizer, CharTokenizer):
        return encode_for_vocabulary(a.data, a.encoding_errors, tokenizer, a.unknown_chars, a.replace_char, log)
    return tokenizer.encode(read_text(a.data, a.encoding_errors))


def load_source(a, explicit):
    """(config, tokenizer, params) of --init_from (a .npz file, adapters merged, or a GPT-2 folder)."""
    check_not_source(a.init_from, a.out_dir)
    ckpt = load_any(a.init_from, tokenizer_bin=a.tokenizer_bin)
    config = ckpt["config"]
    arch = arch_of(config)
    if "arch" in explicit and a.arch != arch:
        raise TinyLMError(f"--arch {a.arch} differs from --init_from's {arch}; a fine-tuned model keeps its base's "
                          f"architecture")
    for name in LLAMA_SHAPE_FIELDS if arch == "llama" else SHAPE_FIELDS:
        if name in explicit and getattr(a, name) != getattr(config, name):
            raise TinyLMError(f"--{name} {getattr(a, name)} differs from --init_from's {getattr(config, name)}; "
                              f"a fine-tuned model keeps its base's shape")
    if "dropout" in explicit and a.dropout != config.dropout:
        import dataclasses
        config = dataclasses.replace(config, dropout=a.dropout).validate()
    params = {k: np.array(v, dtype=np.float32) for k, v in ckpt["params"].items()}   # own, writable float32
    return config, ckpt["tokenizer"], params


def fingerprint(params):
    """SHA-256 of the frozen weights, by name: ties a run's adapters to the base they were trained on."""
    h = hashlib.sha256()
    for k in sorted(params):
        h.update(k.encode())
        h.update(np.ascontiguousarray(params[k]).tobytes())
    return h.hexdigest()


def new_adapters(a, config, params, log=print):
    """(lora settings, frozen params, adapters) for --lora_rank, or (None, params, None) without it."""
    if not a.lora_rank:
        return None, params, None
    if ranks_of(params):         # the adapters sit on dense weights W; a compressed layer has two factors instead
        raise TinyLMError(f"--lora_rank needs a dense model, and {a.init_from} is compressed (tinylm.compress): "
                          f"fine-tune it without --lora_rank (its factors train), or put adapters on the dense model")
    shapes = model_of(config).param_shapes(config)
    targets = AD.resolve_targets(a.lora_targets, shapes)
    AD.check_rank(a.lora_rank, targets, shapes)
    lora = {"rank": a.lora_rank, "alpha": float(a.lora_alpha), "targets": targets, "init": a.lora_init}
    frozen, adapters = AD.init_adapters(params, lora, seed=a.seed)
    lora["base_sha256"] = fingerprint(frozen)
    n, total = AD.count_adapter_params(lora, shapes), sum(p.size for p in params.values())
    log(f"adapters: {a.lora_init}, rank {a.lora_rank}, scale α/R = {AD.scale_of(lora):g}, on {len(targets)} "
        f"matrices: {n:,} trained parameters ({100 * n / total:.2f}% of the model's {total:,}); the rest frozen")
    return lora, frozen, adapters


def resume_adapters(ckpt, a, explicit, ckpt_path):
    """The adapters of a resumed run, checked against its frozen base and against the flags given now."""
    meta = ckpt["meta"]
    lora = meta.get("lora")
    if lora is None:
        if "lora_rank" in explicit and a.lora_rank:
            raise TinyLMError(f"{ckpt_path} is a run without adapters; to add adapters start a new run with "
                              f"--init_from {ckpt_path} --lora_rank {a.lora_rank} --out_dir NEW")
        if a.merge:
            raise TinyLMError(f"--merge: {ckpt_path} has no adapters to merge; it is already a plain checkpoint")
        return None, None
    wanted = {"lora_rank": lora["rank"], "lora_alpha": lora["alpha"], "lora_init": lora["init"]}
    for flag, value in wanted.items():
        if flag in explicit and getattr(a, flag) != value:
            raise TinyLMError(f"--{flag} {getattr(a, flag)} does not match the adapters in {ckpt_path} "
                              f"({flag} {value}); resume with the run's own settings or start a new --out_dir")
    if "lora_targets" in explicit and \
            AD.resolve_targets(a.lora_targets, model_of(ckpt["config"]).param_shapes(ckpt["config"])) != lora["targets"]:
        raise TinyLMError(f"--lora_targets {a.lora_targets} does not match the adapters in {ckpt_path}")
    digest = meta.get("lora_base_sha256")
    if digest is not None and fingerprint(ckpt["params"]) != digest:
        raise CheckpointError(f"{ckpt_path}: its frozen base weights do not match the ones its adapters were "
                              f"trained on (SHA-256 differs); the file was changed, so it cannot be resumed")
    return dict(lora, base_sha256=digest), ckpt["adapters"]


def lora_meta(lora):
    """What a checkpoint's metadata keeps of the adapters' settings."""
    return {"lora": {k: lora[k] for k in ("rank", "alpha", "targets", "init")},
            "lora_base_sha256": lora.get("base_sha256")}


def write_merged(best_path, merged_path, log=print):
    """merged.npz: best.npz's frozen weights + (α/R)·B A, a plain checkpoint for sample/analyze/export."""
    ckpt = load_checkpoint(best_path, with_optimizer=False)        # merged on load
    meta = {k: v for k, v in ckpt["meta"].items()
            if k in ("step", "best_val_loss", "train_args", "elapsed_s")}
    meta["merged_from"] = {"checkpoint": os.path.abspath(best_path), **ckpt["meta"]["merged_adapters"]}
    save_checkpoint(merged_path, ckpt["params"], ckpt["config"], ckpt["tokenizer"], None, meta)
    log(f"merged the adapters of {best_path} into {merged_path} (a plain checkpoint: sample.py, analyze.py "
        f"and export use it as any other)")
    return merged_path
