"""Data-parallel training over MPI: `mpiexec -n N python train.py ...`.

Every rank runs the same training loop (loop.py) with these hooks:

- the launcher's environment says how many processes were started (`launched_size`); under one,
  training is the single-process path and mpi4py is never imported;
- rank 0 alone reads the text and the checkpoint and sets everything up; it broadcasts the
  settings, the parameters, the optimizer state and the training tokens, so the other ranks need
  neither the data nor the out_dir (they read and write no file);
- each step, every rank draws the whole global batch from the same generator (so the batch
  generator's state is that of the global batch, whatever N: a run resumes under any N) and
  computes the loss and gradients of its own rows, batch_size / N of them, with the unchanged
  explicit backward;
- one Allreduce (sum) of a single contiguous buffer, in place, sums them: every gradient, scaled
  by the rank's share n/B of the batch, then five numbers: the weighted loss, two stop flags (Ctrl-C,
  SIGTERM, seen by any rank), an abort flag (a rank failed) and rank 0's time spent evaluating. The sum is
  the full batch's loss and gradient, exactly what one process computes, up to the order of the
  float additions;
- every rank then takes the same optimizer step on the same numbers, so the replicas stay equal
  without sending parameters again; only rank 0 evaluates, logs, shows the progress bar and writes
  checkpoints.

No collective waits forever: each polls its request with a deadline (`--mpi_timeout`, stretched
by the step's own compute time and, after an evaluation, by rank 0's evaluation time), and a rank
that fails posts its abort flag into the collective the others wait in, so they stop at once.
A rank killed outright is MPI's own business: mpiexec (MPICH's Hydra, Open MPI's) ends the others
within a second. Errors that every rank meets alike are printed once, by rank 0.
"""
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sys
import time

import numpy as np

from tinylm.core.arch import config_from_dict
from tinylm.fast.arch import fast_model
from tinylm.errors import TinyLMError
from tinylm.fast.parallel import blas_threads, usable_cores
from tinylm.io.checkpoint import load_checkpoint

# Environment variables in which launchers give a process its world size and rank:
# MPICH's Hydra (the `mpich` wheel's mpiexec), Intel MPI and Slurm's PMI-2 set PMI_*; Open MPI OMPI_*; MVAPICH MV2_*.
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
SLOTS = ("loss", "sigint", "sigterm", "abort", "root_gap")   # the numbers after the gradients in the summed buffer
SETUP_TIMEOUTS = 20    # the other ranks wait this many --mpi_timeout for rank 0 to read the text and set up
SPIN_S = 0.01          # a waiting rank polls its request without pausing for this long, then every POLL_S
POLL_S = 0.001         # (MPI makes progress only inside its calls; a sleeping rank leaves its core to others)


class PeerStopped(TinyLMError):
    """Another rank failed or stopped and said so through the collective; it printed why."""


class CollectiveTimeout(TinyLMError):
    """The other ranks did not answer in time: a lost host or a hung process."""


class RankError(TinyLMError):
    """A problem of this rank alone (its own settings): printed by this rank, whichever it is."""


def _env_int(names, environ):
    for name in names:
        value = environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return None


def launched_size(environ=os.environ):
    """How many processes the launcher started this one among (1 when not started by mpiexec)."""
    return _env_int(SIZE_VARIABLES, environ) or 1


def launched_rank(environ=os.environ):
    return _env_int(RANK_VARIABLES, environ) or 0


def find_mpiexec():
    """The mpiexec installed beside this Python (where the mpich wheel puts it), else the one on PATH, else None."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")


def args_digest(a, explicit):
    """SHA-256 of the training settings and of which flags were given: every rank must show the same."""
    text = json.dumps({"args": dataclasses.asdict(a), "explicit": sorted(explicit)}, sort_keys=True)
    return hashlib.sha256(text.encode()).digest()


def import_mpi(size):
    """mpi4py's MPI module, or one line saying how to install it."""
    try:
        import mpi4py
        mpi4py.rc.finalize = False      # finalized by hand after a clean run: a lost rank must not hang the exit
        from mpi4py import MPI
    except ImportError:
        raise TinyLMError(f"started by mpiexec as {size} processes, but mpi4py is not installed: "
                          f"pip install -e '.[mpi]' (or run without mpiexec)") from None
    return MPI


