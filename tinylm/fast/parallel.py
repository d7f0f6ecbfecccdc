"""Run a training step as two halves of the batch on two Python threads, one BLAS thread each.

NumPy releases the GIL inside matmul and most ufuncs, so two Python threads that each
work on their own slice of the batch really do run at once. BLAS's own threading is the
other way to use a second core, but it splits each (small) matrix product in two and
pays for it in synchronisation, and batched matmuls (attention) get nothing from it.
For the two threads not to fight over cores, the BLAS library must run one thread per
call while they work: `blas_threads(1)` says so to OpenBLAS (the BLAS that NumPy's
wheels ship) through its C API, found with ctypes among the loaded libraries.
Anything else (another BLAS, no /proc) is reported as unavailable, and callers fall
back to the plain single-threaded path. Evaluation's forward-only batches go to the same threads
whole, one batch a call (map_threads), so each loss is the one a single thread computes.
"""
import concurrent.futures
import contextlib
import contextvars
import ctypes
import itertools
import os
import threading

import numpy as np

# symbol names of OpenBLAS's thread-count functions, as the various builds export them
_SET_NAMES = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
              "openblas_set_num_threads")
_GET_NAMES = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads", "openblas_get_num_threads64_",
              "openblas_get_num_threads")


def _loaded_libraries():
    """Paths of the shared libraries mapped into this process (Linux: /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            paths = [line.split()[-1] for line in f if ".so" in line]
    except OSError:
        return []
    return list(dict.fromkeys(paths))


class _OpenBLAS:
    """ctypes handles on OpenBLAS's set/get thread-count functions, or None where not found."""

    def __init__(self):
        self.set = self.get = None
        self.path = None
        np.ones((2, 2)) @ np.ones((2, 2))        # make sure NumPy's BLAS is loaded
        for path in _loaded_libraries():
            if "blas" not in os.path.basename(path).lower():
                continue
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            set_fn = next((getattr(lib, n) for n in _SET_NAMES if hasattr(lib, n)), None)
            get_fn = next((getattr(lib, n) for n in _GET_NAMES if hasattr(lib, n)), None)
            if set_fn is not None and get_fn is not None:
                set_fn.argtypes, set_fn.restype = [ctypes.c_int], None
                get_fn.argtypes, get_fn.restype = [], ctypes.c_int
                self.set, self.get, self.path = set_fn, get_fn, path
                return


_blas = None
_blas_lock = threading.Lock()


def openblas():
    """The process's _OpenBLAS handles, found once."""
    global _blas
    with _blas_lock:
        if _blas is None:
            _blas = _OpenBLAS()
    return _blas


def blas_available():
    """True when the BLAS thread count can be set at run time."""
    return openblas().set is not None


def blas_thread_count():
    """OpenBLAS's current thread count, or None if unknown."""
    b = openblas()
    return int(b.get()) if b.get is not None else None


@contextlib.contextmanager
def blas_threads(n):
    """Within the block, BLAS uses n threads; the previous count is restored after. No-op if unavailable."""
    b = openblas()
    if b.set is None:
        yield False
        return
    previous = b.get()
    if previous == int(n):       # already so (nested blocks): nothing to set or restore
        yield True
        return
    b.set(int(n))
    try:
        yield True
    finally:
        b.set(previous)


def usable_cores():
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:       # not Linux
        return os.cpu_count() or 1


_allocator_tuned = False


