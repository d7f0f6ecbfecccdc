"""Benchmark data-parallel training over MPI against the threaded single process (the CPU recipe).

    python -m benchmarks.bench_mpi                 # 2 ranks against one threaded process, alternated 4 times
    python -m benchmarks.bench_mpi --ranks 2 --runs 6
    python -m benchmarks.bench_mpi --quick         # small shapes, a few seconds: checks that it runs

Each run is a fresh process (or N fresh ranks under mpiexec) taking the CPU recipe's steps
(bench.CONFIGS["cpu"]: B 12, T 64, 4 layers of width 128) on fixed random tokens:

  threaded   = one process: loss_and_grads_parallel on one thread per core (one BLAS thread each),
               then clipping and AdamW, as `python train.py` takes a step
  mpi        = `mpiexec -n N`: each rank pinned to its share of the cores with one BLAS thread
               (N = 2 on this 2-core machine: one core each, no thread pool), the training loop's
               own distributed.Ranks.loss_and_grads (its B/N rows, the gradients into the one
               buffer, one Allreduce), then clipping and AdamW
  ms/step    = median over the run's timed steps after warm-up; the table gives each side's
               median over its runs, and their ratio run by run (alternated: A B A B ...)
  allreduce  = rank 0's time inside the Allreduce at a step (the transfer and the wait for the
               slower rank), median, in ms and as a share of its step; "alone" is the same
               Allreduce of the same buffer timed in a loop with no compute between, so the
               wait is gone and only the transfer is left

The machine is shared: the load average is printed beside the numbers.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from tinylm.fast import model as M
from tinylm.core import gpt2 as G
from benchmarks.bench import optim
from tinylm.fast import parallel
from benchmarks.bench import CONFIGS, QUICK, VOCAB, update
from benchmarks.common import machine_line
from tinylm.train.distributed import find_mpiexec
from tinylm.train.distributed import Ranks, import_mpi, launched_size


def recipe(quick):
    """(config, B, steps, warmup, x, y) of the CPU recipe (or its --quick shape)."""
    spec = dict((QUICK if quick else CONFIGS)["cpu"])
    B, steps, warmup = spec.pop("batch_size"), spec.pop("steps"), spec.pop("warmup")
    config = G.GPTConfig(vocab_size=VOCAB, **spec)
    x, y = np.random.default_rng(0).integers(0, VOCAB, size=(2, B, config.block_size))
    return config, B, 2 * steps, warmup, x, y


def run_threaded(quick):
    """One process, the threaded step: {"ms": median step}."""
    config, B, steps, warmup, x, y = recipe(quick)
    params, times = G.init_params(config, seed=0), []
    opt = optim.adamw_init(params)
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss, grads = M.loss_and_grads_parallel(params, config, x, y, train=True)
        update(optim, params, grads, opt)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {"ms": 1e3 * float(np.median(times)), "loss": loss, "workers": min(parallel.usable_cores(), B)}


def run_rank(quick):
    """One rank of `mpiexec -n N`: {"ms", "allreduce_ms", "alone_ms", ...} from rank 0, None elsewhere."""
    MPI = import_mpi(launched_size())
    ranks = Ranks(MPI, MPI.COMM_WORLD, timeout=60)
    ranks.pin_cores()
    config, B, steps, warmup, x, y = recipe(quick)
    if B % ranks.size:
        raise SystemExit(f"the batch of {B} does not divide among {ranks.size} ranks")
    params = G.init_params(config, seed=0)
    opt = optim.adamw_init(params)
    step_s, reduce_s = [], []
    with parallel.blas_threads(parallel.usable_cores()):
        for i in range(warmup + steps):
            t = time.perf_counter()
            loss, grads = ranks.loss_and_grads(params, config, x, y, None, None, False)
            t_reduced = time.perf_counter()
            update(optim, params, grads, opt)
            if i >= warmup:
                step_s.append(time.perf_counter() - t)
                reduce_s.append(t_reduced - t - ranks.compute_s)
        alone = []
        for _ in range(steps):
            t = time.perf_counter()
            ranks.allreduce("in the benchmark")
            alone.append(time.perf_counter() - t)
    MPI.Finalize()
    if not ranks.root:
        return None
    return {"ms": 1e3 * float(np.median(step_s)), "allreduce_ms": 1e3 * float(np.median(reduce_s)),
            "alone_ms": 1e3 * float(np.median(alone)), "loss": loss, "ranks": ranks.size,
            "floats": int(ranks.buffer.size), "workers": parallel.usable_cores()}


def measure(cmd, env):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}{out.stdout}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_mpi",
                                 description="Time a training step as N MPI ranks against one threaded process.")
    ap.add_argument("--ranks", type=int, default=2, help="processes under mpiexec (default: 2)")
    ap.add_argument("--runs", type=int, default=4, help="runs of each side, alternated (default: 4)")
    ap.add_argument("--quick", action="store_true", help="small shapes and few steps: a smoke test")
    ap.add_argument("--side", choices=("threaded", "rank"), help=argparse.SUPPRESS)   # internal: one run, JSON
    args = ap.parse_args(argv)
    if args.side == "threaded":
        print(json.dumps(run_threaded(args.quick)))
        return 0
    if args.side == "rank":
        result = run_rank(args.quick)
        if result is not None:
            print(json.dumps(result))
        return 0
    mpiexec = find_mpiexec()
    if mpiexec is None:
        print("error: no mpiexec beside this Python or on PATH: pip install -e '.[mpi]'", file=sys.stderr)
        return 1
    print(machine_line())
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
          f"{'   (--quick: small shapes, numbers not meaningful)' if args.quick else ''}\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    me = [sys.executable, "-m", "benchmarks.bench_mpi"] + (["--quick"] if args.quick else [])
    threaded, mpi = [], []
    for _ in range(args.runs):          # alternated, so a slow minute of the shared host hits both sides
        threaded.append(measure(me + ["--side", "threaded"], env))
        mpi.append(measure([mpiexec, "-n", str(args.ranks)] + me + ["--side", "rank"], env))
    t_ms = float(np.median([r["ms"] for r in threaded]))
    m_ms = float(np.median([r["ms"] for r in mpi]))
    ratios = [m["ms"] / t["ms"] for t, m in zip(threaded, mpi)]
    reduce_ms = float(np.median([r["allreduce_ms"] for r in mpi]))
    alone_ms = float(np.median([r["alone_ms"] for r in mpi]))
    config, B = recipe(args.quick)[:2]
    print(f"CPU recipe L{config.n_layer} C{config.n_embd} T{config.block_size} B{B}, "
          f"{G.count_params(config):,} parameters; {args.runs} runs of each side, alternated")
    runs = lambda rows: " ".join(f"{r['ms']:.1f}" for r in rows)
    print(f"{'':<40}{'ms/step':>10}   runs (ms)")
    print(f"{'threaded, one process (%d threads)' % threaded[0]['workers']:<40}{t_ms:>10.1f}   {runs(threaded)}")
    print(f"{'mpiexec -n %d (%d thread(s) a rank)' % (args.ranks, mpi[0]['workers']):<40}{m_ms:>10.1f}   {runs(mpi)}")
    print(f"mpi / threaded: {m_ms / t_ms:.3f} (run by run: {', '.join(f'{r:.3f}' for r in ratios)}; target <= 1.10)")
    print(f"allreduce of {mpi[0]['floats']:,} float32 at a step: {reduce_ms:.2f} ms, {100 * reduce_ms / m_ms:.1f}% "
          f"of the step (alone, no compute between: {alone_ms:.3f} ms, {100 * alone_ms / m_ms:.1f}%)")
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
