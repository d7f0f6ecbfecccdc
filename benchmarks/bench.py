"""Benchmark a training step against the machine's own matmul peak.

    python -m benchmarks.bench              # CPU recipe and baby GPT, then sampling (several minutes)
    python -m benchmarks.bench --quick      # small shapes, a few seconds: checks that it runs
    python -m benchmarks.bench --compare    # alternate plain and threaded steps in one run
    python -m benchmarks.bench --against ../main   # alternate another checkout's step with this one's
    python -m benchmarks.bench --eval       # train.py's evaluation: one thread against a thread per core, alternated
    python -m benchmarks.bench --time-to-loss 1.886   # AdamW vs Muon (vs PyTorch) to a validation loss: bench_train.py
    python -m benchmarks.bench --optimizer-share      # the optimizer's share of a step, per orthogonalization

Each training configuration runs in a fresh subprocess, so its peak memory is its own.
Definitions (B batch, T block, L layers, C width, V vocabulary, N = B·T tokens a step):

  FLOPs/step   = 6·N·(12·L·C² + V·C)  +  12·N·L·T·C
                 matrix products only, counted from the shapes: the forward costs
                 2 FLOPs per multiply-add of x Wᵀ (12·L·C² weights in the blocks, V·C in
                 the tied head) and 2·2·T·C per token per layer for QKᵀ and AV (the full
                 T×T square, not halved for causality, as nanoGPT and PaLM count it); the
                 backward costs twice the forward. Element-wise work is not counted.
  ms/step      = median wall time of loss_and_grads_parallel + clipping + AdamW, after warm-up
  tokens/s     = N / (ms/step)
  GFLOP/s      = FLOPs/step / (ms/step)
  peak GFLOP/s = the best of (a) one 2048×2048 @ 2048×2048 float32 product with BLAS on all
                 cores, (b) one such product per core on parallel Python threads with one
                 BLAS thread each, both read before each round of timed steps, after the last
                 round and after the probes below, and (c) the step's own products alone
                 (mm-only), should they run faster still
  MFU          = the median over the rounds (up to ROUNDS) of: the round's GFLOP/s (its median
                 step) ÷ the higher of the square's readings, (a) or (b), just before and just
                 after it. This machine's speed moves by tens of percent from one minute to the
                 next, so each round is compared with the machine as it was at the time. (c) is
                 timed once, at another moment, so it does not enter the pairing
  vs best      = GFLOP/s ÷ peak GFLOP/s: the median step against the best reading of the whole
                 run, a fast moment's peak against a typical moment's step (lower on a drifting
                 machine; before perf7 this was the MFU, with three readings instead of one per
                 round)
  mm-only ms   = the step's own matrix products alone (same shapes, same two-thread split)
  peak RSS     = the subprocess's high-water resident memory (VmHWM in /proc/self/status,
                 else ru_maxrss), including Python and NumPy themselves
  breakdown    = one single-threaded step (one BLAS thread), each layer function timed,
                 in percent of that step, under the phase it ran in (baby GPT's GELU and
                 layer-norm outputs recomputed in the backward are backward time); "glue" is
                 the rest (Python between the calls)
  sampling     = generate() with greedy picking and one BLAS thread, one sequence, model of the CPU recipe with
                 block_size = context, prompt of `context` tokens: tokens/s with and without
                 the key-value cache, the median of several runs after a warm-up run

The machine is shared: the load average and BLAS thread count are printed beside the numbers.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
import types

import numpy as np

from tinylm.fast import layers as L
from tinylm.fast import model as M
from tinylm.core import gpt2 as G
from tinylm.fast import decode as D
from tinylm.fast import parallel
from tinylm.core import optim as core_optim
from tinylm.core.optim import adamw_init
from tinylm.fast import optim as fast_optim
from tinylm.core.arch import model_of
from tinylm.core.llama import LlamaConfig
from tinylm.fast.arch import fast_model
from tinylm.text.data import DEFAULT_DATA, get_batch, load_ids, train_val_split
from tinylm.train.args import TrainArgs
from tinylm.train.loop import estimate_loss
from benchmarks.bench_train import main as time_to_quality
from benchmarks.common import machine_line

CONFIGS = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0, steps=30, warmup=5),
    "baby": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2, steps=3, warmup=1),
}
QUICK = {
    "cpu": dict(n_layer=2, n_head=2, n_embd=64, block_size=32, batch_size=4, dropout=0.0, steps=3, warmup=1),
    "baby": dict(n_layer=2, n_head=2, n_embd=96, block_size=64, batch_size=8, dropout=0.2, steps=2, warmup=1),
}
VOCAB = 65      # Tiny Shakespeare's characters
ROUNDS = 6      # the timed steps are taken in up to this many rounds, with a peak reading before each and after the last


def peak_rss_mb():
    """High-water resident memory of this process, in MiB (2^20 bytes)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def best_time(fn, repeats):
    fn()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# the optimizer the trainer runs: core's clipping numbers, fast's threaded AdamW
