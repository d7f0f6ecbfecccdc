"""python -m benchmarks.compress_bench [CKPT]: the targets of low-rank compression, measured on a trained model.

    quality   validation loss of the dense model and of the plain-SVD, whitened and whitened + refit models at
              50% and 25% of the blocks' linear parameters (--params), and the time each compression took
    speed     tokens/s sampling with the KV cache (one sequence, and 3 and 10 side by side as sample.py draws
              its --num_samples) and milliseconds per training step (the trainer's threaded
              step and AdamW), dense against whitened at 50%, alternated in this one process (A B A B …), medians
    memory    peak bytes NumPy allocated while compressing (tracemalloc) against one layer's calibration inputs

CKPT defaults to out/ckpt.npz, the model `python train.py` makes in a few minutes. Figures move with the
load of the machine: compare the ratios, which are measured side by side.
"""
import argparse
import os
import sys
import time
import tracemalloc

import numpy as np

from tinylm.fast import model as M
from tinylm.core import gpt2 as G
from tinylm.fast import decode as D
from tinylm.cli.compress import validation_loss
from tinylm.lowrank.compress import DEFAULT_CALIB_TOKENS, calibration_ids, calibration_windows, compress_model, ranks_for
from tinylm.errors import TinyLMError
from tinylm.core.optim import adamw_init
from tinylm.fast.optim import adamw_step
from tinylm.fast.parallel import blas_threads
from tinylm.cli.common import OneLineParser, run_cli
from tinylm.io.hf import load_any

EVAL_TOKENS = 65536


def quality(ckpt, calib, fractions=(0.5, 0.25), methods=(("svd", False), ("whitened", False), ("whitened", True)),
            eval_tokens=EVAL_TOKENS):
    """Rows {fraction, method, refit, loss, rise, seconds} and the dense loss, on eval_tokens validation tokens."""
    params, config, tok, meta = ckpt["params"], ckpt["config"], ckpt["tokenizer"], ckpt["meta"]
    base = validation_loss(params, config, tok, meta, eval_tokens)
    rows = []
    for p in fractions:
        ranks = ranks_for(config, params_fraction=p)
        for method, refit in methods:
            t = time.perf_counter()
            new, info = compress_model(params, config, ranks, method, calib, refit)
            seconds = time.perf_counter() - t
            loss = validation_loss(new, config, tok, meta, eval_tokens)
            rows.append({"fraction": p, "kept": info["kept"] / info["dense"], "method": method, "refit": refit,
                         "loss": loss, "rise": (loss - base) / base, "seconds": seconds})
    return base, rows