class Ranks:
    """This process's place among the ranks and the summed buffer; what the training loop calls."""

    def __init__(self, MPI, comm, timeout, saved=False):
        self.MPI, self.comm, self.timeout = MPI, comm, float(timeout)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.root = self.rank == 0
        self.stopping = False        # some rank was asked to stop: all stop before the next step
        self.stop_signum = None      # ... by this signal (SIGTERM if any rank had one, else SIGINT)
        self.buffer = None
        self.t_done = None           # when this rank's last collective completed
        self.root_gap = 0.0          # rank 0's time between its collectives, beyond its own compute
        self.compute_s = 0.0
        self.pending = False         # a collective posted and not completed (this rank failed inside it)
        self.eval_iters = 0
        self.saved = saved           # OUT_DIR/ckpt.npz holds a state of this run (resumed, or saved by rank 0);
                                     # None: rank 0 was to save the first one before the step this rank waits at

    # ------------------------------------------------------------------ waiting, with a deadline

    def wait(self, request, allow_s, what):
        """Poll `request` until it completes; CollectiveTimeout after allow_s seconds (None: no deadline)."""
        start = time.monotonic()
        self.pending = True
        try:
            while not request.Test():
                waited = time.monotonic() - start
                if allow_s is not None and waited > allow_s:
                    raise CollectiveTimeout(timeout_message(self.rank, waited, what, self.saved))
                if waited > SPIN_S:
                    time.sleep(POLL_S)
        except self.MPI.Exception as e:
            raise CollectiveTimeout(f"rank {self.rank}: MPI failed {what} ({e.Get_error_string()}); "
                                    f"{checkpoint_note(self.saved)}") from None
        self.pending = False

    def bcast(self, array, what, allow_s=None):
        """array (contiguous) ← rank 0's, in place; waits up to allow_s seconds (default: the timeout)."""
        self.wait(self.comm.Ibcast(array, root=0), allow_s or self.timeout, what)
        return array

    def bcast_bytes(self, data, what, allow_s=None):
        """Rank 0's bytes (others pass None): a length, then the bytes, both as buffers."""
        n = np.array([len(data) if self.root else 0], dtype=np.int64)
        self.bcast(n, what, allow_s)
        buf = np.frombuffer(data, dtype=np.uint8).copy() if self.root else np.empty(int(n[0]), dtype=np.uint8)
        return self.bcast(buf, what).tobytes()

    # ------------------------------------------------------------------ start: the same run everywhere

    def check_same_args(self, a, explicit):
        """Every rank's settings hash equal to rank 0's, or one line (from the first rank that differs)."""
        mine = np.frombuffer(args_digest(a, explicit), dtype=np.uint8).copy()
        every = np.empty((self.size, mine.size), dtype=np.uint8)
        self.wait(self.comm.Iallgather(mine, every), self.timeout, "to compare their settings")
        differ = [r for r in range(self.size) if not np.array_equal(every[r], every[0])]
        if not differ:
            return
        mine = {"args": dataclasses.asdict(a), "explicit": sorted(explicit)}
        root = json.loads(self.bcast_bytes(json.dumps(mine).encode() if self.root else None, "to compare their settings"))
        if self.rank != differ[0]:
            raise SystemExit(1)          # the first rank that differs says how
        diffs = [f"--{k} {v} (rank 0: {root['args'].get(k)})" for k, v in mine["args"].items() if v != root["args"].get(k)]
        diffs += [f"--{k} given here only" for k in set(mine["explicit"]) - set(root["explicit"])]
        diffs += [f"--{k} given on rank 0 only" for k in set(root["explicit"]) - set(mine["explicit"])]
        raise RankError(f"rank {self.rank} was started with other settings than rank 0: {', '.join(sorted(diffs))}; "
                        f"start every rank with the same command line; nothing was written")

    def pin_cores(self):
        """One share of this machine's cores per rank on it, when the launcher left every rank all of them.

        Each rank then computes with usable_cores() threads (one on this 2-core machine, with one BLAS
        thread), instead of every rank starting a thread per core and all of them fighting."""
        node = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
        local_rank, local_size = node.Get_rank(), node.Get_size()
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        mask = np.zeros(max(os.cpu_count() or 1, max(cores, default=0) + 1), dtype=np.uint8)
        mask[cores] = 1
        masks = np.empty((local_size, mask.size), dtype=np.uint8)
        self.wait(node.Iallgather(mask, masks), self.timeout, "to share the cores")
        node.Free()
        if cores and len(cores) >= local_size and (masks == mask).all():
            mine = np.array_split(cores, local_size)[local_rank]
            os.sched_setaffinity(0, {int(c) for c in mine})

    # ------------------------------------------------------------------ setup: rank 0 reads, all receive

    def share(self, setup, a, explicit):
        """setup(a, explicit) on rank 0, its result broadcast: (args, config, tokenizer, params, opt_state,
        state, splits) on every rank (tokenizer None and no validation tokens off rank 0)."""
        if self.root:
            try:
                a, config, tokenizer, params, opt_state, state, splits = setup(a, explicit)
            except BaseException:
                self.bcast_bytes(b"", "while rank 0 set up")       # empty: it failed, and says why
                raise
            arrays = _leaves({"params": params, "opt_state": opt_state, "train": splits["train"]}, True)
            header = {"args": dataclasses.asdict(a), "config": config.to_dict(), "state": state,
                      "scalars": _leaves({"opt_state": opt_state}, False),
                      "arrays": [(k, v.dtype.str, list(v.shape)) for k, v in arrays.items()]}
            self.bcast_bytes(json.dumps(header).encode(), "while rank 0 set up")
            for k, v in arrays.items():
                self.bcast(np.ascontiguousarray(v), f"for rank 0's {k}")
            return a, config, tokenizer, params, opt_state, state, splits
        text = self.bcast_bytes(None, "while rank 0 set up (reading the data and any checkpoint)",
                                SETUP_TIMEOUTS * self.timeout)   # reading a large text, learning BPE merges
        if not text:
            raise SystemExit(1)                                    # rank 0 failed and printed why
        header = json.loads(text)
        arrays = {k: self.bcast(np.empty(shape, dtype=np.dtype(dt)), f"for rank 0's {k}")
                  for k, dt, shape in header["arrays"]}
        tree = _unflatten({**arrays, **header["scalars"]})
        a = dataclasses.replace(type(a)(**header["args"]), progress=False, sample_tokens=0)
        config = config_from_dict(header["config"])
        train_ids = tree["train"]
        return (a, config, None, tree["params"], tree["opt_state"], header["state"],
                {"train": train_ids, "val": train_ids[:0]})

    # ------------------------------------------------------------------ the step

    def _setup_buffer(self, grads):
        sizes = [g.size for g in grads.values()]
        dtype = next(iter(grads.values())).dtype
        self.buffer = np.zeros(sum(sizes) + len(SLOTS), dtype=dtype)
        ends = np.cumsum(sizes)
        self.views = {k: self.buffer[e - g.size:e].reshape(g.shape) for (k, g), e in zip(grads.items(), ends)}
        self.slots = self.buffer[-len(SLOTS):]

    def loss_and_grads(self, params, config, x, y, rng, stop_signum, root_evaluated):
        """This rank's rows of the global batch (x, y), summed over the ranks: (loss, grads) of the whole
        batch. stop_signum: the signal that asked this rank to stop, or None (summed into `self.stopping`);
        root_evaluated: rank 0 evaluated before this step (the others allow for that in their deadline)."""
        t0 = time.perf_counter()
        B = x.shape[0]
        lo, hi = B * self.rank // self.size, B * (self.rank + 1) // self.size
        use_rng = config.dropout > 0 and rng is not None
        if use_rng:            # every rank draws all N seeds, so the generator moves alike on every rank
            rng = np.random.default_rng(rng.integers(0, 2**63, size=self.size)[self.rank])
        loss, grads = fast_model(config).loss_and_grads_parallel(params, config, x[lo:hi], y[lo:hi], train=True,
                                                                 rng=rng if use_rng else None, workers=usable_cores())
        if self.buffer is None:
            self._setup_buffer(grads)
        share = (hi - lo) / B       # the loss is a mean over the batch: each rank's part weighs n/B
        for k, g in grads.items():
            np.multiply(g, share, out=self.views[k])
        self.compute_s = time.perf_counter() - t0
        if self.root and self.t_done is not None:
            self.root_gap = max(0.0, t0 - self.t_done)     # evaluation, logging, checkpoints since the last step
        self.slots[:] = [loss * share, float(stop_signum == signal.SIGINT), float(stop_signum == signal.SIGTERM), 0.0,
                         self.root_gap if self.root else 0.0]
        if root_evaluated and not self.saved:
            # rank 0 has written the run's first ckpt.npz before this step; the others know it once it comes on to it
            self.saved = True if self.root else None
        self.allreduce("at a training step", root_evaluated)
        loss_sum, sigint, sigterm, abort, gap = (float(v) for v in self.slots)
        if abort > 0:
            raise PeerStopped("another rank stopped with an error (printed above)")
        if root_evaluated:
            self.saved = True    # ... and rank 0 has come on to this step, so the others know it too
        self.stopping = sigint + sigterm > 0
        self.stop_signum = signal.SIGTERM if sigterm > 0 else signal.SIGINT if sigint > 0 else None
        self.root_gap = gap
        return loss_sum, self.views

    def allreduce(self, what, root_evaluated=False):
        """The one collective of a step: self.buffer summed over the ranks, in place."""
        allow = self.timeout + 10 * self.compute_s
        if root_evaluated and not self.root:
            # rank 0 evaluates and writes a checkpoint first: allow three times its last such pause, and,
            # for its first, 2·eval_iters forwards of the whole batch (one is about N/3 of our step)
            allow += 3 * self.root_gap + 2 * self.eval_iters * self.size * self.compute_s
        request = self.comm.Iallreduce(self.MPI.IN_PLACE, self.buffer, op=self.MPI.SUM)
        self.wait(request, allow, what)
        self.t_done = time.perf_counter()

    def announce_failure(self):
        """This rank failed between collectives: post the abort flag into the collective the others are
        (or will be) waiting in, so they stop now, not at their deadline. False if that did not complete."""
        if self.buffer is None or self.pending:
            return False
        self.buffer[:] = 0
        self.slots[SLOTS.index("abort")] = 1.0
        try:
            self.allreduce("while stopping")
        except TinyLMError:
            return False
        return True


