"""python -m tinylm.compress CKPT OUT.npz: the command line of lowrank/compress.py (which says what the methods compute)."""
import argparse
import math
import os
import sys
import time

import numpy as np

from tinylm.atomic import check_writable_folder
from tinylm.cli.common import OneLineParser, parse_bool, run_cli
from tinylm.core.optim import adamw_init
from tinylm.errors import TinyLMError
from tinylm.fast.arch import fast_model
from tinylm.io.checkpoint import save_checkpoint
from tinylm.io.hf import load_any
from tinylm.core.arch import model_of
from tinylm.lowrank.compress import (DEFAULT_CALIB_TOKENS, METHODS, CompressError, calibration_ids, calibration_windows,
                                     check_not_lower, compress_model, parse_params_fraction, parse_rank, ranks_for)
from tinylm.text.data import DEFAULT_DATA, encode_file, train_val_split


def compress_parser():
    ap = OneLineParser(prog="python -m tinylm.compress", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Compress a tinylm checkpoint (GPT-2 or Llama): each block linear layer W becomes two thin factors "
                       "A (out, r) and B (r, in), W ≈ A B, run as y = (x Bᵀ) Aᵀ. The output is a checkpoint that "
                       "sample.py, analyze.py, tinylm.export and train.py --init_from resume read.")
    ap.add_argument("checkpoint", metavar="CKPT", help="a tinylm checkpoint (.npz) or a GPT-2 folder")
    ap.add_argument("out", metavar="OUT.npz", help="the compressed checkpoint to write (atomically; its folder "
                    "is created if missing, and checked before any work)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--rank", default=None,
                      help="each matrix's rank: a fraction of its full rank min(out, in) written with a point, such as 0.375 or 1.0, or an integer "
                      "rank such as 32 (default 0.375 when --params is not given)")
    size.add_argument("--params", default=None, metavar="FRACTION",
                      help="keep at most this fraction of the blocks' linear parameters, e.g. 0.5 (each matrix gets the "
                      "largest rank r with r (out + in) <= FRACTION · out · in)")
    ap.add_argument("--method", choices=METHODS, default="whitened",
                    help="whitened: best rank r for the layer's output on calibration text (Cholesky of XᵀX, SVD of W S, "
                    "triangular solve); svd: plain truncated SVD of the weight, no data")
    ap.add_argument("--calib", metavar="FILE", default=None,
                    help="calibration text (default: the train split of the checkpoint's training text)")
    ap.add_argument("--calib_tokens", type=int, default=DEFAULT_CALIB_TOKENS, help="calibration tokens to use")
    ap.add_argument("--refit", type=parse_bool, nargs="?", const=True, default=argparse.SUPPRESS, metavar="true|false",
                    help="then refit each factor by least squares, layer by layer (inputs from the compressed model, "
                    "targets from the dense one); default: true with --method whitened, false with svd, which "
                    "uses no data")
    ap.add_argument("--eval_tokens", type=int, default=16384,
                    help="validation tokens on which to report the loss before and after (0: skip)")
    ap.add_argument("--force", action="store_true", help="replace OUT.npz if it exists")
    ap.add_argument("--no_progress", action="store_true", help="hide progress bars")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return ap