optim = types.SimpleNamespace(adamw_init=core_optim.adamw_init, adamw_step=fast_optim.adamw_step, global_norm=core_optim.global_norm,
                              clip_factor=core_optim.clip_factor)


def update(optim_module, params, grads, opt):
    """An AdamW step (lr 1e-4) on the gradients clipped to norm 1, as training takes it (the clipping
    factor passed as grad_scale); optim_module is `optim` above, or another checkout's (--against),
    which may predate grad_scale: then the gradients are clipped in place first."""
    if hasattr(optim_module, "clip_factor"):
        norm = optim_module.global_norm(grads)
        optim_module.adamw_step(params, grads, opt, 1e-4, grad_scale=optim_module.clip_factor(norm, 1.0))
    else:
        optim_module.clip_by_global_norm(grads, 1.0)
        optim_module.adamw_step(params, grads, opt, 1e-4)


def paired_mfu(flops, round_ms, readings):
    """[MFU of each round]: a round's median step (round_ms[r], ms) against the higher of the peak readings
    (GFLOP/s) taken just before and just after it, readings[r] and readings[r + 1]."""
    return [flops / ms / 1e6 / max(readings[r], readings[r + 1]) for r, ms in enumerate(round_ms)]


def matmul_peak(n=2048, repeats=3):
    """(GFLOP/s with BLAS on all cores, GFLOP/s with one product per core on threads with one BLAS thread each)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    flops = 2 * n ** 3
    blas_all = flops / best_time(lambda: a @ a, repeats) / 1e9
    cores = parallel.usable_cores()
    if cores < 2 or not parallel.blas_available():
        return blas_all, None
    mats = [a.copy() for _ in range(cores)]
    split = cores * flops / best_time(lambda: parallel.run_parallel(np.matmul, [(m, m) for m in mats]), repeats) / 1e9
    return blas_all, split


def step_matmul_shapes(B, T, L_, C, V, H):
    """Every matrix product of one training step as (batch, m, k, n): forward then backward."""
    N, D = B * T, C // H
    fwd_lin = [(N, C, 3 * C), (N, C, C), (N, C, 4 * C), (N, 4 * C, C)]
    att = [(B * H, T, D, T), (B * H, T, T, D)]
    shapes = []
    for _ in range(L_):
        shapes += [(1, m, k, n) for m, k, n in fwd_lin] + att
        # backward: dx = dy W (m×n @ n×k) and dW = dyᵀ x (n×m @ m×k) per linear; 4 products in attention
        shapes += [(1, m, n, k) for m, k, n in fwd_lin] + [(1, n, m, k) for m, k, n in fwd_lin]
        shapes += [(B * H, T, T, D), (B * H, T, D, T), (B * H, T, T, D), (B * H, T, T, D)]
    shapes += [(1, N, C, V), (1, N, V, C), (1, V, N, C)]
    return shapes


def matmul_only_ms(B, T, L_, C, V, H, workers, repeats=3):
    """Wall time of the step's matrix products alone, split over `workers` threads as the step is."""
    rng = np.random.default_rng(0)
    halves = [B // workers + (i < B % workers) for i in range(workers)]

    def products(b):
        arrays = {}                                   # one set of operands per distinct shape, reused
        out = []
        for shape in step_matmul_shapes(b, T, L_, C, V, H):
            if shape not in arrays:
                batch, m, k, n = shape
                lead = (batch,) if batch > 1 else ()
                arrays[shape] = (rng.standard_normal(lead + (m, k), dtype=np.float32),
                                 rng.standard_normal(lead + (k, n), dtype=np.float32),
                                 np.empty(lead + (m, n), np.float32))
            out.append(arrays[shape])
        return out

    work = [products(b) for b in halves]

    def run(items):
        for a, w, o in items:
            np.matmul(a, w, out=o)

    if workers > 1:
        return 1e3 * best_time(lambda: parallel.run_parallel(run, [(w,) for w in work]), repeats)
    return 1e3 * best_time(lambda: run(work[0]), repeats)


# ----------------------------------------------------------------------------- breakdown

CATEGORIES = ("embedding", "layer norm", "attention linear", "attention core", "MLP linear", "GELU",
              "head + loss", "dropout + residual", "optimizer", "glue")


def category_of(fn_name, args, names):
    """Which row of the breakdown a layer call belongs to."""
    if fn_name.startswith("embedding"):
        return "embedding"
    if fn_name.startswith("layernorm"):
        return "layer norm"
    if fn_name.startswith("attention"):
        return "attention core"
    if fn_name.startswith("gelu"):
        return "GELU"
    if fn_name.startswith("cross_entropy"):
        return "head + loss"
    if fn_name.startswith("linear"):
        W = args[1] if fn_name == "linear_forward" else args[1][1]
        name = names.get(id(W), "")
        return "head + loss" if "wte" in name else "attention linear" if ".attn." in name else "MLP linear"
    return "dropout + residual"


def breakdown(params, config, x, y, rng, opt, repeats=3):
    """{(category, 'fwd'|'bwd'): percent of one single-threaded step}, the best of `repeats` steps."""
    names = {id(v): k for k, v in params.items()}
    wrapped = [n for n in dir(L) if n.endswith(("_forward", "_backward", "_backward_", "_output")) and callable(getattr(L, n))]
    originals = {n: getattr(L, n) for n in wrapped}
    plain_backward = M.backward
    phase = ["fwd"]

    def backward(*args, **kw):                   # a layer's time counts where the model calls it: a forward
        phase[0] = "bwd"                         # recomputed inside the backward is backward time
        try:
            return plain_backward(*args, **kw)
        finally:
            phase[0] = "fwd"

    best = None
    for _ in range(repeats):
        spent = {}

        depth = [0]

        def timed(n, fn):
            def inner(*args, **kw):
                depth[0] += 1                    # a layer called inside another counts as its caller's time
                t = time.perf_counter()
                try:
                    return fn(*args, **kw)
                finally:
                    depth[0] -= 1
                    if depth[0] == 0:
                        key = (category_of(n, args, names), phase[0])
                        spent[key] = spent.get(key, 0.0) + time.perf_counter() - t
            return inner

        for n in wrapped:
            setattr(L, n, timed(n, originals[n]))
        M.backward = backward
        try:
            with parallel.blas_threads(1):
                t0 = time.perf_counter()
                loss, grads = M.loss_and_grads(params, config, x, y, train=True, rng=rng)
                t1 = time.perf_counter()
                update(optim, params, grads, opt)
                t2 = time.perf_counter()
        finally:
            for n in wrapped:
                setattr(L, n, originals[n])
            M.backward = plain_backward
        spent[("optimizer", "bwd")] = t2 - t1
        spent[("glue", "fwd")] = (t1 - t0) - sum(v for k, v in spent.items() if k[0] != "optimizer")
        total = t2 - t0
        if best is None or total < best[0]:
            best = (total, spent)
    total, spent = best
    return {f"{k[0]}|{k[1]}": 100 * v / total for k, v in spent.items()}, 1e3 * total


# ----------------------------------------------------------------------------- one configuration


def run_config(name, spec, quick=False):
    """Measure one training configuration; returns a dict (printed as JSON by the subprocess)."""
    spec = dict(spec)
    B, steps, warmup = spec.pop("batch_size"), spec.pop("steps"), spec.pop("warmup")
    config = G.GPTConfig(vocab_size=VOCAB, **spec)
    params = G.init_params(config, seed=0)
    opt = adamw_init(params)
    rng = np.random.default_rng(0)
    T = config.block_size
    x = rng.integers(0, VOCAB, size=(B, T))
    y = rng.integers(0, VOCAB, size=(B, T))
    workers = min(parallel.usable_cores(), B) if parallel.blas_available() else 1
    flops = G.matmul_flops(config, B)["per_step"]

    def read_peak():             # (all cores, one per core or None)
        return matmul_peak(512 if quick else 2048, 2 if quick else 3)

    def step():
        loss, grads = M.loss_and_grads_parallel(params, config, x, y, train=True, rng=rng)
        update(optim, params, grads, opt)
        return loss

    for _ in range(warmup):
        step()
    peaks = [read_peak()]        # before each round of timed steps and after the last
    times, round_ms = [], []
    for steps_in_round in np.array_split(np.arange(steps), min(ROUNDS, steps)):
        ts = []
        for _ in steps_in_round:
            t = time.perf_counter()
            loss = step()
            ts.append(time.perf_counter() - t)
        times += ts
        round_ms.append(1e3 * float(np.median(ts)))
        peaks.append(read_peak())
    ms = 1e3 * float(np.median(times))
    rss = peak_rss_mb()          # before the breakdown and mm-only probes allocate anything
    mm_ms = matmul_only_ms(B, T, config.n_layer, config.n_embd, VOCAB, config.n_head, workers, 2 if quick else 3)
    parts, single_ms = breakdown(params, config, x, y, rng, opt, repeats=1 if (quick or name == "baby") else 3)
    peaks.append(read_peak())
    readings = [max(a, b or 0.0) for a, b in peaks]
    rounds_mfu = paired_mfu(flops, round_ms, readings)
    peak_all = max(p[0] for p in peaks)
    peak_split = max(p[1] for p in peaks) if peaks[0][1] else None
    peak = max(peak_all, peak_split or 0.0, flops / mm_ms / 1e6)
    return {"name": name, "params": G.count_params(config), "flops": flops, "ms": ms, "tokens_per_s": B * T / ms * 1e3,
            "gflops": flops / ms / 1e6, "peak_blas_all": peak_all, "peak_split": peak_split, "peak": peak,
            "peak_readings": [round(v, 1) for v in readings], "mfu": float(np.median(rounds_mfu)),
            "mfu_rounds": [min(rounds_mfu), max(rounds_mfu)], "rounds": len(round_ms),
            "mfu_vs_best": flops / ms / 1e6 / peak, "mm_ms": mm_ms, "mm_gflops": flops / mm_ms / 1e6, "rss_mb": rss,
            "single_ms": single_ms, "breakdown": parts, "loss": loss, "workers": workers, "steps": steps,
            "shape": f"L{config.n_layer} H{config.n_head} C{config.n_embd} T{T} B{B} p{config.dropout}",
            "load": os.getloadavg()}


# ----------------------------------------------------------------------------- sampling


def sampling_speed(context, quick=False):
    """(tokens/s with the KV cache, tokens/s without) generating greedily at the given context length."""
    config = G.GPTConfig(block_size=context, vocab_size=VOCAB, n_layer=4, n_head=4, n_embd=128)
    params = G.init_params(config, seed=0)
    prompt = np.random.default_rng(0).integers(0, VOCAB, size=context)
    pick = lambda logits: int(np.argmax(logits))
    with parallel.blas_threads(1):       # decoding is a chain of tiny products: one BLAS thread is best
        return _sampling_speed(params, config, prompt, pick, quick)


# (use_cache, tokens a run, timed runs), in the order sampling_speed returns them; --quick: (64, 1), (8, 1)
SAMPLING_RUNS = ((True, 512, 5), (False, 48, 3))


def _sampling_speed(params, config, prompt, pick, quick):
    """The median tokens/s of SAMPLING_RUNS timed runs each, after an untimed run of the same length
    (with the cache, that warms the refills too)."""
    speeds = []
    for use_cache, n, runs in SAMPLING_RUNS:
        if quick:
            n, runs = n // 8, 1

        def one_run():
            t = time.perf_counter()
            for _ in D.generate(params, config, prompt, n, pick, use_cache=use_cache):
                pass
            return n / (time.perf_counter() - t)

        one_run()
        speeds.append(float(np.median([one_run() for _ in range(runs)])))
    return tuple(speeds)


# ----------------------------------------------------------------------------- comparison


def compare(rounds=20):
    """Alternate the plain and the threaded step of the CPU recipe in one run; print both medians."""
    spec = dict(CONFIGS["cpu"])
    B = spec.pop("batch_size"); spec.pop("steps"); spec.pop("warmup")
    config = G.GPTConfig(vocab_size=VOCAB, **spec)
    params = G.init_params(config)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, VOCAB, size=(2, B, config.block_size))

    def plain_1blas():
        with parallel.blas_threads(1):
            M.loss_and_grads(params, config, x, y)

    variants = {"plain, BLAS default threads": lambda: M.loss_and_grads(params, config, x, y),
                "plain, 1 BLAS thread": plain_1blas,
                "two threads, 1 BLAS thread each": lambda: M.loss_and_grads_parallel(params, config, x, y)}
    times = {k: [] for k in variants}
    for r in range(rounds + 2):
        for k, f in variants.items():
            t = time.perf_counter()
            f()
            if r >= 2:
                times[k].append(time.perf_counter() - t)
    for k, v in times.items():
        print(f"  {k:<34}{1e3 * np.median(v):8.1f} ms  (loss_and_grads only)")
    print(f"  load {os.getloadavg()[0]:.2f}")


