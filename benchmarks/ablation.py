"""The Llama one change at a time: GPT-2 with each of the Llama's changes alone, trained at equal steps.

A model composed from core's own layers (tinylm/core/layers.py) whose parts switch one at a time:

    positions  learned (GPT-2's wpe table)  | rotary (q and k turned by the position, no table)
    norm       layer (LayerNorm)            | rms (RMSNorm)
    mlp        gelu (4C, two matrices)      | swiglu (F = core.llama.default_ffn_hidden(C), three matrices)
    tied       true (head = wte)            | false (a V×C head of its own)
    n_kv_head  n_head (multi-head)          | fewer: each K/V head shared by n_head/n_kv_head query heads

With every switch at GPT-2's setting it is core/gpt2.py (bias off), at the Llama's core/llama.py: the tests hold
its loss and gradients equal to both (tests/test_ablation.py). It stays here, out of core, which keeps the two
clean models. One layer comes from the fast path instead, GELU (GELU_NOTE). Parameters under plain names: wte, wpe, h{i}.norm1, h{i}.q/k/v/o, h{i}.norm2, h{i}.fc/proj
(GELU) or h{i}.gate/up/down (SwiGLU), norm_f, head (untied).

    python -m benchmarks.ablation --jobs 2        # the table: every variant, 2000 steps, 2 seeds (about half an hour)
    python -m benchmarks.ablation --quick         # tiny sizes, a few seconds: checks that it runs
"""
import argparse
import concurrent.futures
import json
import math
import os
import time
import zlib

import numpy as np

from benchmarks.common import machine_line
from tinylm.core import layers as L
from tinylm.core.llama import default_ffn_hidden
from tinylm.fast import layers as FL
from tinylm.core.optim import adamw_init, adamw_step, clip_factor, global_norm, learning_rate_at
from tinylm.fast.parallel import blas_threads
from tinylm.text.data import DEFAULT_DATA, get_batch, load_ids, train_val_split

GELU_NOTE = """GELU is tinylm/fast/layers.py's, the same function as core's (tests hold them equal in float64): core's
x ** 3 is a float32 power, element by element, that took 55% of this model's step at the recipe's sizes."""
GPT2 = {"positions": "learned", "norm": "layer", "mlp": "gelu", "tied": True, "n_kv_head": None}
LLAMA = {"positions": "rotary", "norm": "rms", "mlp": "swiglu", "tied": False, "n_kv_head": 2}
SINGLE_CHANGES = ("positions", "norm", "mlp", "tied", "n_kv_head")
LABELS = {"positions": "+ rotary positions", "norm": "+ RMSNorm", "mlp": "+ SwiGLU", "tied": "+ untied head",
          "n_kv_head": "+ 2 K/V heads"}
RECIPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12}   # nanoGPT's CPU recipe
QUICK = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16, "batch_size": 4}


def variants(n_kv_head=2):
    """[(label, switches)]: GPT-2, GPT-2 with each change alone, the Llama (all five)."""
    llama = dict(LLAMA, n_kv_head=n_kv_head)
    rows = [("GPT-2", dict(GPT2))]
    rows += [(LABELS[k].replace("2 K/V", f"{n_kv_head} K/V"), dict(GPT2, **{k: llama[k]})) for k in SINGLE_CHANGES]
    return rows + [("Llama (all five)", llama)]


# ----------------------------------------------------------------------------- the model


def shapes(cfg, sw):
    """Every parameter name -> shape.   cfg: n_layer, n_head, n_embd, block_size, vocab_size; sw: the switches"""
    C, V, H = cfg["n_embd"], cfg["vocab_size"], cfg["n_head"]
    D, Hkv = C // H, sw["n_kv_head"] or H
    F = 4 * C if sw["mlp"] == "gelu" else default_ffn_hidden(C)
    out = {"wte": (V, C)}
    if sw["positions"] == "learned":
        out["wpe"] = (cfg["block_size"], C)
    for i in range(cfg["n_layer"]):
        p = f"h{i}."
        out.update({p + "norm1": (C,), p + "q": (H * D, C), p + "k": (Hkv * D, C), p + "v": (Hkv * D, C),
                    p + "o": (C, H * D), p + "norm2": (C,)})
        names = ("fc", "proj") if sw["mlp"] == "gelu" else ("gate", "up", "down")
        out.update({p + n: ((C, F) if n in ("proj", "down") else (F, C)) for n in names})
    out["norm_f"] = (C,)
    if not sw["tied"]:
        out["head"] = (V, C)
    return out


