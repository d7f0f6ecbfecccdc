"""train.py's command line: every TrainArgs field as a flag, then tinylm.train.loop.train (with the spectrum
logger of tinylm.analysis.tracking, for --track_spectra)."""
import argparse
import dataclasses
import os

from tinylm.analysis.tracking import log_spectra
from tinylm.cli.common import OneLineParser, parse_bool, run_cli
from tinylm.errors import TinyLMError
from tinylm.io.hf import tokenizer_kind
from tinylm.train.args import HELP, TrainArgs
from tinylm.train.loop import train


def train_parser():
    ap = OneLineParser(prog="train.py", description="Train a GPT-2-style model on a text file. "
                       "With no arguments: 2,000 steps of nanoGPT's CPU recipe on Tiny Shakespeare.",
                       argument_default=argparse.SUPPRESS)
    defaults = TrainArgs()
    for field in dataclasses.fields(TrainArgs):
        default = getattr(defaults, field.name)
        kind = parse_bool if field.type in (bool, "bool") else field.type
        shown = field.name == "data" or default is None        # their help says what the default is
        help_text = HELP[field.name] if shown else f"{HELP[field.name]} (default: {default})"
        if kind is parse_bool:      # --flag alone means true; --flag true/false also works
            ap.add_argument(f"--{field.name}", type=kind, nargs="?", const=True, metavar="true|false",
                            help=help_text)
        else:
            ap.add_argument(f"--{field.name}", type=kind, metavar=field.name.upper() if kind is str else None,
                            help=help_text)
    ap.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return ap


def train_main(argv=None):
    return run_cli(_train, argv)


def check_tokenizer_flag(ns):
    """--tokenizer with --init_from: the model keeps the tokenizer it was trained with, so another is refused
    in one line rather than silently ignored. Nothing to check when the checkpoint is missing (training says so)."""
    init_from = ns.get("init_from", "scratch")
    if "tokenizer" not in ns or init_from == "scratch":
        return
    path = os.path.join(ns.get("out_dir", TrainArgs().out_dir), "ckpt.npz") if init_from == "resume" else init_from
    if not os.path.exists(path):
        return
    kind = tokenizer_kind(path)
    if kind is not None and kind != ns["tokenizer"]:
        raise TinyLMError(f"--tokenizer {ns['tokenizer']} differs from {path}'s {kind} tokenizer: a model keeps the "
                          f"tokenizer it was trained with; leave --tokenizer out (or train a new model with "
                          "--init_from scratch)")


def _train(argv):
    ns = vars(train_parser().parse_args(argv))
    ns.pop("debug", None)
    check_tokenizer_flag(ns)
    if "max_iters" in ns and "lr_decay_iters" not in ns and ns.get("init_from", "scratch") != "resume":
        ns["lr_decay_iters"] = ns["max_iters"]    # a shorter run still decays its learning rate to min_lr
    args = dataclasses.replace(TrainArgs(), **ns)
    # handed over whether or not --track_spectra is given: a resumed run may track by its checkpoint's settings
    train(args, explicit=tuple(ns), tracker=log_spectra)
    return 0
