"""analyze.py: measure what a checkpoint's weights learned; a table in the terminal, optionally an HTML report."""
import argparse
import os
import sys
import time


from tinylm.cli.common import OneLineParser, run_cli
from tinylm.errors import TinyLMError
from tinylm.io.hf import CONFIG_FILE, load_any
from tinylm.core.arch import model_of
from tinylm.analysis import report as R
from tinylm.analysis import scale
from tinylm.analysis.circuits import analyze_circuits
from tinylm.analysis.compare import COMPARE_HEADER, compare_rows, compare_summary, compare_weights
from tinylm.analysis.embeddings import analyze_embeddings
from tinylm.analysis.hessian import analyze_curvature
from tinylm.analysis.interventions import ABLATION_HEADER, ablation_rows, ablation_table, parse_heads
from tinylm.analysis.lowrank import DEFAULT_FRACTIONS, lowrank_samples, rank_sweep
from tinylm.analysis.poster import PLOT_HINT, make_poster
from tinylm.analysis.probes import analyze_probes
from tinylm.analysis.textdata import fixed_windows, resolve_data_path, validation_ids
from tinylm.analysis.tracking import read_jsonl
from tinylm.analysis.weight_spectra import analyze_spectra, init_like
from tinylm.lowrank.compress import DEFAULT_CALIB_TOKENS, calibration_ids, calibration_windows
from tinylm.lowrank.factorized import dense_params, ranks_of

DEFAULT_SECTIONS = ("spectra", "circuits", "embeddings", "probes", "lowrank", "training")
DEFAULT_PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"


def analyze_parser():
    ap = OneLineParser(prog="analyze.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       epilog="Flags take hyphens or underscores (--compare-init or --compare_init).",
                       description="Measure what a trained tinylm model learned: weight spectra (SVD, power-law ESD fits), "
                       "attention circuits, embedding geometry, least-squares probes, low-rank compression, Hessian "
                       "curvature, training curves, and head ablation (--ablate). Prints a per-matrix table; --report also writes HTML and JSON.")
    ap.add_argument("checkpoint", help="a checkpoint file (e.g. out/ckpt.npz), a folder holding ckpt.npz, or a GPT-2 "
                    "folder in the Hugging Face layout (config.json + model.safetensors + vocab.json/merges.txt)")
    ap.add_argument("--report", metavar="DIR", help="write DIR/index.html (self-contained, figures need matplotlib) and DIR/metrics.json")
    ap.add_argument("--only", metavar="LIST", default=",".join(DEFAULT_SECTIONS),
                    help="comma-separated sections from: " + ", ".join(R.SECTION_NAMES) + ", or 'all'. "
                    "curvature (Hessian eigenvalues by Lanczos, the slow one: up to a minute) and ablation (a forward pass per "
                    "head; see --ablate) are left out unless named")
    ap.add_argument("--poster", metavar="FILE",
                    help="draw the seven concepts of the linear algebra, one panel each from this model, into one PNG "
                    "(needs matplotlib); alone it draws only the poster, with --report or --only the sections run too")
    ap.add_argument("--compare-init", "--compare_init", action="store_true",
                    help="also analyse the same model at initialization (the run's seed) and show it beside the trained one")
    ap.add_argument("--compare", metavar="BASE",
                    help="a base checkpoint (or GPT-2 folder) this one was fine-tuned from: which singular values and "
                    "directions of each matrix moved, principal angles between the top-k subspaces, and the rank of "
                    "W_tuned - W_base; alone it runs only this comparison")
    ap.add_argument("--compare-k", "--compare_k", type=int, default=8, help="top singular directions compared")
    ap.add_argument("--ablate", metavar="HEADS",
                    help="switch heads off one at a time and measure the validation loss: L1H1, a list L0H2,L1H3 (each alone, "
                    "then together) or all; a table of the loss change per head (and a layer x head figure with --report); "
                    "alone it runs only the ablation, with --report or --only the sections run too")
    ap.add_argument("--ablate-mode", "--ablate_mode", choices=("zero", "mean"), default="zero",
                    help="replace an ablated head's output (before the output projection, c_proj or o_proj) by zero, or by its mean over the evaluation tokens")
    ap.add_argument("--data", metavar="FILE",
                    help="text to evaluate on; if not given, the validation split of the run's training file "
                    "(or of the bundled Tiny Shakespeare)%(default).0s")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="text whose attention patterns are drawn")
    ap.add_argument("--n-boot", "--n_boot", type=int, default=None, help="bootstrap resamples for alpha's confidence interval (0: none; "
                    f"default {scale.DEFAULT_N_BOOT}, {scale.BIG_N_BOOT} for models over {scale.BIG_MODEL:,} block parameters)")
    ap.add_argument("--eval-seqs", "--eval_seqs", type=int, default=None,
                    help=f"validation windows (of at most {scale.MAX_WINDOW} tokens) for probes and low-rank losses "
                    f"(default {scale.DEFAULT_EVAL_SEQS}; {scale.BIG_EVAL_SEQS} for models over {scale.BIG_MODEL:,} block parameters)")
    ap.add_argument("--hessian-k", "--hessian_k", type=int, default=3, help="number of top Hessian eigenvalues")
    ap.add_argument("--hessian-batch", "--hessian_batch", type=int, default=8, help="sequences in the fixed batch of the Hessian")
    ap.add_argument("--no-progress", "--no_progress", action="store_true", help="hide progress bars")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return ap