def init(cfg, sw, seed, dtype=np.float32):
    """GPT-2's init as core's: N(0, 0.02), o/proj/down N(0, 0.02/√(2 n_layer)), norm gains 1. Each array from its
    own seed (seed, name), so a parameter two variants share starts the same in both."""
    params = {}
    for name, shape in shapes(cfg, sw).items():
        if len(shape) == 1:
            params[name] = np.ones(shape, dtype)
            continue
        std = 0.02 / math.sqrt(2 * cfg["n_layer"]) if name.endswith((".o", ".proj", ".down")) else 0.02
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        params[name] = (rng.standard_normal(shape) * std).astype(dtype)
    return params


def norm_forward(sw, x, w):
    return L.layernorm_forward(x, w) if sw["norm"] == "layer" else L.rmsnorm_forward(x, w)


def norm_backward(sw, dy, cache):
    return (L.layernorm_backward if sw["norm"] == "layer" else L.rmsnorm_backward)(dy, cache)


def block_forward(P, cfg, sw, p, x):
    """x + attn(norm1(x)), then that + mlp(norm2(that)), as the switches say.   x (B,T,C) -> (B,T,C)"""
    c, H, positions = {}, cfg["n_head"], np.arange(x.shape[1])
    Hkv = sw["n_kv_head"] or H
    h, c["norm1"] = norm_forward(sw, x, P[p + "norm1"])
    (q, c["q"]), (k, c["k"]), (v, c["v"]) = (L.linear_forward(h, P[p + n]) for n in "qkv")
    q, k, v = L.split_heads(q, H), L.split_heads(k, Hkv), L.split_heads(v, Hkv)
    if sw["positions"] == "rotary":
        (q, c["rope_q"]), (k, c["rope_k"]) = L.rope_forward(q, positions), L.rope_forward(k, positions)
    a, c["attn"] = L.grouped_attention_forward(q, k, v)       # K/V heads shared G = H/Hkv ways (G = 1: GPT-2's)
    a, c["o"] = L.linear_forward(L.merge_heads(a), P[p + "o"])
    x = x + a
    h, c["norm2"] = norm_forward(sw, x, P[p + "norm2"])
    if sw["mlp"] == "gelu":
        f, c["fc"] = L.linear_forward(h, P[p + "fc"])
        m, c["act"] = FL.gelu_forward(f)        # the fast path's GELU: see GELU_NOTE
        m, c["out"] = L.linear_forward(m, P[p + "proj"])
    else:
        (g, c["gate"]), (u, c["up"]) = L.linear_forward(h, P[p + "gate"]), L.linear_forward(h, P[p + "up"])
        m, c["act"] = L.swiglu_forward(g, u)
        m, c["out"] = L.linear_forward(m, P[p + "down"])
    return x + m, c


def block_backward(dx, cfg, sw, p, c):
    """block_forward in reverse.   dx (B,T,C) -> (dx, the block's grads by name)"""
    grads = {}

    def back(key, dy, name=None, layer_backward=L.linear_backward):
        d, g = layer_backward(dy, c[key])
        grads[p + (name or key)] = g["W"] if "W" in g else g["w"]
        return d

    if sw["mlp"] == "gelu":
        dh = back("fc", FL.gelu_backward(back("out", dx, "proj"), c["act"]))
    else:
        dg, du = L.swiglu_backward(back("out", dx, "down"), c["act"])
        dh = back("gate", dg) + back("up", du)
    dx = dx + back("norm2", dh, layer_backward=lambda d, cache: norm_backward(sw, d, cache))
    da = L.split_heads(back("o", dx), cfg["n_head"])
    dq, dk, dv = L.grouped_attention_backward(da, c["attn"])
    if sw["positions"] == "rotary":
        dq, dk = L.rope_backward(dq, c["rope_q"]), L.rope_backward(dk, c["rope_k"])
    dh = back("q", L.merge_heads(dq)) + back("k", L.merge_heads(dk)) + back("v", L.merge_heads(dv))
    return dx + back("norm1", dh, layer_backward=lambda d, cache: norm_backward(sw, d, cache)), grads


