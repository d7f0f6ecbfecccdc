"""Time to quality: steps and seconds of training to a validation loss, AdamW vs Muon, PyTorch alongside.

    python -m benchmarks.bench --time-to-loss 1.886      # tinylm AdamW, tinylm Muon, PyTorch nanoGPT (~10 min)
    python -m benchmarks.bench --optimizer-share         # the optimizer's share of a step, per orthogonalization
    python -m benchmarks.bench --time-to-loss 3.0 --quick    # small model, a few seconds: checks that it runs
    python -m benchmarks.bench --time-to-loss 1.886 --also-llama # and a Llama of the same sizes, AdamW and Muon

Every run is a subprocess of its own (a worker), started at once and then driven in turns: each trains
`--eval-every` steps, then evaluates, while the others wait idle, so all of them meet the machine in the
same minutes. A worker trains on the CPU recipe (Tiny Shakespeare, 4 layers, 4 heads, 128 wide, context
64, batch 12) with train.py's batches (the same seed, the same RNG), and evaluates on one fixed set of
`--eval-batches` validation batches drawn with their own RNG (the same set for every run). With
`--also-llama` two more runs train a Llama (core/llama.py's model, fast/llama.py's path) at the same sizes,
with AdamW and with Muon, on their own learning rates and schedules (--llama-*); `--no-gpt2` leaves tinylm's
GPT-2 runs out. The clock
counts training only (batches, forward, backward, optimizer), not the evaluations; "optimizer" is the
share of that spent in clipping and the optimizer step.

PyTorch's run (benchmarks/bench_torch.py: nanoGPT's model and AdamW recipe) needs torch installed
(`pip install torch`); without it the table says so and the ratios are against tinylm's AdamW only.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from benchmarks.common import machine_line
from tinylm.core.arch import model_of
from tinylm.core.llama import LlamaConfig
from tinylm.core.muon import muon_init
from tinylm.core.optim import adamw_init, clip_factor, global_norm, learning_rate_at
from tinylm.core.gpt2 import GPTConfig
from tinylm.fast.arch import fast_model
from tinylm.fast.optim import adamw_step, muon_step
from tinylm.fast.parallel import blas_threads, map_threads
from tinylm.text.data import DEFAULT_DATA, get_batch, load_ids, train_val_split

EVAL_SEED = 20261207
CPU_RECIPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12)
QUICK_RECIPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8)
RUNS = {   # name: what the worker builds; the schedules are train.py's flags
    "tinylm AdamW": dict(kind="tinylm", optimizer="adamw"),
    "tinylm Muon": dict(kind="tinylm", optimizer="muon"),
    "PyTorch AdamW": dict(kind="torch", optimizer="adamw"),
}
LLAMA_RUNS = {   # --also-llama: the same sizes, rotary positions, RMSNorm, SwiGLU (width 2/3 of 4C), no biases
    "Llama AdamW": dict(kind="tinylm", arch="llama", optimizer="adamw"),
    "Llama Muon": dict(kind="tinylm", arch="llama", optimizer="muon"),
}


# ----------------------------------------------------------------------------- the worker


class TinyRun:
    """A tinylm model (GPT-2 or Llama, by the config) and its optimizer, stepped as train.py steps them."""

    def __init__(self, spec, config):
        core = model_of(config)
        self.M, self.spec, self.config = fast_model(config), spec, config
        self.params = core.init_params(config, seed=spec["seed"])
        self.opt = (muon_init(self.params, core.is_block_matrix) if spec["optimizer"] == "muon"
                    else adamw_init(self.params))
        self.dropout_rng = np.random.default_rng([spec["seed"], 2])
        self.opt_s = 0.0

    def step(self, x, y, lr, muon_lr):
        loss, grads = self.M.loss_and_grads_parallel(self.params, self.config, x, y, train=True, rng=self.dropout_rng)
        t = time.perf_counter()
        scale = clip_factor(global_norm(grads), 1.0)
        if self.spec["optimizer"] == "muon":
            muon_step(self.params, grads, self.opt, lr, muon_lr, self.spec["muon_momentum"],
                      self.spec["orthogonalize"], self.spec["ns_steps"], weight_decay=0.1, grad_scale=scale)
        else:
            adamw_step(self.params, grads, self.opt, lr, 0.9, 0.99, weight_decay=0.1, grad_scale=scale)
        self.opt_s += time.perf_counter() - t
        return loss

    def loss(self, x, y):
        with blas_threads(1):
            return float(self.M.forward(self.params, self.config, x, y, for_backward=False)[1])


def worker(spec):
    """Answer 'train N' / 'eval' / 'quit' on stdin with one JSON line each on stdout."""
    tokenizer, ids = load_ids(spec["data"], "strict")
    train_ids, val_ids = train_val_split(ids)
    r = spec["recipe"]
    sizes = dict(block_size=r["block_size"], vocab_size=tokenizer.vocab_size, n_layer=r["n_layer"],
                 n_head=r["n_head"], n_embd=r["n_embd"], dropout=0.0)
    if spec.get("arch") == "llama":
        config = LlamaConfig(**sizes, n_kv_head=spec.get("n_kv_head")).validate()
    else:
        config = GPTConfig(**sizes, bias=False)
    if spec["kind"] == "torch":
        from benchmarks.bench_torch import TorchRun     # torch is optional: imported only for its run
        run = TorchRun(config, spec["seed"])
        step = lambda x, y, lr, muon_lr: run.step(x, y, lr)
    else:
        run = TinyRun(spec, config)
        step = run.step
    eval_rng = np.random.default_rng(EVAL_SEED)
    evals = [get_batch(val_ids, config.block_size, r["batch_size"], eval_rng) for _ in range(spec["eval_batches"])]
    batch_rng = np.random.default_rng([spec["seed"], 1])
    n, train_s = 0, 0.0
    schedule = lambda peak, s: learning_rate_at(s, peak, peak * 0.1, spec["warmup_iters"], spec["max_iters"])
    def one_step(n):
        x, y = get_batch(train_ids, config.block_size, r["batch_size"], batch_rng)
        step(x, y, schedule(spec["learning_rate"], n), schedule(spec["muon_lr"], n))

    print(json.dumps({"ready": True}), flush=True)
    busy_s = 0.0          # seconds spent on train and eval commands, not waiting for the other workers' turns
    for line in sys.stdin:
        command = line.split()
        t_command = time.perf_counter()
        if command[0] == "train":
            t = time.perf_counter()
            for _ in range(min(int(command[1]), spec["max_iters"] - n)):
                one_step(n)
                n += 1
            train_s += time.perf_counter() - t
            busy_s += time.perf_counter() - t_command
            print(json.dumps({"step": n, "train_s": train_s, "opt_s": run.opt_s}), flush=True)
        elif command[0] == "time":      # N more steps, only timed (after the run: the state no longer matters)
            opt_before, t = run.opt_s, time.perf_counter()
            for _ in range(int(command[1])):
                one_step(n)
            print(json.dumps({"s": time.perf_counter() - t, "opt_s": run.opt_s - opt_before}), flush=True)
        elif command[0] == "eval":
            # tinylm's batches on a thread per core, as train.py's evaluation runs them (PyTorch threads its own)
            losses = ([run.loss(x, y) for x, y in evals] if spec["kind"] == "torch"
                      else map_threads(lambda xy: run.loss(*xy), evals))
            val_loss = float(np.mean(losses))
            busy_s += time.perf_counter() - t_command
            print(json.dumps({"val_loss": val_loss, "busy_s": busy_s}), flush=True)
        else:
            return 0
    return 0


# ----------------------------------------------------------------------------- driving the workers


class Worker:
    def __init__(self, spec):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_train", "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        t = time.perf_counter()
        self.ask(None)
        self.startup_s = time.perf_counter() - t    # the interpreter, the imports, the data, the model's init

    def ask(self, command):
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a benchmark worker ended (exit status {self.proc.wait()})")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait()


def torch_available():
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def time_to_loss(target, specs, eval_every, log=print, paired_rounds=6, paired_steps=10):
    """Drive the workers in turns until each reaches `target` or ends its schedule; a row per run."""
    workers = {name: Worker(spec) for name, spec in specs.items()}
    rows = {name: {"name": name, "max_iters": spec["max_iters"], "curve": []} for name, spec in specs.items()}
    active = list(workers)
    try:
        first = {name: workers[name].ask("eval")["val_loss"] for name in active}
        for name in active:
            rows[name]["curve"].append((0, first[name]))
        while active:
            for name in list(active):
                w, row = workers[name], rows[name]
                done = w.ask(f"train {eval_every}")
                evaluated = w.ask("eval")
                loss = evaluated["val_loss"]
                row.update(step=done["step"], train_s=done["train_s"], opt_s=done["opt_s"], val_loss=loss,
                           process_s=w.startup_s + evaluated["busy_s"])
                row["curve"].append((done["step"], loss))
                if loss <= target and "reached_step" not in row:
                    row.update(reached_step=done["step"], reached_s=done["train_s"], reached_process_s=row["process_s"])
                    active.remove(name)
                elif done["step"] >= specs[name]["max_iters"]:
                    active.remove(name)
            log("  " + "   ".join(f"{n}: step {r['step']} val {r['val_loss']:.4f}" for n, r in rows.items()
                                  if "step" in r))
        # The runs end at different times, so their seconds come from different minutes of a machine whose
        # speed drifts; a step's cost is therefore also timed with every run in turn, in the same minutes.
        paired = {name: [] for name in workers}
        for _ in range(paired_rounds):
            for name, w in workers.items():
                d = w.ask(f"time {paired_steps}")
                paired[name].append((d["s"] / paired_steps, d["opt_s"] / paired_steps))
        for name, row in rows.items():
            row["paired_ms"] = 1e3 * float(np.median([s for s, _ in paired[name]]))
            row["paired_opt_ms"] = 1e3 * float(np.median([o for _, o in paired[name]]))
    finally:
        for w in workers.values():
            w.close()
    return list(rows.values())


def print_time_to_loss(rows, target):
    """One row per run: its own seconds to the target, and the seconds at the paired speed (steps × a step's cost
    timed with every run in turn in the same minutes), which the ratios use: on a drifting machine the runs'
    own seconds come from different minutes."""
    by_name = {r["name"]: r for r in rows}

    def ratio(r, o, key):
        if o is None or o is r:
            return ""
        if "reached_step" in r and "reached_step" in o:
            return f"{key(o) / key(r):.2f}x"
        if "reached_step" in r:          # the other never got there: its whole run is a lower bound
            return f">{key(o, whole=True) / key(r):.2f}x"
        return "n/a"

    measured = lambda r, whole=False: r["train_s"] if whole or "reached_s" not in r else r["reached_s"]
    paired = lambda r, whole=False: (r["step"] if whole or "reached_step" not in r else r["reached_step"]) \
        * r["paired_ms"] / 1e3
    print(f"\ntime to validation loss {target} (training seconds; evaluations not counted):")
    print(f"{'run':<16}{'schedule':>9}{'steps':>7}{'val loss':>10}{'seconds':>9}{'ms/step':>9}{'paired':>8}"
          f"{'opt.':>8}{'seconds at paired':>19}{'PyTorch ÷ this':>16}{'AdamW ÷ this':>14}")
    for r in rows:
        reached = "reached_step" in r
        print(f"{r['name']:<16}{r['max_iters']:>9}{(r['reached_step'] if reached else '-'):>7}{r['val_loss']:>10.4f}"
              f"{measured(r):>9.1f}{1e3 * r['train_s'] / max(r['step'], 1):>9.1f}{r['paired_ms']:>8.1f}"
              f"{r['paired_opt_ms'] / r['paired_ms']:>8.1%}{paired(r):>19.1f}"
              f"{ratio(r, by_name.get('PyTorch AdamW'), paired):>16}{ratio(r, by_name.get('tinylm AdamW'), paired):>14}")
    missing = [r["name"] for r in rows if "reached_step" not in r]
    if missing:
        print(f"not reached within the schedule: {', '.join(missing)} (its val loss is at the end; a '>' ratio "
              f"counts its whole schedule, a lower bound)")
    print("ratios from 'seconds at paired' (steps to the target × the paired ms/step); 'paired' and 'opt.' (the "
          "optimizer's share) timed with every run in turn after the runs")
    process = lambda r, whole=False: r["process_s"] if whole or "reached_process_s" not in r else r["reached_process_s"]
    print(f"\nwhole process to the target (its start: interpreter, imports, data, init; then its training and every "
          f"evaluation up to the one that reached it; not the minutes spent waiting for the other runs' turns):")
    print(f"{'run':<16}{'seconds':>9}{'PyTorch ÷ this':>16}")
    for r in rows:
        print(f"{r['name']:<16}{process(r):>9.1f}{ratio(r, by_name.get('PyTorch AdamW'), process):>16}")


def optimizer_share(specs, rounds, steps_per_round, log=print):
    """Drive one worker per spec in turns; the optimizer's share of their training time."""
    workers = {name: Worker(spec) for name, spec in specs.items()}
    try:
        done = {}
        for _ in range(rounds):
            for name, w in workers.items():
                done[name] = w.ask(f"train {steps_per_round}")
    finally:
        for w in workers.values():
            w.close()
    print(f"\noptimizer share of a training step ({rounds} rounds of {steps_per_round} steps, alternated):")
    print(f"{'optimizer':<30}{'ms/step':>9}{'optimizer ms':>14}{'share':>8}")
    for name, d in done.items():
        print(f"{name:<30}{1e3 * d['train_s'] / d['step']:>9.1f}{1e3 * d['opt_s'] / d['step']:>14.1f}"
              f"{d['opt_s'] / d['train_s']:>8.1%}")


