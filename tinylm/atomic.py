"""Write a file so that a crash at any moment leaves the old file or the new one, never a mix.

The bytes go to an unnamed file in the target's folder (Linux O_TMPFILE; elsewhere a file
named `<name>.<pid>.tmp`), are flushed to disk, then get a name and are renamed over the
target. On Linux a crash while writing leaves no temporary file at all;
`remove_stale_temp_files` clears any left elsewhere. Checkpoints, tokenizer files,
safetensors files and analysis reports are all written through `atomic_write`; the append-only
logs (metrics.jsonl, spectra.jsonl) are appended a line at a time instead.

A folder is replaced the same way (`replace_folder`, for tinylm.export): the new one is written beside
it and takes its place in one step, so an interrupt leaves the old folder or the new one, whole.

Test hook: TINYLM_TEST_SLOW_SAVE=<seconds> makes every write print a line to stderr and sleep
that long between writing the data and renaming it into place, so a test can kill the
process while a file is being written. It is not meant for anything else.
"""
import ctypes
import errno
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
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


def check_writable_folder(folder, what):
    """Create folder if need be and prove it takes a file now (written and fsynced, then gone), before any long
    work whose result would go there. OSError (read-only, not a folder, no space) for the caller to word."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(errno.ENOTDIR, "a file is there, not a folder", folder)
    os.makedirs(folder, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".tinylm-probe-", dir=folder)
    try:
        os.write(fd, b"tinylm")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(probe)


# ----------------------------------------------------------------------------- folders


def _exchange(a, b):
    """Swap the paths a and b in one step (Linux renameat2 with RENAME_EXCHANGE). False where the system or the
    file system cannot; any other failure is the OSError."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), b)


def _swap_by_two_renames(old_place, new_folder):
    """folder -> folder.<pid>.old, new -> folder, with Ctrl-C and SIGTERM held back between the two renames (a
    `kill -9` there would still leave the old folder under the .old name). Returns where the old one went."""
    aside = f"{old_place}.{os.getpid()}.old"
    held = [s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None]
    block = hasattr(signal, "pthread_sigmask")
    if block:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        os.rename(old_place, aside)
        try:
            os.rename(new_folder, old_place)
        except BaseException:
            os.rename(aside, old_place)
            raise
    finally:
        if block:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return aside


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)                # the same bytes, no copy: the file is not changed by an export
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old, new, keep):
    """The entries of folder old for which keep(name) is true, linked (or copied) into folder new."""
    for name in os.listdir(old):
        if not keep(name):
            continue
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        elif os.path.isfile(src):
            _link_or_copy(src, dst)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_temp_folders(folder):
    """Remove `<folder>.<pid>.tmp` and `<folder>.<pid>.old` folders left beside folder by a process that was
    killed while replacing it (its pid no longer runs). Returns their names."""
    parent, base = os.path.split(os.path.abspath(folder))
    pattern = re.compile("^" + re.escape(base) + r"\.(\d+)\.(tmp|old)$")
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry)
        path = os.path.join(parent, entry)
        if m and int(m.group(1)) != os.getpid() and not _process_alive(int(m.group(1))) \
                and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(entry)
    return removed


def replace_folder(folder, fill, keep=lambda name: True):
    """Make folder anew in one step: fill(tmp) writes the new contents into an empty folder beside it, which
    then takes folder's place. An interrupt or a crash at any moment leaves the old folder as it was, or the
    new one, whole; never a mix, and never neither.

    The entries of an existing folder for which keep(name) is true are carried into the new one first (hard
    links: no copy). The swap is one renameat2(RENAME_EXCHANGE) on Linux, after which the old contents are
    removed; elsewhere it is two renames with Ctrl-C and SIGTERM held back between them. A folder that is a
    link is replaced where it points. Leftovers of a killed run (`<folder>.<pid>.tmp`) are removed first.
    """
    folder = os.path.realpath(folder)
    remove_stale_temp_folders(folder)
    tmp = f"{folder}.{os.getpid()}.tmp"
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    os.mkdir(tmp)
    try:
        exists = os.path.isdir(folder)
        if exists:
            os.chmod(tmp, stat.S_IMODE(os.stat(folder).st_mode))
            _carry_over(folder, tmp, keep)
        fill(tmp)
        fsync_folder(tmp)
        _test_pause(folder)
        if not exists:
            os.rename(tmp, folder)
        elif _exchange(tmp, folder):
            shutil.rmtree(tmp, ignore_errors=True)           # the old contents, now under the temporary name
        else:
            shutil.rmtree(_swap_by_two_renames(folder, tmp), ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)          # before the swap the new folder, after it the old one
        raise
    fsync_folder(os.path.dirname(folder))
    return folder