def forward(P, cfg, sw, idx, targets):
    """The mean cross-entropy of the variant sw on idx (B,T) against targets (B,T).   -> (loss, cache)"""
    cache = {"blocks": []}
    x, cache["emb"] = L.embedding_forward(idx, P["wte"], P.get("wpe"))
    for i in range(cfg["n_layer"]):
        x, c = block_forward(P, cfg, sw, f"h{i}.", x)
        cache["blocks"].append(c)
    x, cache["norm_f"] = norm_forward(sw, x, P["norm_f"])
    logits, cache["head"] = L.linear_forward(x, P["wte"] if sw["tied"] else P["head"])
    loss, cache["loss"] = L.cross_entropy_forward(logits, targets)
    return loss, cache


def backward(P, cfg, sw, cache):
    """Gradients of forward's loss: a dict with P's keys and shapes."""
    dx, g = L.linear_backward(L.cross_entropy_backward(1.0, cache["loss"]), cache["head"])
    grads = {"wte" if sw["tied"] else "head": g["W"]}
    dx, g = norm_backward(sw, dx, cache["norm_f"])
    grads["norm_f"] = g["w"]
    for i in reversed(range(cfg["n_layer"])):
        dx, g = block_backward(dx, cfg, sw, f"h{i}.", cache["blocks"][i])
        grads.update(g)
    g = L.embedding_backward(dx, cache["emb"])
    grads["wte"] = grads.get("wte", 0) + g["wte"]           # tied: the head's part and the embedding's add
    if "wpe" in g:
        grads["wpe"] = g["wpe"]
    return {k: grads[k] for k in P}


# ----------------------------------------------------------------------------- training at equal steps


