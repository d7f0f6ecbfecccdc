"""Benchmark fine-tuning: full, LoRA and PiSSA at R = 4 and 16, each at its best learning rate of a sweep.

    python train.py                              # the base: the default Shakespeare model, out/ckpt.npz
    python -m benchmarks.finetune_bench              # fine-tune it on the bundled KJV Genesis+Exodus (~10 min)
    python -m benchmarks.finetune_bench --quick      # a tiny base and a few steps: checks that it runs

Every run is `tinylm.train.loop.train` itself (fresh folder, same seed, same batches, same evaluation
batches at each step), so the runs differ only in what is trained and its learning rate. For each
method the sweep runs every learning rate of its list; the one with the lowest final validation
loss is the method's. Printed:
  the sweep     final validation loss for each method and learning rate
  the curves    validation loss vs steps for each method at its chosen learning rate
  targets       steps PiSSA needs to reach LoRA's final validation loss, as a fraction of LoRA's
                steps (target <= 1/2); adapter parameters as a share of the model (target < 5% at R = 4);
                ms/step, from the training loop's smoothed tokens/s at each evaluation, median over
                every run of the method (runs interleaved: lr by lr, each method in turn), LoRA and
                PiSSA against full (target <= 1); peak traced memory (tracemalloc, NumPy's arrays
                included) of a short run of each, against full (target <= 1)
"""
import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import tracemalloc

import numpy as np

from tinylm.text.data import DEFAULT_DATA
from tinylm.errors import TinyLMError
from tinylm.core.gpt2 import param_shapes
from tinylm.io.checkpoint import load_checkpoint
from tinylm.lowrank.adapters import adapter_shapes, resolve_targets
from tinylm.train.args import TrainArgs
from tinylm.train.loop import Interrupted, train

KJV_DATA = os.path.join(os.path.dirname(DEFAULT_DATA), "kjv_genesis_exodus.txt")
METHODS = (("full", 0, "lora"), ("lora R=4", 4, "lora"), ("pissa R=4", 4, "pissa"),
           ("lora R=16", 16, "lora"), ("pissa R=16", 16, "pissa"))
FULL_LRS = (1e-4, 3e-4, 1e-3, 3e-3)
ADAPTER_LRS = (1e-3, 3e-3, 1e-2, 3e-2)


