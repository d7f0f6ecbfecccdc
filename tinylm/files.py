"""Reading a stranger's files: only regular files, and JSON whose nesting cannot exhaust the stack.

The reading twin of atomic.py, and beside it at the base because every room reads files: text/
(training text, prompts, tokenizer files), io/ (checkpoints, safetensors, model folders), analysis/
(steering vectors), exercises/ (the learner's file). A path may name anything: a FIFO with no writer
blocks `open` forever, and /dev/zero or /dev/urandom never end. So a file is opened only when it is a
regular file after following links; anything else is one TinyLMError line naming what it is. The
open itself does not block (O_NONBLOCK), and the kind is checked again on the open file, so a FIFO
put in the file's place between the two checks is refused too.
"""
import json
import os
import stat

from tinylm.errors import TinyLMError

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def kind_of(mode):
    """'a FIFO (named pipe)', 'a character device', … for a stat mode that is not a regular file's."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def not_regular(path, what, mode, error=TinyLMError):
    return error(f"{what} {path} is {kind_of(mode)}, not a regular file; tinylm reads {what}s "
                       "only from regular files")


def is_regular(path):
    """True for a regular file (after following links); False for anything else, or nothing."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def check_regular(path, what, error=TinyLMError):
    """error (TinyLMError or a subclass) unless path is a regular file (after following links); an OSError (not
    found, no permission) passes through."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise not_regular(path, what, mode, error)


def open_regular(path, what, error=TinyLMError):
    """The file at path, opened for reading in binary, if it is a regular file (after following links).

    what names the file in the message ('checkpoint', 'data file', …). A FIFO, a device, a socket or a
    folder is `error` (TinyLMError or a subclass); a missing or unreadable file raises the OSError, for the
    caller to word.
    """
    path = os.fspath(path)
    check_regular(path, what, error)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)                   # non-blocking: a FIFO swapped in since the check does not hang here
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(path, what, mode, error)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path, what):
    """The bytes of a regular file (see open_regular)."""
    with open_regular(path, what) as f:
        return f.read()


def parse_json(data, where):
    """The JSON value of data (bytes or str); TinyLMError naming `where` if it is not UTF-8 JSON or is nested
    too deeply. The nesting depth is bounded by Python's recursion limit (about 1,000 levels, more than any
    file tinylm reads needs): the parser refuses deeper text with RecursionError, which becomes the line."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise TinyLMError(f"{where} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise TinyLMError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise TinyLMError(f"{where} is not usable JSON: it is nested too deeply") from None
    except ValueError:               # an integer of more digits than Python converts (over 4,300)
        raise TinyLMError(f"{where} is not usable JSON: it holds a number too long to convert") from None


def read_json(path, what):
    """The JSON value of a regular file; one TinyLMError line for a missing, unreadable, irregular or bad file."""
    try:
        data = read_regular(path, what)
    except OSError as e:
        raise TinyLMError(f"cannot read {what} {path}: {e.strerror or e}") from None
    return parse_json(data, f"{what} {path}")