def train_one(job):
    """Train one variant for `iters` AdamW steps (train.py's defaults) on the shared batches; -> its val loss."""
    cfg, sw, seed, lr, iters, eval_batches, data = (job[k] for k in
                                                    ("cfg", "sw", "seed", "lr", "iters", "eval_batches", "data"))
    train_ids, val_ids = train_val_split(load_ids(data)[1])
    T, B = cfg["block_size"], cfg["batch_size"]
    params = init(cfg, sw, seed)
    opt, batch_rng, t0 = adamw_init(params), np.random.default_rng(seed), time.perf_counter()
    warmup = min(100, iters // 20)
    with blas_threads(1), np.errstate(over="ignore", invalid="ignore"):
        for step in range(iters):
            x, y = get_batch(train_ids, T, B, batch_rng)
            loss, cache = forward(params, cfg, sw, x, y)
            grads = backward(params, cfg, sw, cache)
            norm = global_norm(grads)
            if not math.isfinite(loss + norm):
                return dict(job, val=math.nan, seconds=time.perf_counter() - t0)
            adamw_step(params, grads, opt, learning_rate_at(step, lr, lr / 10, warmup, iters), 0.9, 0.99,
                       weight_decay=0.1, grad_scale=clip_factor(norm, 1.0))
        val_rng = np.random.default_rng([seed, 1])               # the same validation batches for every variant
        val = np.mean([forward(params, cfg, sw, *get_batch(val_ids, T, B, val_rng))[0] for _ in range(eval_batches)])
    return dict(job, val=float(val), seconds=time.perf_counter() - t0)


def count(cfg, sw):
    return sum(math.prod(s) for s in shapes(cfg, sw).values())


def run_all(jobs, workers, results_file=None, run=True):
    """Every job's result, in the jobs' order; each printed as it ends (with --jobs, in processes of their own).
    With results_file (JSON lines), a job found there is not run again, and each new result is appended.
    run=False runs nothing: the results found, None for the others."""
    done = {}
    if results_file and os.path.exists(results_file):
        with open(results_file) as f:
            done = {key(r): r for r in map(json.loads, f)}
    todo = [j for j in jobs if key(j) not in done] if run else []

    def keep(r):
        done[key(r)] = show(r)
        if results_file:
            with open(results_file, "a") as f:
                f.write(json.dumps(r) + "\n")

    if workers <= 1:
        for j in todo:
            keep(train_one(j))
    else:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            for f in concurrent.futures.as_completed([pool.submit(train_one, j) for j in todo]):
                keep(f.result())
    return [done.get(key(j)) for j in jobs]


def key(job):
    """What makes two runs the same run."""
    return json.dumps([job[k] for k in ("sw", "cfg", "seed", "lr", "iters", "eval_batches", "data")], sort_keys=True)


def show(r):
    print(f"  {r['label']:<20} seed {r['seed']} lr {r['lr']:g}: val {r['val']:.4f} ({r['seconds']:.0f} s)", flush=True)
    return r


def table(results, rows, cfg, seeds):
    """The table: variant, lr, parameters, val loss per seed, mean, and Δ vs GPT-2: the mean over the seeds of the
    variant's loss minus GPT-2's on the same seed (a run not made shows as —, and leaves its seed out)."""
    val = {(r["label"], r["seed"]): r["val"] for r in results if r}
    lrs = {r["label"]: r["lr"] for r in results if r}
    lines = ["| variant | lr | parameters | " + " | ".join(f"val (seed {s})" for s in seeds) + " | mean | Δ vs GPT-2 |",
             "|---|---:|---:|" + "---:|" * (len(seeds) + 2)]
    for label, sw in rows:
        mine = [val.get((label, s)) for s in seeds]
        paired = [v - val["GPT-2", s] for v, s in zip(mine, seeds) if v is not None and ("GPT-2", s) in val]
        done = [v for v in mine if v is not None]
        lr = f"{lrs[label]:g}" if label in lrs else "—"
        lines.append(f"| {label} | {lr} | {count(cfg, sw):,} | "
                     + " | ".join("—" if v is None else f"{v:.4f}" for v in mine)
                     + (f" | {np.mean(done):.4f}" if done else " | —")
                     + (f" | {np.mean(paired):+.4f} |" if paired else " | — |"))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ablation", description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=2000, help="AdamW steps per run (default 2000, train.py's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338], help="seeds (init and batches)")
    ap.add_argument("--lr", type=float, default=4e-3, help="peak learning rate of GPT-2 and its single changes "
                    "(default 4e-3: GPT-2's best of 1e-3, 2e-3, 4e-3, 8e-3 here, docs/results.md)")
    ap.add_argument("--llama-lr", type=float, default=5e-4, help="peak learning rate of the full Llama (default 5e-4: "
                    "its best of 2.5e-4, 5e-4, 1e-3, 2e-3)")
    ap.add_argument("--n-kv-head", type=int, default=2, help="K/V heads of the fewer-K/V-heads variants (default 2)")
    ap.add_argument("--only", default=None, help="run only the variants whose label holds one of these comma-separated words (e.g. GPT-2,Llama)")
    ap.add_argument("--eval-batches", type=int, default=100, help="validation batches at the end (default 100)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="text file (default: the bundled Tiny Shakespeare)")
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side, each a process on one BLAS thread")
    ap.add_argument("--results", default=None, help="JSON-lines file: runs found there are not run again; new ones "
                    "are appended")
    ap.add_argument("--table-only", action="store_true", help="train nothing: the table of the runs in --results")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 30 steps: checks that it runs")
    a = ap.parse_args(argv)
    cfg = dict(QUICK if a.quick else RECIPE)
    if a.quick:
        a.iters, a.eval_batches, a.seeds = 30, 4, a.seeds[:1]
    cfg["vocab_size"] = load_ids(a.data)[0].vocab_size
    rows = variants(a.n_kv_head)
    if a.only:
        rows = [r for r in rows if any(word in r[0] for word in a.only.split(","))]
    print(machine_line())
    print(f"load average {os.getloadavg()[0]:.2f}; {a.iters} steps, AdamW (betas 0.9, 0.99, weight decay 0.1, "
          f"clip 1.0), warmup {min(100, a.iters // 20)} then cosine to lr/10; sizes {cfg}")
    jobs = [{"label": label, "sw": sw, "cfg": cfg, "seed": s, "iters": a.iters, "eval_batches": a.eval_batches,
             "data": a.data, "lr": a.llama_lr if label.startswith("Llama") else a.lr} for label, sw in rows for s in a.seeds]
    results = run_all(jobs, a.jobs, a.results, run=not a.table_only)
    if any(label == "GPT-2" for label, _ in rows):
        print(table(results, rows, cfg, a.seeds))


if __name__ == "__main__":
    main()