def parse_sections(text):
    names = [s.strip() for s in text.split(",") if s.strip()]
    if names == ["all"]:
        return list(R.SECTION_NAMES)
    unknown = [n for n in names if n not in R.SECTION_NAMES]
    if unknown or not names:
        raise TinyLMError(f"unknown --only section(s): {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(R.SECTION_NAMES)} or all")
    return [n for n in R.SECTION_NAMES if n in names]


def checkpoint_path(arg):
    """A folder holding ckpt.npz -> that file; a GPT-2 folder (or its config.json / model.safetensors) -> the folder."""
    if os.path.isdir(arg):
        return arg if os.path.isfile(os.path.join(arg, CONFIG_FILE)) else os.path.join(arg, "ckpt.npz")
    return arg


def run_analysis(ckpt, path, sections, args, log=print):
    """Every requested section on a loaded checkpoint.   -> results dict (NumPy inside; report.to_jsonable for JSON)"""
    params, config, tok, meta = ckpt["params"], ckpt["config"], ckpt["tokenizer"], ckpt["meta"]
    chars = scale.token_labels(tok, config.vocab_size)
    progress = not args.no_progress
    n_seqs = args.eval_seqs or scale.default_eval_seqs(config)
    n_boot = scale.default_n_boot(config) if args.n_boot is None else args.n_boot
    large = scale.is_large_vocab(config)
    init = None
    if args.compare_init:
        init, init_seed = init_like(config, meta)
    results = {"checkpoint": path, "config": config.to_dict(), "step": meta.get("step"),
               "n_params": model_of(config).count_params(config), "sections": sections, "chars": list(chars), "timings_s": {}}
    # The text is needed for the windows, and for a large vocabulary's token subset (its most frequent tokens).
    heads = None
    if "ablation" in sections:        # checked before any work: a head beyond the model is one line
        heads = parse_heads(getattr(args, "ablate", None) or "all", config)
    needs_text = {"circuits", "probes", "lowrank", "curvature", "ablation"} | ({"embeddings"} if large else set())
    if needs_text & set(sections):
        train_args = meta.get("train_args") or {}
        data_path = resolve_data_path(meta, args.data)
        val = validation_ids(tok, data_path, train_args.get("encoding_errors", "strict"))
        window = scale.eval_window(config)
        x, y = fixed_windows(val, window, n_seqs, seed=0)
        results["data"] = data_path
        results["eval"] = {"window": window, "n_windows": n_seqs, "block_size": config.block_size,
                           "big_model": scale.is_big_model(config), "large_vocab": large}
    prompt = args.prompt
    if "circuits" in sections:
        try:
            prompt_idx = tok.encode(prompt)
        except TinyLMError:
            raise TinyLMError("--prompt has characters outside the model's vocabulary") from None
        if len(prompt_idx) == 0:
            raise TinyLMError("--prompt must not be empty")
        prompt_idx = prompt_idx[-min(config.block_size, scale.MAX_PROMPT):]
        prompt = tok.decode(prompt_idx)
        results["prompt_tokens"] = [chars[i] for i in prompt_idx]
    results["prompt"] = prompt

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        results["timings_s"][name] = round(time.perf_counter() - t0, 3)
        return out

    for name in sections:
        if name == "spectra":

            def run():
                sec = {"trained": analyze_spectra(params, config, n_boot, progress=progress), "n_boot": n_boot}
                if init is not None:
                    sec["init"] = analyze_spectra(init, config, 0, progress=progress, desc="spectra (init)")  # no CI at init: it doubles the time
                    sec["init_seed"] = init_seed
                return sec
        elif name == "circuits":

            def run():
                sec = analyze_circuits(params, config, x[:8], prompt_idx, progress=progress)
                if init is not None:
                    sec["init"] = analyze_circuits(init, config, x[:8], prompt_idx)
                    del sec["init"]["prompt_attention"]
                return sec
        elif name == "embeddings":

            subset, rule = scale.token_subset(chars, val) if large else (None, "")

            def run():
                sec = analyze_embeddings(params, config, list(chars), subset, rule, progress=progress)
                if init is not None:
                    sec["init"] = analyze_embeddings(init, config, list(chars), subset, rule, progress=progress)
                return sec
        elif name == "probes":
            run = lambda: analyze_probes(params, config, x, y, list(chars), progress=progress)
        elif name == "lowrank":
            big = scale.is_big_model(config)
            xl, yl = (x[:scale.BIG_LOWRANK_SEQS], y[:scale.BIG_LOWRANK_SEQS]) if big else (x, y)
            fractions = scale.BIG_FRACTIONS if big else DEFAULT_FRACTIONS
            calib = None
            if not big:      # the whitened curve and samples: calibration on the train split of the run's text
                calib = calibration_windows(calibration_ids(tok, meta)[0], config.block_size, DEFAULT_CALIB_TOKENS)

            def run():
                sec = rank_sweep(params, config, [(xl[i:i + 8], yl[i:i + 8]) for i in range(0, len(xl), 8)],
                                 fractions=fractions, progress=progress, calib=calib)
                if not big:
                    start = tok.encode("\n") if "\n" in chars else x[0, :1]
                    sec["samples"] = lowrank_samples(params, config, start, tok.decode, calib)
                return sec
        elif name == "curvature":
            nb = max(1, args.hessian_batch)
            run = lambda: analyze_curvature(params, config, x[:nb], y[:nb], meta.get("train_args") or {}, meta.get("step"),
                                            ckpt.get("opt_state"), k=max(1, args.hessian_k), progress=progress)
        elif name == "ablation":
            n_ab = scale.BIG_ABLATION_SEQS if scale.is_big_model(config) else len(x)
            together = (getattr(args, "ablate", None) or "all").strip() != "all"

            def run():
                table = lambda p: ablation_table(p, config, heads, args.ablate_mode, x[:n_ab], y[:n_ab], together, progress)
                sec = table(params)
                if init is not None:
                    sec["init"] = table(init)
                return sec
        elif name == "training":
            run = lambda: training_logs(path, beside=getattr(args, "compare", None))
        results[name] = timed(name, run)
    return results