def validation_windows(tokenizer, meta, block_size, n_tokens):
    """About n_tokens of the validation split of the run's text (its last 10%), as evenly spaced windows
    of block_size + 1 tokens: the same windows every time.   -> (n, block_size + 1) token ids"""
    saved = (meta.get("train_args") or {}).get("data")
    path = saved if isinstance(saved, str) and os.path.isfile(saved) else DEFAULT_DATA
    val = np.asarray(train_val_split(encode_file(path, (meta.get("train_args") or {}).get("encoding_errors", "strict"),
                                                 tokenizer))[1])
    T = block_size
    n = max(1, min(math.ceil(n_tokens / T), (len(val) - 1) // T))
    starts = np.linspace(0, len(val) - T - 1, n).round().astype(np.intp)
    return val[starts[:, None] + np.arange(T + 1)].astype(np.intp)


def validation_loss(params, config, tokenizer, meta, n_tokens):
    """Mean loss on validation_windows: n_tokens of the validation split, in evenly spaced windows of block_size.
    The same quantity as train.py's val loss, averaged over other windows (docs/results.md#validation-loss)."""
    w = validation_windows(tokenizer, meta, config.block_size, n_tokens)
    forward = fast_model(config).forward           # GPT-2's or the Llama's
    return float(np.mean([forward(params, config, w[i:i + 32, :-1], w[i:i + 32, 1:], for_backward=False)[1]
                          for i in range(0, len(w), 32)]))


def _compress(argv):
    a = compress_parser().parse_args(argv)
    a.refit = getattr(a, "refit", a.method == "whitened")     # the refit needs the data the whitening reads
    rank = parse_rank(a.rank if a.rank is not None else "0.375") if a.params is None else None
    fraction = parse_params_fraction(a.params) if a.params is not None else None
    if a.calib_tokens < 1:
        raise CompressError(f"--calib_tokens must be >= 1, got {a.calib_tokens}")
    if a.eval_tokens < 0:
        raise CompressError(f"--eval_tokens must be >= 0, got {a.eval_tokens}")
    if os.path.isdir(a.out):
        raise CompressError(f"{a.out} is a folder; give the path of the .npz file to write")
    if os.path.exists(a.out) and os.path.exists(a.checkpoint) and os.path.samefile(a.out, a.checkpoint):
        raise CompressError("OUT.npz is the input checkpoint; write the compressed model to another file")
    if os.path.exists(a.out) and not a.force:
        raise CompressError(f"{a.out} exists; pass --force to replace it")
    folder = os.path.dirname(os.path.abspath(a.out))
    try:                            # before the work, not after it: created if missing, as training does
        check_writable_folder(folder, "OUT.npz's folder")
    except OSError as e:
        raise CompressError(f"cannot write {a.out}: its folder {folder} cannot be created or written "
                            f"({e.strerror or e})") from None
    ckpt = load_any(a.checkpoint)
    params, config, tok, meta = ckpt["params"], ckpt["config"], ckpt["tokenizer"], ckpt["meta"] or {}
    ranks = ranks_for(config, rank, fraction)
    check_not_lower(params, ranks)
    calib = None
    t0 = time.perf_counter()
    if a.method == "whitened" or a.refit:
        ids, calib_path = calibration_ids(tok, meta, a.calib)
        calib = calibration_windows(ids, config.block_size, a.calib_tokens)
    new, info = compress_model(params, config, ranks, a.method, calib, a.refit, progress=not a.no_progress)
    seconds = time.perf_counter() - t0
    kept, dense = info["kept"], info["dense"]
    summary = {"method": a.method, "refit": a.refit, "rank": a.rank, "params": a.params,
               "calib_tokens": 0 if calib is None else int(calib.size),
               "calib": None if calib is None else calib_path, "block_param_fraction": kept / dense,
               "source": os.path.abspath(a.checkpoint), "seconds": round(seconds, 3)}
    out_meta = {k: meta[k] for k in ("step", "rng", "train_args", "elapsed_s") if k in meta}
    out_meta["compressed"] = summary
    save_checkpoint(a.out, new, config, tok, adamw_init(new), out_meta)   # fresh moments: the factors can train
    shapes = model_of(config).param_shapes(config)
    pairs = sorted({(r, min(shapes[n + ".weight"])) for n, r in ranks.items()})
    print(f"{a.method}{' + refit' if a.refit else ''}: rank {', '.join(f'{r} of {full}' for r, full in pairs)}; "
          f"block linear parameters {kept:,} of {dense:,} ({100 * kept / dense:.1f}%)"
          + (f"; calibration {calib.size:,} tokens" if calib is not None else "") + f"; {seconds:.2f} s")
    for name, (before, after) in info["refit"].items():
        print(f"  refit {name:<28} relative output error {before:.4f} -> {after:.4f}")
    if a.eval_tokens:
        base = validation_loss(params, config, tok, meta, a.eval_tokens)
        loss = validation_loss(new, config, tok, meta, a.eval_tokens)
        n, T = validation_windows(tok, meta, config.block_size, a.eval_tokens)[:, 1:].shape
        print(f"validation loss on {n * T:,} tokens ({n:,} evenly spaced windows of {T} of the validation split): "
              f"{base:.4f} -> {loss:.4f} ({100 * (loss - base) / base:+.2f}%)")
    print(f"wrote {a.out} (sample: python sample.py --init_from {a.out}; train on: put it in a folder as "
          f"ckpt.npz and run python train.py --out_dir FOLDER --init_from resume --max_iters N)")
    return 0


def main(argv=None):
    return run_cli(_compress, argv)


if __name__ == "__main__":
    sys.exit(main())
