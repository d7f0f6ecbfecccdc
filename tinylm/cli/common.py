"""What every command line shares: one line on stderr for an error, a parser that says what to do, true/false flags."""
import argparse
import os
import sys
import traceback

from tinylm.errors import TinyLMError


def run_cli(main, argv):
    """Run main(argv); a TinyLMError, Ctrl-C or OS error becomes one line on stderr and an exit status.

    --debug (or TINYLM_DEBUG=1) shows the full traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TINYLM_DEBUG", "") not in ("", "0")
    argv = [x for x in argv if x != "--debug"]
    try:
        return main(argv) or 0
    except TinyLMError as e:
        if debug:
            traceback.print_exc()
        print(f"{getattr(e, 'prefix', 'error: ')}{e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except BrokenPipeError:       # e.g. `python sample.py | head`: the reader has all it wanted
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        return 130
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