def global_batch(a, explicit):
    """The global batch this run will use: the one given, or (resuming without --batch_size) the checkpoint's."""
    if a.init_from != "resume" or "batch_size" in explicit:
        return a.batch_size
    meta = load_checkpoint(os.path.join(a.out_dir, "ckpt.npz"), with_optimizer=False)["meta"]
    saved = meta.get("train_args", {}).get("batch_size", type(a)().batch_size)
    return saved if isinstance(saved, int) and not isinstance(saved, bool) and saved > 0 else a.batch_size


def checkpoint_note(saved):
    """What a rank that gives up can truly say of the run's checkpoint: intact only if there is one of this run
    (saved: True, False, or None when rank 0 was saving the first one as it stopped answering)."""
    if saved:
        return "the last checkpoint is intact, resume it with --init_from resume under any number of processes"
    if saved is None:
        return ("rank 0 was saving the run's first checkpoint: if OUT_DIR/ckpt.npz is there it is whole, resume it "
                "with --init_from resume; otherwise nothing was saved")
    return "nothing was saved"


def timeout_message(rank, waited, what, saved):
    return (f"rank {rank} waited {waited:.0f} s for the other ranks {what}: a rank or host was lost, or is far "
            f"slower (allow longer with --mpi_timeout); {checkpoint_note(saved)}")


