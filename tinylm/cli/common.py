"""What every command line shares: one line on stderr for an error, a parser that says what to do, true/false flags."""
import argparse
import os
import signal
import sys
import traceback

import numpy as np

from tinylm.errors import TinyLMError


class Terminated(KeyboardInterrupt):
    """SIGTERM (a shutdown, `kill`), raised where the program is, as Ctrl-C is: every clean-up that runs for Ctrl-C
    (a temporary file removed, a half-written export folder dropped) runs for it too. Exit status 143."""


def _raise_terminated(signum, frame):
    raise Terminated()


class _TermAsException:
    """While inside: SIGTERM raises Terminated (in the main thread; elsewhere signals are left alone). Training
    installs its own handler within (it saves first), and this one is back when it returns."""

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGTERM, _raise_terminated)
        except (ValueError, AttributeError):        # not the main thread, or no SIGTERM on this system
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def run_cli(main, argv):
    """Run main(argv); a TinyLMError, Ctrl-C, SIGTERM or OS error becomes one line on stderr and an exit status.

    --debug (or TINYLM_DEBUG=1) shows the full traceback instead. A line is cut to MAX_LINE characters (a
    value from a stranger's file is already cut short where it is quoted; this is the last guard).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TINYLM_DEBUG", "") not in ("", "0")
    argv = [x for x in argv if x != "--debug"]
    with _TermAsException():
        return _run(main, argv, debug)


MAX_LINE = 2000


def _run(main, argv, debug):
    try:
        return main(argv) or 0
    except TinyLMError as e:
        if debug:
            traceback.print_exc()
        text = " ".join(str(e).split("\n"))
        if len(text) > MAX_LINE:
            text = f"{text[:MAX_LINE // 2]} … {text[-MAX_LINE // 4:]}"
        print(f"{getattr(e, 'prefix', 'error: ')}{text}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except BrokenPipeError:       # e.g. `python sample.py | head`: the reader has all it wanted
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exc()
        if isinstance(e, Terminated):
            print("terminated (SIGTERM)", file=sys.stderr)
            return 143
        print("interrupted", file=sys.stderr)
        return 130
    except np.linalg.LinAlgError as e:     # the numbers of a model, not a file's form: named, in one line
        if debug:
            traceback.print_exc()
        print(f"error: a linear-algebra routine failed on this model's numbers ({e}); rerun with --debug for "
              "the traceback", file=sys.stderr)
        return 1
    except MemoryError:
        if debug:
            traceback.print_exc()
        print("error: out of memory; try a smaller --batch_size, --block_size or model", file=sys.stderr)
        return 1
    except OSError as e:
        if debug:
            traceback.print_exc()
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


def add_tokenizer_bin(ap):
    """The --tokenizer_bin flag of the commands that read a model (load_any's tokenizer_bin)."""
    ap.add_argument("--tokenizer_bin", default=None, metavar="FILE",
                    help="with a llama2.c model.bin: its tokenizer.bin (default: the one beside it)")


def check_tokenizer_bin(tokenizer_bin, path, flag):
    """One line when --tokenizer_bin is given for a model that is not a llama2.c model.bin (it would be ignored)."""
    if tokenizer_bin is not None and not os.fspath(path).endswith(".bin"):
        raise TinyLMError(f"--tokenizer_bin goes with {flag} a llama2.c model.bin; a tinylm checkpoint or a "
                          "GPT-2 or Llama folder carries its own tokenizer")


def parse_bool(text):
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (naming the flag) and exit status 2."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