def training_logs(path, beside=None):
    """metrics.jsonl and spectra.jsonl from the checkpoint's folder (either may be missing); with beside (the
    --compare checkpoint), that run's logs too, under 'beside', so the report draws the two runs together."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    out = {"metrics": [], "spectra": [], "note": "", "run": folder}
    if beside:
        out["beside"] = training_logs(beside)
    for key, fname in (("metrics", "metrics.jsonl"), ("spectra", "spectra.jsonl")):
        p = os.path.join(folder, fname)
        if os.path.isfile(p):
            out[key] = read_jsonl(p)
    if not out["metrics"]:
        out["note"] = f"no metrics.jsonl next to the checkpoint in {folder}"
    return out


def _analyze(argv):
    a = analyze_parser().parse_args(argv)
    sections = parse_sections(a.only)
    if (a.n_boot or 0) < 0 or (a.eval_seqs is not None and a.eval_seqs < 1) or a.hessian_k < 1 or a.hessian_batch < 1:
        raise TinyLMError("--n-boot must be >= 0; --eval-seqs, --hessian-k and --hessian-batch >= 1")
    if a.ablate is not None:
        parse_heads(a.ablate)                 # its form now, its range once the model is loaded
        alone = not a.report and a.only == analyze_parser().get_default("only")
        sections = ["ablation"] if alone else [n for n in R.SECTION_NAMES if n in sections or n == "ablation"]
    path = checkpoint_path(a.checkpoint)
    if a.poster and not R.have_matplotlib():
        raise TinyLMError(PLOT_HINT)
    if a.report:
        try:
            os.makedirs(a.report, exist_ok=True)
        except OSError as e:
            raise TinyLMError(f"cannot create --report folder {a.report}: {e.strerror or e}") from None
    t0 = time.perf_counter()
    ckpt = load_any(path, with_optimizer="curvature" in sections)
    if ranks_of(ckpt["params"]):      # a compressed model (tinylm.compress): the analysis reads the products A B
        sys.stdout.write(f"note: {len(ranks_of(ckpt['params']))} factorized layers analysed as their products A B "
                         f"(rank {', '.join(map(str, sorted(set(ranks_of(ckpt['params']).values()))))})\n")
        ckpt = dict(ckpt, params=dense_params(ckpt["params"]), opt_state=None)
    if "ablation" in sections:
        parse_heads(a.ablate or "all", ckpt["config"])      # a head beyond the model: one line before any work
    out = sys.stdout
    if a.poster:
        make_poster(ckpt, a.poster, data=a.data, prompt=a.prompt, source=os.path.basename(path))
        out.write(f"wrote {a.poster}\n")
        if not a.report and a.only == analyze_parser().get_default("only") and a.ablate is None:
            return 0        # --poster alone: the poster, not the default sections
    if a.compare:
        if a.compare_k < 1:
            raise TinyLMError(f"--compare-k must be >= 1, got {a.compare_k}")
        base = load_any(checkpoint_path(a.compare))
        if base["config"].to_dict() != ckpt["config"].to_dict():
            differs = [k for k, v in base["config"].to_dict().items() if ckpt["config"].to_dict().get(k) != v]
            raise TinyLMError(f"--compare {a.compare} is not the same shape of model as {path} "
                              f"({', '.join(differs)} differ); compare a fine-tuned model with its own base")
        comparison = compare_weights(base["params"], ckpt["params"], ckpt["config"], a.compare_k,
                                     progress=not a.no_progress)
        out.write(R.text_table(COMPARE_HEADER, compare_rows(comparison)) + "\n\n" + compare_summary(comparison) + "\n")
        if not a.report and a.only == analyze_parser().get_default("only") and a.ablate is None:
            return 0            # --compare alone: the comparison, not the default sections
    results = run_analysis(ckpt, path, sections, a)
    if a.compare:
        results["compare"] = {"base": a.compare, "k": a.compare_k, "matrices": comparison}
    if "spectra" in results:
        out.write(R.text_table(R.SPECTRA_HEADER, R.spectra_rows(results["spectra"]["trained"])) + "\n\n")
    if "ablation" in results:
        out.write(R.ablation_title(results["ablation"], results) + "\n"
                  + R.text_table(ABLATION_HEADER, ablation_rows(results["ablation"])) + "\n\n")
    for line in R.section_summaries(results):
        out.write(line + "\n")
    if a.report:
        figures = R.have_matplotlib()
        R.write_json(results, os.path.join(a.report, "metrics.json"))
        t1 = time.perf_counter()
        R.write_html(results, os.path.join(a.report, "index.html"), figures=figures)
        results["timings_s"]["report"] = round(time.perf_counter() - t1, 3)
        out.write(f"\nwrote {os.path.join(a.report, 'index.html')} and metrics.json\n")
        if not figures:
            out.write("figures need matplotlib: pip install -e '.[plot]'\n")
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in results["timings_s"].items())
    out.write(f"done in {time.perf_counter() - t0:.1f}s ({timings})\n")
    return 0


def analyze_main(argv=None):
    return run_cli(_analyze, argv)