def spec_for(run, a, recipe, **over):
    spec = dict(RUNS.get(run, LLAMA_RUNS.get(run, {})), data=a.data, recipe=recipe, seed=1337, eval_batches=a.eval_batches,
                warmup_iters=a.warmup_iters, learning_rate=1e-3, muon_lr=a.muon_lr, muon_momentum=0.95,
                orthogonalize=a.orthogonalize, ns_steps=a.ns_steps)
    spec.update(over)
    return spec


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--time-to-loss", type=float, metavar="LOSS", help="train until the validation loss is at most LOSS")
    ap.add_argument("--optimizer-share", action="store_true", help="the optimizer's share of a step, per method")
    ap.add_argument("--quick", action="store_true", help="a small model and few steps, checks that it runs (sets its own "
                    "schedules, evaluation and warmup, overriding those flags)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="text to train on (default: Tiny Shakespeare)")
    ap.add_argument("--adamw-iters", type=int, default=2000, help="AdamW's schedule (tinylm and PyTorch): "
                    "the CPU recipe's 2000 steps")
    ap.add_argument("--muon-iters", type=int, default=700, help="Muon's schedule: cosine decay ends here")
    ap.add_argument("--also-muon", action="append", default=[], metavar="BATCH:ITERS",
                    help="another Muon run at this batch size and schedule, e.g. 16:500 (repeatable)")
    ap.add_argument("--muon-lr", type=float, default=0.02, help="Muon's peak learning rate (default 0.02)")
    ap.add_argument("--orthogonalize", default="eigh", help="Muon's polar factor: eigh (default), svd or newton_schulz")
    ap.add_argument("--ns-steps", type=int, default=5, help="Newton-Schulz iterations (default 5)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step, for every run (default: the "
                    "recipe's 12)")
    ap.add_argument("--muon-batch-size", type=int, default=None, help="sequences per step for Muon's run only")
    ap.add_argument("--warmup-iters", type=int, default=100, help="steps of linear warmup, every run (default 100)")
    ap.add_argument("--eval-every", type=int, default=50, help="steps between evaluations (the resolution)")
    ap.add_argument("--eval-batches", type=int, default=100, help="validation batches in the fixed evaluation")
    ap.add_argument("--no-torch", action="store_true", help="leave PyTorch out even if it is installed")
    ap.add_argument("--also-llama", action="store_true", help="two more runs: a Llama of the same sizes with AdamW "
                    "and with Muon")
    ap.add_argument("--no-gpt2", action="store_true", help="leave out tinylm's GPT-2 runs (with --also-llama: the "
                    "Llama's rows against PyTorch's, in fewer minutes)")
    ap.add_argument("--llama-lr", type=float, default=1e-3, help="the Llama's AdamW peak learning rate (its Muon run's "
                    "embeddings and gains too; default 1e-3)")
    ap.add_argument("--llama-muon-lr", type=float, default=None, help="the Llama's Muon peak learning rate "
                    "(default: --muon-lr)")
    ap.add_argument("--llama-adamw-iters", type=int, default=None, help="the Llama's AdamW schedule (default: "
                    "--adamw-iters)")
    ap.add_argument("--llama-muon-iters", type=int, default=None, help="the Llama's Muon schedule (default: "
                    "--muon-iters); its batch is Muon's (--muon-batch-size)")
    ap.add_argument("--n-kv-head", type=int, default=None, help="the Llama's K/V heads (default: one per query head)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)       # internal: one run, driven over stdin
    a = ap.parse_args(argv)
    if a.worker:
        return worker(json.loads(a.worker))
    if a.time_to_loss is None and not a.optimizer_share:
        ap.error("say what to measure: --time-to-loss LOSS or --optimizer-share")
    recipe = dict(QUICK_RECIPE if a.quick else CPU_RECIPE)
    if a.batch_size:
        recipe["batch_size"] = a.batch_size
    muon_recipe = dict(recipe, batch_size=a.muon_batch_size or recipe["batch_size"])
    if a.quick:
        a.adamw_iters, a.muon_iters, a.eval_every, a.eval_batches, a.warmup_iters = 40, 20, 10, 4, 5
    print(machine_line())
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; recipe {recipe}")
    with_torch = torch_available() and not a.no_torch
    if a.optimizer_share:
        specs = {"AdamW": spec_for("tinylm AdamW", a, recipe, max_iters=10 ** 9)}
        for method, steps in (("eigh", 5), ("svd", 5), ("newton_schulz", 5), ("newton_schulz", 3)):
            label = f"Muon, {method}" + (f" ({steps} steps)" if method == "newton_schulz" else "")
            specs[label] = spec_for("tinylm Muon", a, muon_recipe, max_iters=10 ** 9, orthogonalize=method,
                                    ns_steps=steps)
        optimizer_share(specs, 2 if a.quick else 6, 3 if a.quick else 10)
    if a.time_to_loss is not None:
        specs = {name: spec_for(name, a, muon_recipe if "Muon" in name else recipe,
                                max_iters=a.muon_iters if "Muon" in name else a.adamw_iters)
                 for name in RUNS if (with_torch or "PyTorch" not in name) and not (a.no_gpt2 and "tinylm" in name)}
        for extra in a.also_muon:
            try:
                batch, iters = (int(v) for v in extra.split(":"))
            except ValueError:
                ap.error(f"--also-muon takes BATCH:ITERS, e.g. 16:500, not {extra!r}")
            specs[f"tinylm Muon b{batch}"] = spec_for("tinylm Muon", a, dict(recipe, batch_size=batch), max_iters=iters)
        if a.also_llama:
            llama_muon_lr = a.muon_lr if a.llama_muon_lr is None else a.llama_muon_lr
            llama_adamw_iters = a.llama_adamw_iters or a.adamw_iters
            llama_muon_iters = a.llama_muon_iters or a.muon_iters
            if a.quick:
                llama_adamw_iters, llama_muon_iters = a.adamw_iters, a.muon_iters
            specs["Llama AdamW"] = spec_for("Llama AdamW", a, recipe, max_iters=llama_adamw_iters,
                                            learning_rate=a.llama_lr, n_kv_head=a.n_kv_head)
            specs["Llama Muon"] = spec_for("Llama Muon", a, muon_recipe, max_iters=llama_muon_iters,
                                           learning_rate=a.llama_lr, muon_lr=llama_muon_lr, n_kv_head=a.n_kv_head)
        print(f"schedules: AdamW lr 1e-3 over {a.adamw_iters} steps; Muon lr {a.muon_lr} ({a.orthogonalize}"
              f"{f', {a.ns_steps} steps' if a.orthogonalize == 'newton_schulz' else ''}, batch {muon_recipe['batch_size']}) "
              f"over {a.muon_iters} steps, embeddings and gains AdamW 1e-3; warmup {a.warmup_iters}, cosine to 10%; "
              f"evaluation every {a.eval_every} steps on {a.eval_batches} fixed validation batches"
              + ("" if with_torch else "; PyTorch left out (--no-torch)" if a.no_torch else
                 "; PyTorch not installed (pip install torch): left out")
              + (f"; Llama (n_kv_head {a.n_kv_head or recipe['n_head']}): AdamW lr {a.llama_lr:g} over "
                 f"{specs['Llama AdamW']['max_iters']} steps, Muon lr {specs['Llama Muon']['muon_lr']:g} over "
                 f"{specs['Llama Muon']['max_iters']} steps" if a.also_llama else ""))
        rows = time_to_loss(a.time_to_loss, specs, a.eval_every)
        print_time_to_loss(rows, a.time_to_loss)
    return 0


if __name__ == "__main__":
    sys.exit(main())