def alternate(fns, rounds):
    """Each fn run once per round, in turn (A B A B …): {name: [seconds]}."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def speed(models, config, rounds=7, tokens=512, batch_size=12, seed=0, rows=(3, 10)):
    """{name: ([sampling tokens/s of one sequence, then of each count in `rows` side by side], training ms/step)},
    each the median of `rounds` alternated runs. sample.py draws its --num_samples side by side (3 by default;
    nanoGPT's sample.py draws 10)."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, config.vocab_size, size=config.block_size // 2)
    greedy = lambda logits: int(np.argmax(logits))

    def sampler(params, n):
        def one():
            for _ in D.generate(params, config, prompt, tokens, greedy):
                pass

        def side_by_side():
            for _ in D.generate_rows(params, config, prompt, n, tokens, lambda z: np.argmax(z, axis=1)):
                pass
        return one if n == 1 else side_by_side
    counts = (1, *rows)
    with blas_threads(1):                                    # as sample.py decodes
        samplers = {(name, n): sampler(p, n) for name, p in models.items() for n in counts}
        alternate(samplers, 1)                               # warm-up
        sampling = alternate(samplers, rounds)
    x = rng.integers(0, config.vocab_size, size=(batch_size, config.block_size))
    y = rng.integers(0, config.vocab_size, size=(batch_size, config.block_size))

    def stepper(params):
        params = {k: v.copy() for k, v in params.items()}
        opt = adamw_init(params)

        def run():                                           # the trainer's step: threaded halves, then AdamW
            _, grads = M.loss_and_grads_parallel(params, config, x, y)
            adamw_step(params, grads, opt, 1e-4)
        return run
    steppers = {name: stepper(p) for name, p in models.items()}
    alternate(steppers, 3)
    training = alternate(steppers, rounds * 5)
    return {name: ([n * tokens / float(np.median(sampling[name, n])) for n in counts],
                   1e3 * float(np.median(training[name]))) for name in models}


def memory(ckpt, calib):
    """{"whitened", "whitened + refit": peak bytes NumPy allocated while compressing (tracemalloc), "layer": bytes of
    the largest layer's inputs (the MLP projection's, N × 4C), "all": bytes of every layer's inputs at once (N × 7C a block)}."""
    config = ckpt["config"]
    ranks = ranks_for(config, params_fraction=0.5)
    out = {}
    for refit in (False, True):
        tracemalloc.start()
        compress_model(ckpt["params"], config, ranks, "whitened", calib, refit_factors=refit)
        out["whitened + refit" if refit else "whitened"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    itemsize = ckpt["params"]["transformer.wte.weight"].itemsize
    out["layer"] = calib.size * 4 * config.n_embd * itemsize
    out["all"] = calib.size * 7 * config.n_embd * config.n_layer * itemsize
    return out


def main(argv=None):
    ap = OneLineParser(prog="python -m benchmarks.compress_bench", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", nargs="?", default=os.path.join("out", "ckpt.npz"), help="a trained dense checkpoint")
    ap.add_argument("--rounds", type=int, default=7, help="alternated rounds of the speed figures")
    ap.add_argument("--quick", action="store_true", help="few tokens and rounds (a smoke test, not a measurement)")

    def run(argv):
        a = ap.parse_args(argv)
        if not os.path.exists(a.checkpoint):
            raise TinyLMError(f"checkpoint not found: {a.checkpoint} (train the default model with: python train.py)")
        ckpt = load_any(a.checkpoint)
        config = ckpt["config"]
        print(f"model: {a.checkpoint}, {G.count_params(config):,} parameters (L{config.n_layer} C{config.n_embd} "
              f"T{config.block_size}); load average {os.getloadavg()[0]:.1f}")
        t = time.perf_counter()
        ids, path = calibration_ids(ckpt["tokenizer"], ckpt["meta"])
        calib = calibration_windows(ids, config.block_size, 2048 if a.quick else DEFAULT_CALIB_TOKENS)
        calib_read = time.perf_counter() - t
        eval_tokens = 4096 if a.quick else EVAL_TOKENS
        base, rows = quality(ckpt, calib, eval_tokens=eval_tokens)
        print(f"\nquality: validation loss on {eval_tokens:,} tokens; dense {base:.4f}; calibration {calib.size:,} "
              f"tokens of {os.path.basename(path)} (read and encoded in {calib_read:.2f} s, not counted below)")
        print(f"{'params':>7}  {'method':<28}{'loss':>8}{'rise':>9}{'time s':>8}")
        for r in rows:
            name = {("whitened", True): "whitened + refit (default)",
                    ("whitened", False): "whitened, --refit false"}.get((r["method"], r["refit"]), r["method"])
            print(f"{100 * r['kept']:6.1f}%  {name:<28}{r['loss']:8.4f}{100 * r['rise']:+8.2f}%{r['seconds']:8.2f}")
        pick = {(r["fraction"], r["method"], r["refit"]): r for r in rows}
        half_svd, half_w = pick[(0.5, "svd", False)]["rise"], pick[(0.5, "whitened", False)]["rise"]
        print(f"target: at 50%, whitened rise <= 1/2 plain SVD's: {100 * half_w:.2f}% vs {100 * half_svd:.2f}% "
              f"(ratio {half_w / half_svd:.2f}): {'met' if half_w <= 0.5 * half_svd else 'NOT met'}")
        for refit in (False, True):
            q = pick[(0.25, "whitened", refit)]["rise"]
            label = "whitened + refit (the default)" if refit else "whitened without refit"
            print(f"target: at 25%, {label} within 5% of dense: {100 * q:+.2f}%: "
                  f"{'met' if q <= 0.05 else 'NOT met'}")
        secs = [r["seconds"] for r in rows if r["method"] == "whitened"]
        print(f"target: compression under 10 s (calibration included): whitened {min(secs):.2f}-{max(secs):.2f} s "
              f"(with and without refit)")

        compressed, _ = compress_model(ckpt["params"], config, ranks_for(config, params_fraction=0.5), "whitened", calib)
        rounds = 2 if a.quick else a.rounds
        tokens = 64 if a.quick else 512
        s = speed({"dense": ckpt["params"], "whitened 50%": compressed}, config, rounds, tokens)
        print(f"\nspeed, {rounds} alternated rounds, medians (sampling {tokens} tokens a sequence with the KV cache, one "
              f"BLAS thread: one sequence, and 3 and 10 side by side as sample.py draws --num_samples; training: the "
              f"trainer's threaded step + AdamW, batch 12×{config.block_size}, {rounds * 5} rounds)")
        print(f"  {'':<14}{'one sequence':>15}{'3 side by side':>18}{'10 side by side':>18}{'training':>14}")
        for name, (tps, ms) in s.items():
            print(f"  {name:<14}" + "".join(f"{v:>8.0f} tokens/s" + " " * 3 for v in tps) + f"{ms:>5.2f} ms/step")
        (d_tps, d_ms), (c_tps, c_ms) = s["dense"], s["whitened 50%"]
        one, three, ten = (c / d for c, d in zip(c_tps, d_tps))
        print(f"target: sampling >= 1.3x dense: {one:.2f}x for one sequence, {three:.2f}x with 3 side by side "
              f"(sample.py's default), {ten:.2f}x with 10; training step >= 1.2x faster: {d_ms / c_ms:.2f}x")

        mem = {k: v / 2**20 for k, v in memory(ckpt, calib).items()}
        print(f"\nmemory (tracemalloc peaks while compressing): whitened {mem['whitened']:.1f} MiB, whitened + refit "
              f"{mem['whitened + refit']:.1f} MiB (two models side by side); the largest layer's calibration inputs "
              f"{mem['layer']:.1f} MiB, every layer's at once {mem['all']:.0f} MiB")
        return 0
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