def eval_one_thread(params, config, splits, a, step):
    """train/loop.py's estimate_loss as it was before its threads: batch by batch, in one loop, one BLAS thread."""
    forward = fast_model(config).forward
    out = {}
    with parallel.blas_threads(1):
        for name, ids in splits.items():
            rng = np.random.default_rng([a.seed, step, len(name)])
            losses = [forward(params, config, *get_batch(ids, config.block_size, a.batch_size, rng),
                              for_backward=False)[1] for _ in range(a.eval_iters)]
            out[name] = float(np.mean(losses))
    return out


def eval_speed(rounds=6, quick=False):
    """train.py's evaluation (--eval_iters 20 batches of each split, forward only) at the bench's sizes, the old
    one-thread loop and estimate_loss alternated (A B A B ...): forward tokens/s, the median of each."""
    spec = dict(QUICK["cpu"] if quick else CONFIGS["cpu"])
    sizes = {k: spec[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
    ids = load_ids(DEFAULT_DATA)[1]
    splits = dict(zip(("train", "val"), train_val_split(ids)))
    models = {"GPT-2": G.GPTConfig(vocab_size=VOCAB, **sizes),
              "Llama (2 K/V heads)": LlamaConfig(vocab_size=VOCAB, n_kv_head=2, **sizes)}
    print(f"evaluation: {2 * 20} batches of {spec['batch_size']}x{sizes['block_size']} tokens (train and val), "
          f"forward only; {rounds} rounds alternated; load before {os.getloadavg()[0]:.2f}")
    for name, config in models.items():
        params = model_of(config).init_params(config, seed=0)
        a = TrainArgs(batch_size=spec["batch_size"], eval_iters=20)
        tokens = 2 * a.eval_iters * a.batch_size * config.block_size
        arms = {"one thread (before)": eval_one_thread, "a thread per core (now)": estimate_loss}
        seconds = {k: [] for k in arms}
        results = {}
        for r in range(rounds + 1):                      # round 0 warms both up
            for k, f in arms.items():
                t = time.perf_counter()
                results[k] = f(params, config, splits, a, 250)
                if r:
                    seconds[k].append(time.perf_counter() - t)
        same = len({json.dumps(v) for v in results.values()}) == 1
        speed = {k: tokens / np.median(v) for k, v in seconds.items()}
        before, now = speed.values()
        print(f"  {name:<22}" + "".join(f"{k}: {v:8,.0f} tok/s   " for k, v in speed.items())
              + f"ratio {now / before:.2f}x; losses equal bit for bit: {same}")
    print(f"  load after {os.getloadavg()[0]:.2f}")


def model_namespace(gpt2, fast_model):
    """What against() calls of a model: core's config and init, the fast path's step."""
    return types.SimpleNamespace(GPTConfig=gpt2.GPTConfig, init_params=gpt2.init_params,
                                 loss_and_grads=fast_model.loss_and_grads,
                                 loss_and_grads_parallel=fast_model.loss_and_grads_parallel)


def against(other_root, rounds=20):
    """Alternate another checkout's CPU-recipe step with this one's, in one process; print both medians.

    other_root is a folder holding a tinylm package (e.g. a worktree of main). Its package is copied
    under another name so that both import side by side. Each round runs, for both versions, one
    single-threaded step (one BLAS thread) and one threaded step, each with clipping and AdamW.
    Process-wide settings (BLAS threads, keep_freed_memory once either calls it) apply to both.
    """
    import importlib
    import shutil
    import tempfile
    tmp = tempfile.mkdtemp(prefix="tinylm_against_")
    shutil.copytree(os.path.join(other_root, "tinylm"), os.path.join(tmp, "tinylm_other"),
                    ignore=shutil.ignore_patterns("data", "__pycache__"))
    for folder, _, names in os.walk(os.path.join(tmp, "tinylm_other")):     # its absolute imports, renamed too
        for name in (n for n in names if n.endswith(".py")):
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            with open(path, "w", encoding="utf-8") as f:
                f.write(text.replace("from tinylm.", "from tinylm_other.").replace("import tinylm.", "import tinylm_other."))
    flat = not os.path.isdir(os.path.join(tmp, "tinylm_other", "fast"))     # the layout before tinylm/fast/
    sys.path.insert(0, tmp)
    try:
        if flat:
            other = {n: importlib.import_module(f"tinylm_other.{n}") for n in ("model", "parallel", "optim")}
        else:
            gpt2, fast_model, core_opt, fast_opt, fast_parallel = (importlib.import_module(f"tinylm_other.{n}") for n in (
                "core.gpt2", "fast.model", "core.optim", "fast.optim", "fast.parallel"))
            other = {"model": model_namespace(gpt2, fast_model), "parallel": fast_parallel,
                     "optim": types.SimpleNamespace(adamw_init=core_opt.adamw_init, adamw_step=fast_opt.adamw_step,
                                                    global_norm=core_opt.global_norm, clip_factor=core_opt.clip_factor)}
        versions = {"other": other, "this": {"model": model_namespace(G, M), "parallel": parallel, "optim": optim}}
    finally:
        sys.path.remove(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    spec = dict(CONFIGS["cpu"])
    B = spec.pop("batch_size"); spec.pop("steps"); spec.pop("warmup")
    x, y = np.random.default_rng(0).integers(0, VOCAB, size=(2, B, spec["block_size"]))
    variants = {}
    for tag, mods in versions.items():
        Mv, Pv, Ov = mods["model"], mods["parallel"], mods["optim"]
        config = Mv.GPTConfig(vocab_size=VOCAB, **spec)
        params = Mv.init_params(config)
        opt = Ov.adamw_init(params)

        def single(Mv=Mv, Pv=Pv, Ov=Ov, config=config, params=params, opt=opt):
            with Pv.blas_threads(1):
                _, g = Mv.loss_and_grads(params, config, x, y)
                update(Ov, params, g, opt)

        def threaded(Mv=Mv, Ov=Ov, config=config, params=params, opt=opt):
            _, g = Mv.loss_and_grads_parallel(params, config, x, y)
            update(Ov, params, g, opt)

        variants[f"{tag}, one thread"] = single
        variants[f"{tag}, threaded"] = threaded
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for r in range(rounds + 2):
        for k, f in variants.items():
            t, c = time.perf_counter(), time.process_time()
            f()
            if r >= 2:
                wall[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
    print(f"  other = {other_root}; step = loss_and_grads(_parallel) + clipping + AdamW; medians of {rounds}")
    for k in variants:
        print(f"  {k:<22}{1e3 * np.median(wall[k]):8.1f} ms wall {1e3 * np.median(cpu[k]):8.1f} ms CPU (all threads)")
    for kind in ("one thread", "threaded"):
        print(f"  {kind}: other/this = {np.median(wall['other, ' + kind]) / np.median(wall['this, ' + kind]):.2f}x wall")
    print(f"  load {os.getloadavg()[0]:.2f}")


# ----------------------------------------------------------------------------- report


def print_table(rows):
    print(f"{'config':<8}{'shape':<28}{'params':>10}{'GFLOP/step':>12}{'ms/step':>10}{'tokens/s':>10}"
          f"{'GFLOP/s':>9}{'peak':>8}{'MFU':>7}{'vs best':>9}{'mm-only ms':>12}{'peak RSS MiB':>14}{'load':>6}")
    for r in rows:
        print(f"{r['name']:<8}{r['shape']:<28}{r['params']:>10,}{r['flops'] / 1e9:>12.2f}{r['ms']:>10.1f}"
              f"{r['tokens_per_s']:>10,.0f}{r['gflops']:>9.1f}{r['peak']:>8.1f}{100 * r['mfu']:>6.1f}%"
              f"{100 * r['mfu_vs_best']:>8.1f}%{r['mm_ms']:>12.1f}{r['rss_mb']:>14.0f}{r['load'][0]:>6.2f}")
    for r in rows:
        split = f"{r['peak_split']:.1f}" if r["peak_split"] else "n/a"
        readings = " / ".join(f"{v:.1f}" for v in r["peak_readings"])
        lo, hi = r["mfu_rounds"]
        print(f"  {r['name']}: MFU = median over {r['rounds']} rounds ({100 * lo:.1f}–{100 * hi:.1f}%) of the round's median "
              f"step against the higher of the square's readings just before and after it; vs best = GFLOP/s ÷ peak;")
        print(f"    peak = max(2048² BLAS all cores {r['peak_blas_all']:.1f}, one per core on threads {split}, the "
              f"step's own products alone {r['mm_gflops']:.1f}) GFLOP/s; the square's best, read before each round, "
              f"after the last and at the end: {readings};")
        print(f"    {r['workers']} worker thread(s); median of {r['steps']} steps; loss {r['loss']:.3f}")
    print("\nwhere one single-threaded step's time goes (percent; forward | backward):")
    print(f"{'':<22}" + "".join(f"{r['name'] + ' fwd':>11}{r['name'] + ' bwd':>11}" for r in rows))
    for cat in CATEGORIES:
        cells = "".join(f"{r['breakdown'].get(cat + '|fwd', 0.0):>11.1f}{r['breakdown'].get(cat + '|bwd', 0.0):>11.1f}"
                        for r in rows)
        print(f"{cat:<22}{cells}")
    print(f"{'single-thread step ms':<22}" + "".join(f"{r['single_ms']:>22.1f}" for r in rows))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a.split("=")[0] in ("--time-to-loss", "--optimizer-share") for a in argv):
        return time_to_quality(argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench", description="Benchmark tinylm's training step and sampling against the matmul peak.",
                                 epilog="--time-to-loss LOSS and --optimizer-share measure time to quality instead "
                                        "(AdamW vs Muon, PyTorch alongside): see python -m benchmarks.bench_train --help")
    ap.add_argument("--quick", action="store_true", help="small shapes and few steps: a smoke test")
    ap.add_argument("--configs", default="cpu,baby", help="comma-separated: cpu, baby")
    ap.add_argument("--no-sampling", action="store_true", help="skip the sampling measurement")
    ap.add_argument("--compare", action="store_true", help="alternate plain and threaded steps of the CPU recipe")
    ap.add_argument("--against", metavar="DIR", help="alternate the CPU-recipe step of the tinylm in DIR "
                    "(e.g. a worktree of main) with this one's, in one process")
    ap.add_argument("--eval", action="store_true", help="alternate train.py's evaluation on one thread and on a "
                    "thread per core (forward tokens/s, GPT-2 and Llama)")
    ap.add_argument("--one", help=argparse.SUPPRESS)     # internal: measure one config, print JSON
    args = ap.parse_args(argv)
    table = QUICK if args.quick else CONFIGS
    if args.one:
        print(json.dumps(run_config(args.one, table[args.one], args.quick)))
        return 0
    print(machine_line())
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}"
          f"{'   (--quick: small shapes, numbers not meaningful)' if args.quick else ''}\n")
    if args.compare:
        compare(5 if args.quick else 20)
        return 0
    if args.eval:
        eval_speed(2 if args.quick else 6, args.quick)
        return 0
    if args.against:
        against(args.against, 5 if args.quick else 20)
        return 0
    rows = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), os.environ.get("PYTHONPATH")])))
    for name in args.configs.split(","):
        cmd = [sys.executable, "-m", "benchmarks.bench", "--one", name] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print_table(rows)
    if not args.no_sampling:
        (_, n1, r1), (_, n0, r0) = SAMPLING_RUNS
        runs = "one run each" if args.quick else f"the median of {r1} runs of {n1} tokens with the cache, of {r0} of {n0} without"
        print(f"\nsampling, one sequence, greedy (tokens/s: {runs}, after a warm-up run):")
        print(f"{'context':>8}{'KV cache':>12}{'no cache':>12}{'speed-up':>10}")
        for context in (64, 256):
            cached, uncached = sampling_speed(context, args.quick)
            print(f"{context:>8}{cached:>12,.0f}{uncached:>12,.0f}{cached / uncached:>9.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