def run_args(base, data, out_dir, rank, init, lr, steps, eval_interval, eval_iters):
    kw = dict(data=data, out_dir=out_dir, init_from=base, max_iters=steps, lr_decay_iters=steps,
              learning_rate=lr, min_lr=lr / 10, warmup_iters=max(1, steps // 20), eval_interval=eval_interval,
              eval_iters=eval_iters, unknown_chars="drop", sample_tokens=0, progress=False)
    if rank:
        kw.update(lora_rank=rank, lora_init=init)
    return TrainArgs(**kw), tuple(kw)


def quiet_train(args, explicit):
    """tinylm.train.loop.train with its log and per-evaluation lines kept off the bench's table."""
    with contextlib.redirect_stdout(io.StringIO()):
        return train(args, explicit=explicit, log=lambda *_: None)


def one_run(args, explicit):
    """Train; -> (steps, val losses, ms/step readings)."""
    quiet_train(args, explicit)
    rows = [json.loads(line) for line in open(os.path.join(args.out_dir, "metrics.jsonl"))]
    tokens = args.batch_size * args.block_size
    ms = [1000.0 * tokens / r["tokens_per_s"] for r in rows if r["tokens_per_s"] > 0]
    return [r["step"] for r in rows], [r["val_loss"] for r in rows], ms


def steps_to_reach(steps, losses, target):
    """The first evaluated step whose validation loss is at or below target (None if never)."""
    return next((s for s, v in zip(steps, losses) if v <= target), None)


def peak_memory(args, explicit):
    """Peak bytes traced by tracemalloc during a short training run (loading included)."""
    tracemalloc.start()
    try:
        quiet_train(args, explicit)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def make_quick_base(folder):
    """A tiny Shakespeare model for --quick (a few seconds)."""
    out = os.path.join(folder, "base")
    quiet_train(TrainArgs(out_dir=out, n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, max_iters=30,
                          lr_decay_iters=30, eval_interval=30, eval_iters=2, sample_tokens=0, progress=False), ())
    return os.path.join(out, "ckpt.npz")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.finetune_bench", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--base", default=os.path.join("out", "ckpt.npz"), help="the model to fine-tune (python train.py)")
    ap.add_argument("--data", default=KJV_DATA, help="the fine-tuning text")
    ap.add_argument("--steps", type=int, default=500, help="optimizer steps of each run")
    ap.add_argument("--eval_interval", type=int, default=25, help="steps between validation losses")
    ap.add_argument("--eval_iters", type=int, default=10, help="batches per validation loss")
    ap.add_argument("--json", metavar="FILE", help="also write every curve and figure to FILE")
    ap.add_argument("--quick", action="store_true", help="tiny base model, 20 steps, two learning rates")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        full_lrs, adapter_lrs = FULL_LRS, ADAPTER_LRS
        if a.quick:
            a.base, a.steps, a.eval_interval, a.eval_iters = make_quick_base(tmp), 20, 5, 2
            full_lrs, adapter_lrs = FULL_LRS[:2], ADAPTER_LRS[:2]
        if not os.path.exists(a.base):
            print(f"error: no base model at {a.base}; train the default one first with: python train.py",
                  file=sys.stderr)
            return 1
        config = load_checkpoint(a.base, with_optimizer=False)["config"]
        shapes = param_shapes(config)
        n_model = sum(int(np.prod(s)) for s in shapes.values())
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"fine-tuning {a.base} ({n_model:,} parameters) on {a.data}, {a.steps} steps a run, "
              f"validation every {a.eval_interval} steps ({a.eval_iters} batches); load average {load:.2f}")
        sweep, ms = {}, {m[0]: [] for m in METHODS}
        t0 = time.perf_counter()
        for i in range(max(len(full_lrs), len(adapter_lrs))):
            for name, rank, init in METHODS:
                lrs = full_lrs if rank == 0 else adapter_lrs
                if i >= len(lrs):
                    continue
                lr = lrs[i]
                out = os.path.join(tmp, f"{name.replace(' ', '_')}_{lr:g}")
                args = run_args(a.base, a.data, out, rank, init, lr, a.steps, a.eval_interval, a.eval_iters)
                try:
                    steps, losses, step_ms = one_run(*args)
                except Interrupted:
                    raise
                except TinyLMError as e:          # a learning rate too high for the method: diverged
                    steps, losses, step_ms = [], [], []
                    print(f"  {name} lr {lr:g}: {e}")
                sweep[(name, lr)] = (steps, losses)
                ms[name] += step_ms
                print(f"  {name:<11} lr {lr:<7g} final val {losses[-1] if losses else float('nan'):.4f}  "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
        chosen = {}
        for name, rank, _ in METHODS:
            runs = {lr: v for (n, lr), v in sweep.items() if n == name and v[1]}
            lr = min(runs, key=lambda r: runs[r][1][-1])
            chosen[name] = (lr, *runs[lr])
        print("\nsweep: final validation loss by learning rate (the lowest is the method's)")
        for name, _, _ in METHODS:
            cells = [f"{lr:g}: {v[1][-1]:.4f}" if v[1] else f"{lr:g}: diverged"
                     for (n, lr), v in sweep.items() if n == name]
            print(f"  {name:<11} " + "   ".join(cells))
        print("\nvalidation loss vs steps, each method at its chosen learning rate")
        header = f"{'step':>6}" + "".join(f"{n + ' ' + format(chosen[n][0], 'g'):>18}" for n, _, _ in METHODS)
        print(header)
        steps = chosen["full"][1]
        for j, s in enumerate(steps):
            print(f"{s:>6}" + "".join(f"{chosen[n][2][j]:>18.4f}" for n, _, _ in METHODS))
        print("\ntargets")
        figures = {"base": a.base, "data": a.data, "steps": a.steps, "sweep": {f"{n} {lr:g}": v for (n, lr), v in sweep.items()},
                   "chosen": {n: {"lr": c[0], "steps": c[1], "val_loss": c[2]} for n, c in chosen.items()}}
        for rank in (4, 16):
            lo, pi = chosen[f"lora R={rank}"], chosen[f"pissa R={rank}"]
            reach = steps_to_reach(pi[1], pi[2], lo[2][-1])
            frac = None if reach is None else reach / lo[1][-1]
            verdict = "not reached" if reach is None else f"step {reach} = {frac:.2f} of LoRA's {lo[1][-1]}"
            met = frac is not None and frac <= 0.5
            print(f"  R={rank:<3} PiSSA reaches LoRA's final val loss {lo[2][-1]:.4f}: {verdict} "
                  f"(target <= 0.5: {'met' if met else 'NOT met'}); PiSSA's final {pi[2][-1]:.4f}")
            figures[f"pissa_reach_fraction_R{rank}"] = frac
        targets = resolve_targets("all", shapes)
        share = sum(int(np.prod(s)) for s in adapter_shapes(targets, 4, shapes).values()) / n_model
        print(f"  adapters at R=4 hold {100 * share:.2f}% of the model's parameters (target < 5%: "
              f"{'met' if share < 0.05 else 'NOT met'})")
        med = {n: float(np.median(v)) if v else float("nan") for n, v in ms.items()}
        print("  ms/step (median over the evaluations of every run): " +
              ", ".join(f"{n} {v:.1f}" for n, v in med.items()))
        for n in med:
            if n != "full":
                print(f"    {n} / full = {med[n] / med['full']:.3f} (target <= 1)")
        mem = {}
        for name, rank, init in METHODS:
            out = os.path.join(tmp, "mem_" + name.replace(" ", "_"))
            mem[name] = peak_memory(*run_args(a.base, a.data, out, rank, init, 1e-3, 10, 10, 2))
        print("  peak traced memory of a 10-step run (MiB): " +
              ", ".join(f"{n} {v / 2 ** 20:.2f}" for n, v in mem.items()))
        for n in mem:
            if n != "full":
                print(f"    {n} / full = {mem[n] / mem['full']:.3f} (target <= 1)")
        figures.update(ms_per_step=med, peak_traced_bytes=mem, adapter_share_R4=share)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(figures, f, indent=1)
        print(f"\ndone in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
