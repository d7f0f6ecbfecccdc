"""Whole processes as a user runs them: tinylm's Llama with Muon against nanoGPT's README CPU command, alternated.

Each round runs (A) tinylm's pick, `python train.py --arch llama --n_kv_head 2 --optimizer muon --batch_size 20
--max_iters N --eval_interval N --sample_tokens 0` (and each --also-iters pick), then (B) nanoGPT's README command
for a CPU (`python train.py config/train_shakespeare_char.py --device=cpu --compile=False ...`) in a nanoGPT
checkout. Each is timed from its process's start to its exit: interpreter, imports, data, training, evaluations and
saving, as the user waits for it. After each run the saved model is evaluated on one fixed set, the same for both:
200 batches of 12 windows of 64 characters drawn with np.random.default_rng(0) from the last 10% of the bundled
Tiny Shakespeare, character ids by sorted characters (nanoGPT's prepare.py numbers them the same way). The table
gives the seconds, the run's own last validation loss (as it printed it) and the loss on the fixed set.

The nanoGPT checkout (--nanogpt DIR) is the user's to prepare, and it needs `pip install torch`:

    git clone https://github.com/karpathy/nanoGPT DIR
    cp tinylm/data/tinyshakespeare.txt DIR/data/shakespeare_char/input.txt
    (cd DIR && python data/shakespeare_char/prepare.py)

    python -m benchmarks.whole_process --nanogpt DIR       # 3 rounds, about 8 min on 2 cores
    python -m benchmarks.whole_process --quick             # tinylm's side, 4 steps: checks that it runs
"""
import argparse
import importlib.util
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import machine_line
from tinylm.fast.arch import fast_model
from tinylm.io.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(ROOT, "tinylm", "data", "tinyshakespeare.txt")
BATCHES, BATCH, T = 200, 12, 64                       # the fixed set: 200 batches of 12 windows of 64
NANOGPT_ITERS = 2000
NANOGPT_ARGS = ["train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
                f"--max_iters={NANOGPT_ITERS}", f"--lr_decay_iters={NANOGPT_ITERS}", "--dropout=0.0"]
NANOGPT_OUT = "out-shakespeare-char"


def tinylm_args(iters, out_dir):
    return ["train.py", "--arch", "llama", "--n_kv_head", "2", "--optimizer", "muon", "--batch_size", "20",
            "--max_iters", str(iters), "--eval_interval", str(iters), "--sample_tokens", "0", "--out_dir", out_dir]


# ----------------------------------------------------------------------------- the fixed validation set


def fixed_set(batches=BATCHES):
    """(X, Y, chars): the first `batches` of the 200 fixed batches, each (12, 64) int64 ids."""
    with open(TEXT, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.int64)
    val = ids[int(0.9 * len(ids)):]
    starts = np.random.default_rng(0).integers(0, len(val) - T - 1, size=(BATCHES, BATCH))[:batches]
    windows = starts[..., None] + np.arange(T)
    return val[windows], val[windows + 1], chars


def tinylm_fixed_loss(path, X, Y, chars):
    """Mean loss of best.npz over the fixed batches, by the fast path's forward."""
    ckpt = load_checkpoint(path)
    params, config, tok = ckpt["params"], ckpt["config"], ckpt["tokenizer"]
    if [tok.decode([i]) for i in range(len(chars))] != chars:
        raise SystemExit(f"{path}: its characters are not the sorted characters of {TEXT}")
    forward = fast_model(config).forward
    return float(np.mean([forward(params, config, x, y, for_backward=False)[1] for x, y in zip(X, Y)]))