def _quiet(*args, **kwargs):
    pass


def run(train, a, explicit, log):
    """train(a, explicit, log, dist=...) on every rank of an MPI launch; what it returns on rank 0.

    Before anything is read or written: mpi4py is there, MPI sees as many ranks as the launcher
    started, every rank has the same settings, and the batch divides among the ranks. Errors that
    every rank meets alike are printed by rank 0 alone; the others exit with the same status.
    """
    size, root = launched_size(), launched_rank() == 0
    try:
        MPI = import_mpi(size)
        comm = MPI.COMM_WORLD
        if comm.Get_size() != size:
            raise TinyLMError(f"the launcher started {size} processes, but MPI sees {comm.Get_size()}: this "
                              f"mpiexec is not the MPI that mpi4py loads ({MPI.Get_library_version().splitlines()[0]}); "
                              f"run the mpiexec installed beside this Python (pip install -e '.[mpi]')")
        if not a.mpi_timeout > 0:
            raise TinyLMError(f"--mpi_timeout must be a positive number of seconds, got {a.mpi_timeout}")
        ranks = Ranks(MPI, comm, a.mpi_timeout, saved=a.init_from == "resume")   # a resumed run's is there already
        ranks.check_same_args(a, explicit)
        batch = np.full(1, -1, dtype=np.int64)
        try:
            batch[0] = global_batch(a, explicit) if root else 0
        finally:                               # on rank 0's failure to read it, -1 tells the others to stop
            ranks.bcast(batch, "for rank 0's batch size")
        if batch[0] < 0:
            raise SystemExit(1)                # rank 0 could not read its checkpoint, and said so
        if batch[0] > 0 and batch[0] % size:   # (not positive: validate_args says so, below)
            raise TinyLMError(f"--batch_size {batch[0]} does not divide among {size} processes: give a multiple "
                              f"of {size} (each process takes batch_size / {size} sequences); nothing was written")
        ranks.eval_iters = a.eval_iters
        ranks.pin_cores()
    except TinyLMError as e:
        if not root and not isinstance(e, RankError):
            raise SystemExit(1) from None      # rank 0 prints the same line
        raise
    try:
        with blas_threads(usable_cores()):
            summary = train(a, explicit, log if root else _quiet, dist=ranks)
    except PeerStopped:
        raise SystemExit(1) from None          # the rank that failed has said why
    except CollectiveTimeout:
        raise                                  # every rank that waited says so
    except BaseException as e:
        ranks.announce_failure()
        if not root and isinstance(e, TinyLMError):
            raise SystemExit(getattr(e, "exit_code", 1)) from None    # every rank raised it; rank 0 prints it
        raise
    MPI.Finalize()
    return summary


def _leaves(tree, arrays, prefix=""):
    """{'a/b/c': leaf} for every array leaf of a tree of dicts (arrays=True), or every other leaf, such as the
    optimizer's step count (arrays=False). Generic, so any optimizer's state travels, whatever its shape."""
    out = {}
    for k, v in (tree or {}).items():
        if isinstance(v, dict):
            out.update(_leaves(v, arrays, f"{prefix}{k}/"))
        elif isinstance(v, np.ndarray) == arrays:
            out[prefix + k] = v
    return out


def _unflatten(leaves):
    """The tree of dicts whose _leaves were `leaves`."""
    tree = {}
    for path, v in leaves.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree
