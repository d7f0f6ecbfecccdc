"""Write a file so that a crash at any moment leaves the old file or the new one, never a mix.

The bytes go to an unnamed file in the target's folder (Linux O_TMPFILE; elsewhere a file
named `<name>.<pid>.tmp`), are flushed to disk, then get a name and are renamed over the
target. On Linux a crash while writing leaves no temporary file at all;
`remove_stale_temp_files` clears any left elsewhere. Checkpoints, tokenizer files,
safetensors files and analysis reports are all written through `atomic_write`; the append-only
logs (metrics.jsonl, spectra.jsonl) are appended a line at a time instead.

Test hook: TINYLM_TEST_SLOW_SAVE=<seconds> makes every write print a line to stderr and sleep
that long between writing the data and renaming it into place, so a test can kill the
process while a file is being written. It is not meant for anything else.
"""
import errno
import os
import re
import sys
import time


def temp_name(path):
    return f"{path}.{os.getpid()}.tmp"


def remove_stale_temp_files(folder, names):
    """Delete `<name>.<anything>.tmp` left in folder by a crash mid-write, for the given names. Returns them."""
    pattern = re.compile("^(" + "|".join(re.escape(n) for n in names) + r")\.[A-Za-z0-9_]+\.tmp$")
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        if pattern.match(entry):
            try:
                os.unlink(os.path.join(folder, entry))
                removed.append(entry)
            except OSError:
                pass
    return removed


def _test_pause(path):
    delay = os.environ.get("TINYLM_TEST_SLOW_SAVE")
    if delay:
        sys.stderr.write(f"tinylm-test: saving {os.path.basename(path)}\n")
        sys.stderr.flush()
        time.sleep(float(delay))


def _write_to(fd, path, write):
    """write(f) into fd and flush it to disk; returns the open file object (the caller closes it)."""
    f = os.fdopen(fd, "wb")
    try:
        write(f)
        f.flush()
        os.fsync(f.fileno())
        _test_pause(path)
    except BaseException:
        f.close()
        raise
    return f


def write_unnamed(folder, tmp, path, write):
    """Write to an unnamed file in folder (Linux O_TMPFILE), then link it as tmp. False where unavailable."""
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return False
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o644)
    except OSError:
        return False
    with _write_to(fd, path, write) as f:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        dir_fd = os.open(folder, os.O_RDONLY)
        try:     # a dir fd makes os.link use linkat(..., AT_SYMLINK_FOLLOW), which resolves /proc/self/fd/N
            os.link(f"/proc/self/fd/{f.fileno()}", os.path.basename(tmp), dst_dir_fd=dir_fd, follow_symlinks=True)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            return False        # e.g. no /proc magic links: write again under a name
        finally:
            os.close(dir_fd)
    return True


def write_named(tmp, path, write):
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    _write_to(fd, path, write).close()


def fsync_folder(folder):
    """Make a rename durable, where the OS can sync a directory."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write(path, write):
    """Call write(f) on a new binary file, flush it to disk, then rename it over path.

    An OSError (a full disk, say) propagates after the temporary file is removed: path is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = temp_name(path)
    try:
        if not write_unnamed(folder, tmp, path, write):
            write_named(tmp, path, write)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_folder(folder)
    return path


def atomic_write_text(path, text):
    """atomic_write of a str, as UTF-8."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