def keep_freed_memory(trim_bytes=256 << 20, mmap_bytes=64 << 20, pad_bytes=64 << 20):
    """Ask glibc's malloc to reuse freed memory rather than hand it back to the kernel; True if it could.

    A training step allocates and frees the same few hundred arrays every step. By default glibc
    serves the large ones with fresh mmap()s and returns freed heap tops to the kernel, so every
    step touches fresh pages again: ~6,000 page faults a CPU-recipe step, a quarter of its CPU time.
    With blocks up to `mmap_bytes` taken from the heap (baby GPT's 50 MB activations a thread
    included) and up to `trim_bytes` of free heap kept, they are reused. A worker thread's heap is
    a separate 64 MB mapping, though, which glibc unmaps as soon as it is all free unless the top
    pad is as large as a heap: `pad_bytes` (M_TOP_PAD) at 64 MB keeps them, so baby GPT's 50 MB
    arrays, each nearly a heap of its own, stop being faulted in afresh every step (row 29 of the
    optimization log in `git show 8dbd490:docs/performance.md`).
    What is kept was in use a moment before, so the peak grows only by what cannot be reused in one
    piece (baby GPT: +0.1-0.2 GB each, rows 24 and 29 there). Process-wide, set once; a no-op where the
    C library has no mallopt (not glibc).
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    _allocator_tuned = bool(mallopt(M_MMAP_THRESHOLD, int(mmap_bytes)) and mallopt(M_TRIM_THRESHOLD, int(trim_bytes))
                            and mallopt(M_TOP_PAD, int(pad_bytes)))
    return _allocator_tuned


_pools = {}


def pool(workers):
    """A persistent pool of `workers` threads (creating threads each step would cost more than it saves).

    When there is one thread per core this process may use, each thread is pinned to a core of its
    own (Linux). Left free, the scheduler now and then moves a thread to the other core, where the
    caches hold the other half's data: pinned, the CPU recipe's step is 1.3-2% faster
    (row 33 of the optimization log in `git show 8dbd490:docs/performance.md`). With fewer threads than cores nothing is pinned, so that
    several such processes do not all crowd onto the first cores.
    """
    if workers not in _pools:
        _pools[workers] = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tinylm",
                                                                initializer=_one_core_each(workers))
    return _pools[workers]


def _one_core_each(workers):
    """A thread-pool initializer that pins each new thread to the next core this process may use, or None
    unless there are exactly `workers` such cores and sched_setaffinity exists. (Call it from an
    unpinned thread: a pinned one may use one core only.)"""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:       # not Linux
        return None
    if len(cores) != workers:
        return None
    in_turn = itertools.cycle(cores)                 # cycled: a thread started later still gets one
    lock = threading.Lock()

    def pin():
        with lock:
            core = next(in_turn)
        try:
            os.sched_setaffinity(0, {core})          # 0: the calling thread
        except OSError:
            pass

    return pin


def run_parallel(fn, args_list):
    """[fn(*args) for args in args_list], each on its own thread with one BLAS thread; in order."""
    with blas_threads(1):
        futures = [pool(len(args_list)).submit(fn, *args) for args in args_list]
        return [f.result() for f in futures]


def split_by_size(names, sizes, parts):
    """names dealt into `parts` lists of about equal total size (largest first, each to the lightest list)."""
    groups, totals = [[] for _ in range(parts)], [0] * parts
    for name, size in sorted(zip(names, sizes), key=lambda ns: -ns[1]):
        i = totals.index(min(totals))
        groups[i].append(name)
        totals[i] += size
    return [g for g in groups if g]


def for_each_split(fn, arrays, min_size=1 << 16, min_mean=1 << 14, workers=None):
    """fn(names) over the keys of the dict `arrays`, split into one group per core when the arrays hold at
    least min_size numbers in all and min_mean each on average (element-wise updates release the GIL, so
    the groups run at once); one call in this thread otherwise. fn must touch only its own names.

    The mean matters because each NumPy call holds the GIL for its overhead: AdamW on the model's 27
    parameters (30,000 numbers each on average) took 1.13 ms on two threads against 1.26 on one, but on
    LoRA's 32 adapters at R = 16 (4,000 each) 0.94 ms against 0.40."""
    names = list(arrays)
    sizes = [arrays[n].size for n in names]
    workers = workers or usable_cores()
    total = sum(sizes)
    if workers < 2 or total < min_size or total < min_mean * len(sizes):
        fn(names)
        return
    run_parallel(fn, [(g,) for g in split_by_size(names, sizes, workers)])


def map_threads(fn, items, workers=None):
    """[fn(item) for item in items], in order, the items dealt to `workers` threads (default: one per core) with
    one BLAS thread each. Each fn(item) is the very call the plain loop makes, so its result is the same, bit for
    bit: evaluation's forward-only batches run this way (train/loop.py), each whole on one thread."""
    items = list(items)
    workers = min(workers or usable_cores(), len(items))
    with blas_threads(1):
        if workers < 2 or not blas_available():
            return [fn(item) for item in items]
        # each call in a copy of the caller's context: NumPy's errstate lives there, so a caller's
        # np.errstate(over="ignore") holds on the threads too (a pool's threads start from an empty one)
        calls = [(contextvars.copy_context(), item) for item in items]
        return list(pool(workers).map(lambda call: call[0].run(fn, call[1]), calls))