def nanogpt_model(checkout):
    """nanoGPT's model.py from the checkout, as a module (it imports torch)."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", os.path.join(checkout, "model.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def nanogpt_fixed_loss(checkout, X, Y):
    """Mean loss of nanoGPT's saved model over the fixed batches, in PyTorch."""
    import torch                                      # optional dependency: only the nanoGPT side needs it
    model_py = nanogpt_model(checkout)
    # ckpt.pt is nanoGPT's own pickle file, written a moment ago by the run in the checkout the user made
    ckpt = torch.load(os.path.join(checkout, NANOGPT_OUT, "ckpt.pt"), map_location="cpu")
    model = model_py.GPT(model_py.GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    with torch.no_grad():
        return float(np.mean([model(torch.from_numpy(x), torch.from_numpy(y))[1].item() for x, y in zip(X, Y)]))


# ----------------------------------------------------------------------------- one run


def timed(args, cwd, log):
    """Seconds from the process's start to its exit; its output (stdout and stderr) goes to `log`."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run([sys.executable] + args, cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t0
    if code != 0:
        with open(log, errors="replace") as f:
            tail = f.read().replace("\r", "\n").splitlines()[-15:]
        raise SystemExit(f"{' '.join(args)} (in {cwd}) exited with {code}:\n" + "\n".join(tail))
    return seconds


def own_loss(log, pattern):
    """The last validation loss the run printed, by `pattern`'s group (nan if it printed none)."""
    with open(log, errors="replace") as f:
        found = re.findall(pattern, f.read().replace("\r", "\n"), re.M)
    return float(found[-1]) if found else float("nan")


def run_tinylm(iters, tmp, X, Y, chars):
    out_dir = os.path.join(tmp, f"tinylm-{iters}")
    shutil.rmtree(out_dir, ignore_errors=True)
    log, load = out_dir + ".log", os.getloadavg()[0]
    seconds = timed(tinylm_args(iters, out_dir), ROOT, log)
    return {"name": f"tinylm {iters} steps", "seconds": seconds, "load": load,
            "own": own_loss(log, r"^done: .*best val loss ([\d.]+)"),
            "fixed": tinylm_fixed_loss(os.path.join(out_dir, "best.npz"), X, Y, chars)}


def run_nanogpt(checkout, tmp, X, Y):
    shutil.rmtree(os.path.join(checkout, NANOGPT_OUT), ignore_errors=True)
    log, load = os.path.join(tmp, "nanogpt.log"), os.getloadavg()[0]
    seconds = timed(NANOGPT_ARGS, checkout, log)
    return {"name": f"nanoGPT {NANOGPT_ITERS} steps", "seconds": seconds, "load": load,
            "own": own_loss(log, rf"^step {NANOGPT_ITERS}: train loss [\d.]+, val loss ([\d.]+)"),
            "fixed": nanogpt_fixed_loss(checkout, X, Y)}


# ----------------------------------------------------------------------------- the tables


HEADER = f"{'round':<7}{'run':<22}{'seconds':>9}{'own val loss':>14}{'fixed val loss':>16}{'load before':>13}"


def row_line(r, label):
    return (f"{label:<7}{r['name']:<22}{r['seconds']:>9.1f}{r['own']:>14.4f}{r['fixed']:>16.4f}"
            f"{r['load']:>13.2f}")


def medians(rounds):
    """One row a run: the median of each column over the rounds."""
    out = []
    for i, first in enumerate(rounds[0]):
        column = [runs[i] for runs in rounds]
        out.append(dict(name=first["name"], **{k: statistics.median(r[k] for r in column)
                                               for k in ("seconds", "own", "fixed", "load")}))
    return out


def ratios(rounds, med):
    """nanoGPT ÷ each tinylm pick: seconds, round by round and by medians."""
    lines = []
    for i, pick in enumerate(med[:-1]):
        per_round = ", ".join(f"{r[-1]['seconds'] / r[i]['seconds']:.2f}" for r in rounds)
        lines.append(f"nanoGPT ÷ {pick['name']}, seconds: rounds {per_round}; "
                     f"medians {med[-1]['seconds'] / pick['seconds']:.2f}")
    return lines


def report(rounds, nanogpt):
    print("\n" + HEADER)
    for n, runs in enumerate(rounds, 1):
        for r in runs:
            print(row_line(r, str(n)))
    med = medians(rounds)
    print(f"\nmedians over {len(rounds)} round{'s' * (len(rounds) > 1)}:\n{HEADER}")
    for r in med:
        print(row_line(r, "med"))
    if nanogpt:
        print("\n" + "\n".join(ratios(rounds, med)))


def check_checkout(checkout):
    """Fail before the first run, not after minutes, when the checkout or torch is missing."""
    needed = ["train.py", "model.py", "config/train_shakespeare_char.py", "data/shakespeare_char/train.bin"]
    missing = [p for p in needed if not os.path.exists(os.path.join(checkout, p))]
    if missing:
        raise SystemExit(f"{checkout}: not a prepared nanoGPT checkout (missing {', '.join(missing)}); see --help")
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("--nanogpt needs PyTorch: pip install torch")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.whole_process", description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=300, help="tinylm's steps, its --max_iters and --eval_interval "
                    "(default 300)")
    ap.add_argument("--also-iters", type=int, action="append", default=[], metavar="N",
                    help="another tinylm pick, run each round after the first (repeat for more)")
    ap.add_argument("--nanogpt", default=None, metavar="DIR", help="a prepared nanoGPT checkout (below); without it, "
                    "tinylm's side alone")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each every run once (default 3)")
    ap.add_argument("--quick", action="store_true", help="tinylm's side, 4 steps, 1 round, the fixed set's first "
                    "4 batches: checks that it runs")
    a = ap.parse_args(argv)
    batches = BATCHES
    if a.quick:
        a.iters, a.also_iters, a.rounds, a.nanogpt, batches = 4, [], 1, None, 4
    if a.nanogpt:
        check_checkout(a.nanogpt)
    print(machine_line())
    print(f"load average {os.getloadavg()[0]:.2f}; {a.rounds} round{'s' * (a.rounds > 1)}; the fixed set: {batches} "
          f"batches of {BATCH}×{T} from the last 10% of {os.path.relpath(TEXT, ROOT)} (np.random.default_rng(0))")
    picks = [a.iters] + a.also_iters
    print("A: python " + " ".join(tinylm_args("N", "DIR")) + f" for N = {', '.join(map(str, picks))}")
    print(f"B: python {' '.join(NANOGPT_ARGS)} in {a.nanogpt}" if a.nanogpt else
          "B: no --nanogpt DIR given: tinylm's side alone, no nanoGPT run and no ratio")
    X, Y, chars = fixed_set(batches)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="whole_process_") as tmp:
        for n in range(1, a.rounds + 1):
            runs = [run_tinylm(iters, tmp, X, Y, chars) for iters in picks]
            if a.nanogpt:
                runs.append(run_nanogpt(a.nanogpt, tmp, X, Y))
            print(f"round {n}: " + "; ".join(f"{r['name']} {r['seconds']:.1f} s" for r in runs), flush=True)
            rounds.append(runs)
    report(rounds, a.nanogpt)
    return 0

if __name__ == "__main__":
    sys.exit(main())
