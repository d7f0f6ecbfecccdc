"""The analysis as output: a terminal table, strict JSON, and a self-contained HTML page with figures.

The HTML has inline CSS only and its figures as base64 PNG data URIs, so it opens from disk
with no network. Every text that came from data (matrix names, characters, prompts) is escaped.
Figures need matplotlib (pip install -e '.[plot]'); without it the page has the tables only.
"""
import base64
import html
import io
import json
import math
import os
import re
import warnings

import numpy as np

from tinylm.atomic import atomic_write_text
from tinylm.analysis.embeddings import token_label
from tinylm.analysis.interventions import ABLATION_HEADER, ablation_rows

# Each section: title, the concepts of the README's table it demonstrates, and where it is computed.
SECTIONS = {
    "spectra": ("Spectra of every weight matrix", "3 linear transformations, 7 eigendecomposition and SVD",
                "tinylm/analysis/weight_spectra.py: analyze_spectra (metrics in spectra.py: matrix_metrics)"),
    "circuits": ("Attention circuits", "4 inner products and norms, 7 eigendecomposition and SVD",
                 "tinylm/analysis/circuits.py: analyze_circuits (head_circuits, head_pattern_scores)"),
    "ablation": ("Head ablation: the loss without each head", "2 matrices and matrix operations (the output projection "
                 "reads the heads side by side, so its output is a sum of one W_O block per head; ablation removes one term)",
                 "tinylm/analysis/interventions.py: ablation_table (forward_from, block)"),
    "embeddings": ("Embedding geometry", "1 vectors and vector spaces, 4 inner products and norms, 5 orthogonality and basis",
                   "tinylm/analysis/embeddings.py: analyze_embeddings"),
    "probes": ("Linear probes and logit lens", "6 linear systems",
               "tinylm/analysis/probes.py: analyze_probes (run_probes, logit_lens)"),
    "lowrank": ("Low-rank compression", "7 eigendecomposition and SVD", "tinylm/analysis/lowrank.py: rank_sweep"),
    "curvature": ("Curvature of the loss", "7 eigendecomposition and SVD (and 6: Hessian-vector products)",
                  "tinylm/analysis/hessian.py: analyze_curvature"),
    "training": ("Training curves and spectra during training", "7 eigendecomposition and SVD",
                 "tinylm/analysis/tracking.py: log_spectra (drawn by report.py: training_figures)"),
}
SECTION_NAMES = tuple(SECTIONS)


# ----------------------------------------------------------------------------- JSON


def to_jsonable(obj):
    """NumPy arrays/scalars -> lists/floats; complex -> [re, im]; NaN/inf -> None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (complex, np.complexfloating)):
        return [to_jsonable(obj.real), to_jsonable(obj.imag)]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_json(results, path):
    """results as strict JSON (no NaN), written atomically."""
    atomic_write_text(path, json.dumps(to_jsonable(results), allow_nan=False))


# ----------------------------------------------------------------------------- terminal


def _num(x, fmt="{:.3g}"):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _alpha_text(m):
    a = m.get("alpha")
    if a is None:
        return "-"
    ci = m.get("alpha_ci")
    if ci and ci[0] is not None:
        return f"{a:.2f} [{ci[0]:.2f},{ci[1]:.2f}]"
    return f"{a:.2f}"


def spectra_rows(spectra, per_head=False):
    """Rows of the per-matrix table: name, shape, ‖W‖_F, ‖W‖₂, stable rank, eff. rank, alpha (CI), spikes, rand_distance."""
    rows = []
    for name, m in spectra.items():
        if ".head" in name and not per_head:
            continue
        rows.append([name, "x".join(map(str, m["shape"])), _num(m["frobenius_norm"], "{:.2f}"), _num(m["spectral_norm"], "{:.2f}"),
                     _num(m["stable_rank"], "{:.1f}"), _num(m["effective_rank"], "{:.1f}"), _alpha_text(m),
                     str(m.get("num_spikes", "-")), _num(m.get("rand_distance"), "{:.3f}")])
    return rows


SPECTRA_HEADER = ["matrix", "shape", "‖W‖_F", "‖W‖₂", "stable rk", "eff. rank", "alpha [95% CI]", "spikes", "rand_dist"]


def text_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def scale_note(results):
    """What was cut down for a large vocabulary, a long context or a big model (scale.py), in one sentence; '' if nothing."""
    ev = results.get("eval")
    if not ev:
        return ""
    parts = []
    if ev["window"] < ev["block_size"]:
        parts.append(f"windows of {ev['window']} tokens (block_size {ev['block_size']})")
    if ev["big_model"]:
        big = f"big model: {ev['n_windows']} windows for probes and head patterns"
        if "lowrank" in results:
            lr = results["lowrank"]
            big += f", {lr['n_tokens']} tokens and {len(lr['curve'])} rank fractions for low rank"
        if "spectra" in results:
            big += f", {results['spectra']['n_boot']} bootstrap resamples of alpha"
        parts.append(big)
    if ev["large_vocab"]:
        parts.append("large vocabulary: token-level views on a subset of the tokens, probes over the most frequent tokens"
                     + (f", logit lens on {results['probes']['logit_lens_tokens']} tokens" if "probes" in results else ""))
    return ("Scaled down (tinylm/analysis/scale.py): " + "; ".join(parts) + ".") if parts else ""


def ablation_title(sec, results):
    """The line above the ablation table: what was replaced, on how many tokens."""
    ev = results.get("eval") or {}
    what = "zero" if sec["mode"] == "zero" else "its mean over these tokens"
    return (f"ablation: each head's output (before the output projection) replaced by {what}; validation loss on {sec['n_tokens']} tokens"
            + (f" ({sec['n_tokens'] // ev['window']} windows of {ev['window']})" if ev.get("window") else ""))


def section_summaries(results):
    """One short paragraph of plain text per section that ran (the terminal's view of everything but the big table)."""
    out = [scale_note(results)] if scale_note(results) else []
    if "spectra" in results:
        sp = results["spectra"]["trained"]
        alphas = [m["alpha"] for n, m in sp.items() if ".head" not in n and m.get("alpha") is not None]
        median = lambda xs: f"{np.median(xs):.2f}" if xs else "- (no power law could be fitted)"   # e.g. zero weights
        line = f"spectra: {len(sp)} matrices (per-head blocks in metrics.json); median alpha of whole matrices {median(alphas)}"
        if results["spectra"].get("init"):
            ia = [m["alpha"] for n, m in results["spectra"]["init"].items() if ".head" not in n and m.get("alpha") is not None]
            line += f" (at init {median(ia)})"
        out.append(line)
    if "circuits" in results:
        c = results["circuits"]
        pat = c["patterns"]
        best = max(c["heads"], key=lambda h: h["copying_score"])
        name = lambda pairs: ", ".join(f"L{i}H{h}" for i, h in pairs) or "none"
        out.append(f"circuits: highest copying score L{best['layer']}H{best['head']} = {best['copying_score']:.2f}; "
                   f"previous-token heads (> {pat['threshold']}): {name(pat['previous_token_heads'])}; "
                   f"induction heads: {name(pat['induction_heads'])}; max scores prev {np.max(pat['previous_token']):.2f}, "
                   f"induction {np.max(pat['induction']):.2f}")
        if c.get("rotary"):
            rot = c["rotary"]
            out.append("rotary QK circuit, per head the offset of its largest σ₁ (max/min over offsets 0.."
                       f"{len(rot['offsets']) - 1}): " + ", ".join(
                           f"L{i}H{h} {rot['peak_offset'][i][h]} ({rot['max_over_min'][i][h]:.2f})"
                           for i in range(len(rot["peak_offset"])) for h in range(len(rot["peak_offset"][i]))))
    if "ablation" in results:
        ab = results["ablation"]
        top = ab["rows"][0]
        line = (f"ablation ({ab['mode']}): dense loss {ab['dense_loss']:.4f}; without {top['head']} {top['loss']:.4f} "
                f"({top['delta']:+.4f}, the largest of {len(ab['rows'])} heads)")
        if ab.get("init"):
            line += f"; at init the largest Δ is {ab['init']['rows'][0]['delta']:+.4f}"
        out.append(line)
    if "embeddings" in results:
        e = results["embeddings"]
        an = e["analogies"]
        line = (f"embeddings: {e['pca_components_for_90pct']} principal components hold 90% of the token-embedding variance "
                f"(top 2: {100 * sum(e['pca_explained_variance_ratio'][:2]):.0f}%)")
        if an.get("n"):
            line += (f"; case analogies over {an['n']} letter pairs: top-1 {100 * an['top1_accuracy']:.0f}%, "
                     f"median rank {an['median_rank']:.0f} (chance {an['chance_rank']:.0f})")
        out.append(line)
    if "probes" in results:
        p = results["probes"]
        parts = [f"{n} {v['metric']} " + " ".join(f"{r['score']:.2f}" for r in v['per_layer']) for n, v in p["probes"].items()]
        out.append("probes (per layer, 0 = embeddings): " + "; ".join(parts))
        out.append("logit lens loss per layer: " + " ".join(f"{x:.2f}" for x in p["logit_lens"]["loss"]))
    if "lowrank" in results:
        lr = results["lowrank"]
        b = lr["smallest_within_tolerance"]
        out.append(f"low rank: validation loss {lr['base_loss']:.4f} on {lr['n_tokens']:,} tokens; " + (
            f"smallest rank within {100 * lr['tolerance']:.0f}%: {100 * b['rank_fraction']:.1f}% of each matrix's rank, "
            f"{100 * b['param_fraction']:.0f}% of block parameters, loss {b['loss']:.4f}" if b else "no truncation stays within tolerance"))
        if "whitened_smallest_within_tolerance" in lr:
            w = lr["whitened_smallest_within_tolerance"]
            out.append("low rank, whitened (tinylm.compress): " + (
                f"smallest rank within {100 * lr['tolerance']:.0f}%: {100 * w['rank_fraction']:.1f}% of each matrix's rank, "
                f"{100 * w['param_fraction']:.0f}% of block parameters, loss {w['whitened_loss']:.4f}" if w
                else "no truncation stays within tolerance"))
    if "curvature" in results:
        cv = results["curvature"]
        line = (f"curvature: top Hessian eigenvalues {', '.join(f'{v:.3g}' for v in cv['eigenvalues'])}; "
                f"2/lr = {cv['gd_threshold_2_over_lr']:.3g} (peak lr), {_num(cv['gd_threshold_at_step'])} (lr at this step)")
        if "adam_preconditioned_top" in cv:
            line += f"; Adam-preconditioned top {cv['adam_preconditioned_top']:.3g} vs {cv['adam_threshold']:.3g}"
        out.append(line)
    if "training" in results:
        t = results["training"]
        if t["metrics"]:
            last = t["metrics"][-1]
            out.append(f"training: {len(t['metrics'])} evaluations, last at step {last.get('step')}: train {_num(last.get('train_loss'), '{:.4f}')}, "
                       f"val {_num(last.get('val_loss'), '{:.4f}')}; " + (f"spectra logged at {len(t['spectra'])} evaluations" if t['spectra'] else "no spectra logged (train with --track_spectra true)"))
        else:
            out.append("training: " + t["note"])
    return out


# ----------------------------------------------------------------------------- figures


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _mpl_text(text):
    """Text that matplotlib draws literally: a pair of '$' would start mathtext."""
    return text.replace("$", r"\$")


def _png(fig):
    """Figure -> base64 PNG text (and closes it)."""
    plt = _plt()
    buf = io.BytesIO()
    # Grids of many panels skip bbox_inches="tight": it draws the figure twice, and drawing is the cost.
    with warnings.catch_warnings():     # a log axis of all-zero values (a model of zero weights) stays empty
        warnings.filterwarnings("ignore", message="Data has no positive values")
        fig.savefig(buf, format="png", dpi=72, bbox_inches=None if getattr(fig, "_many_panels", False) else "tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(n, cols, w=2.6, h=2.0, xlabel=None, ylabel=None, title_lines=1):
    """A figure of n small panels, cols per row, with few ticks (tick layout dominates drawing time).

    w, h: inches per panel, gaps included. The margins and gaps are fixed in inches, so that titles, tick labels
    and the axis labels (xlabel under the lowest panel of each column, ylabel left of the first column) fit at
    any number of panels, without the second drawing pass that bbox_inches="tight" or a constrained layout costs."""
    plt = _plt()
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    title = 0.2 * title_lines + 0.08                      # inches a title takes above its panel
    left, right, bottom, top = (0.75 if ylabel else 0.45), 0.15, (0.55 if xlabel else 0.35), title + 0.1
    gap_w, gap_h = 0.6, 0.3 + title + (0.2 if xlabel else 0)
    W, H = w * cols, h * rows
    aw, ah = (W - left - right - (cols - 1) * gap_w) / cols, (H - bottom - top - (rows - 1) * gap_h) / rows
    fig.subplots_adjust(left=left / W, right=1 - right / W, bottom=bottom / H, top=1 - top / H,
                        wspace=gap_w / aw, hspace=gap_h / ah)
    fig._many_panels = True
    flat = axes.ravel()
    for ax in flat[n:]:
        ax.axis("off")
    for i, ax in enumerate(flat[:n]):
        ax.locator_params(nbins=3)
        ax.tick_params(labelsize=8)
        if xlabel and i + cols >= n:                      # the lowest panel of its column
            ax.set_xlabel(xlabel, fontsize=9)
        if ylabel and i % cols == 0:
            ax.set_ylabel(ylabel, fontsize=9)
    return fig, flat


def _whole(spectra):
    return [n for n in spectra if ".head" not in n]


# The tour explains every figure; a caption ends with what to look for and the section that says why.
TOUR_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "tour.md")
TOUR_LINK = "docs/tour.md#"


def _caption(what, notice, section):
    """what is plotted, then one sentence of what to notice, then the tour section (its anchor) that explains it."""
    return f"{what}. What to notice: {notice} See {TOUR_LINK}{section}"


def _flags_html(text):
    """Escaped text with each command-line flag (--compare-init) in a code span that never wraps: a browser
    may otherwise break the line at a hyphen, leaving "-" at a line's end and "-compare-init" on the next."""
    return re.sub(r"(?<![\w-])(--[A-Za-z][\w-]*)", r"<code class='flag'>\1</code>", html.escape(text))


def _caption_html(caption, tour_href):
    """The caption, escaped, with its closing docs/tour.md#section turned into a link (tour_href: the tour from the page)."""
    e = html.escape
    head, sep, section = caption.rpartition(" See " + TOUR_LINK)
    if not sep:
        return _flags_html(caption)
    return f"{_flags_html(head)} See <a href='{e(tour_href)}#{e(section)}'>the tour, {e(section.replace('-', ' '))}</a>."


def spectra_figures(sec):
    trained, init = sec["trained"], sec.get("init")
    names = _whole(trained)
    figs = []
    # One panel per kind of matrix, one line per layer: 8 panels draw far faster than one per matrix.
    kinds = []
    for n in names:
        kind = n.split(".", 1)[1] if n.startswith("h") and "." in n else n
        if kind not in kinds:
            kinds.append(kind)
    fig, axes = _grid(len(kinds), 4, 3.5, 2.7, xlabel="index i (largest first)", ylabel="log₁₀ σᵢ")
    for ax, kind in zip(axes, kinds):
        members = [n for n in names if n == kind or n.endswith("." + kind) and n.split(".", 1)[1] == kind]
        for i, n in enumerate(members):
            ax.plot(np.log10(np.maximum(trained[n]["singular_values"], 1e-12)), color=f"C{i}", lw=1, label=n.split(".")[0])
            if init:
                ax.plot(np.log10(np.maximum(init[n]["singular_values"], 1e-12)), "--", color=f"C{i}", lw=0.7, alpha=0.6)
        ax.set_title(kind, fontsize=10)
        if len(members) > 1:
            ax.legend(fontsize=7)
    figs.append((_caption("log₁₀ of the singular values σᵢ (descending) of every whole matrix, one line per layer" +
                          (", trained (solid) and at initialization (dashed)" if init else ""),
                          "where a trained line leaves its dashed twin, training put structure into that matrix, and a "
                          "top value far above the rest is one dominant direction." if init else
                          "a line that falls steeply at the left has a few dominant directions; run with --compare-init "
                          "to see which of them training made.", "3-linear-transformations"), _png(fig)))

    fig, axes = _grid(len(names), 6, 2.6, 2.3, xlabel="log₁₀ λ", ylabel="density", title_lines=2)
    for ax, n in zip(axes, names):
        m = trained[n]
        ev = np.asarray(m["esd"], dtype=float)
        ev = ev[ev > 0]
        if len(ev) < 2:
            continue
        # Histogram of log10 λ; the density of log10 λ is p(λ)·λ·ln 10, so a power law λ^-α is a line of slope 1-α.
        lg = np.log10(ev)
        if init:     # the same matrix at initialization, in the same panel (grey outline)
            iev = np.asarray(init[n]["esd"], dtype=float)
            iev = iev[iev > 0]
            if len(iev) > 1:
                counts, edges = np.histogram(np.log10(iev), bins=30, density=True)
                ax.stairs(counts, edges, color="grey", lw=0.8)
        counts, edges = np.histogram(lg, bins=30, density=True)
        ax.stairs(counts, edges, fill=True, color="C0", alpha=0.6)   # one artist, not 30 bars
        if m.get("alpha") is not None and m.get("xmin") is not None:
            xs = np.linspace(np.log10(m["xmin"]), lg.max(), 20)
            frac = m["n_tail"] / len(ev)   # the tail's share of the density
            lam = 10.0**xs
            dens = frac * (m["alpha"] - 1) / m["xmin"] * (lam / m["xmin"]) ** (-m["alpha"]) * lam * np.log(10)
            ax.plot(xs, dens, "r-", lw=1)
            ax.axvline(np.log10(m["xmin"]), color="r", ls=":", lw=0.8)
        if m.get("bulk_max") is not None and m["bulk_max"] > 0:
            ax.axvline(np.log10(m["bulk_max"]), color="g", ls="--", lw=0.8)
        ax.set_yticks([])   # the density's scale says nothing here, and tick labels cost drawing time
        ax.set_title(f"{n}\nα = {_num(m.get('alpha'), '{:.2f}')}" + (f" (init {_num(init[n].get('alpha'), '{:.2f}')})" if init else ""),
                     fontsize=9)
    figs.append((_caption("ESD: histogram of log₁₀ of the eigenvalues of WᵀW with the power-law tail fit (red; dotted: xmin) "
                          "and the Marchenko-Pastur bulk edge (green dashed)" +
                          ("; grey outline: the same matrix at initialization" if init else ""),
                          "eigenvalues to the right of the green edge are what a random matrix of this shape cannot "
                          "explain; a random matrix stays inside the bulk.", "7-eigendecomposition-and-svd"), _png(fig)))

    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 3))
    x = np.arange(len(names))

    def bars(src, offset, color, label):
        a = np.array([src[n]["alpha"] if src[n].get("alpha") is not None else np.nan for n in names])
        ci = [src[n].get("alpha_ci") or [None, None] for n in names]
        lo = np.array([a[i] - c[0] if c[0] is not None else 0 for i, c in enumerate(ci)])
        hi = np.array([c[1] - a[i] if c[1] is not None else 0 for i, c in enumerate(ci)])
        ax.bar(x + offset, a, 0.4, color=color, label=label, yerr=[np.clip(lo, 0, None), np.clip(hi, 0, None)], capsize=2)

    bars(trained, -0.2 if init else 0, "C0", "trained")
    if init:
        bars(init, 0.2, "grey", "init")
    ax.axhspan(2, 6, color="g", alpha=0.08)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("alpha")
    ax.legend(fontsize=7)
    figs.append((_caption("Power-law exponent α per matrix with its 95% bootstrap interval (green band: WeightWatcher's 2-6)",
                          "a smaller α is a heavier tail; read each bar against its interval and its value at "
                          "initialization rather than as a verdict.", "7-eigendecomposition-and-svd"), _png(fig)))
    return figs


def circuits_figures(sec, chars, prompt, prompt_tokens=None):
    plt = _plt()
    figs = []
    rows = [("trained", sec)] + ([("init", sec["init"])] if sec.get("init") else [])
    # constrained: each colour bar gets its own room, clear of the next panel's label and ticks
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 3.3 * len(rows)), squeeze=False, layout="constrained")
    for r, (label, s) in enumerate(rows):
        L = 1 + max(h["layer"] for h in s["heads"])
        H = 1 + max(h["head"] for h in s["heads"])
        copy = np.zeros((L, H))
        for h in s["heads"]:
            copy[h["layer"], h["head"]] = h["copying_score"]
        for ax, (title, M, lim) in zip(axes[r], [("copying score", copy, (-1, 1)),
                                                 ("previous-token score", np.asarray(s["patterns"]["previous_token"]), (0, 1)),
                                                 ("induction score", np.asarray(s["patterns"]["induction"]), (0, 1))]):
            im = ax.imshow(np.asarray(M), vmin=lim[0], vmax=lim[1], cmap="RdBu_r" if lim[0] < 0 else "viridis")
            for (i, j), v in np.ndenumerate(np.asarray(M)) if M.size <= 64 else ():     # numbers only while they fit
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if lim[0] == 0 and v < 0.6 else "k")
            ax.set_title(f"{title} ({label})", fontsize=9)
            ax.set_xticks(range(M.shape[1]))
            ax.set_yticks(range(M.shape[0]))
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, fraction=0.046)
    figs.append((_caption("Per head: copying score of the token OV circuit, previous-token score on text, induction score on "
                          "repeated random tokens" + (" (second row: the same model at initialization)" if len(rows) > 1 else ""),
                          "a score far from 0 or a pattern score above the threshold is a role the head learned; at "
                          "initialization every score sits near 0.", "which-head-copies"), _png(fig)))

    heads = sec["heads"]
    fig, axes = _grid(len(heads), max(1 + max(h["head"] for h in heads), 2), 2.8, 2.6, xlabel="Re λ", ylabel="Im λ")
    for ax, h in zip(axes, heads):
        ev = np.asarray(h["token_ov_eigenvalues"])
        ax.scatter(ev.real, ev.imag, s=6)
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_title(f"L{h['layer']}H{h['head']}  copying {h['copying_score']:.2f}", fontsize=10)
    figs.append((_caption("Eigenvalues (complex plane) of each head's token-to-token OV circuit W_U G_f W_O W_V G_1 W_E",
                          "points along the positive real axis mean the head copies the token it attends to, along the "
                          "negative axis that it suppresses it, a round cloud that it has no simple token-to-token role.",
                          "which-head-copies"), _png(fig)))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    for h in heads:
        axes[0].semilogy(h["qk_singular_values"], lw=0.8)
        axes[1].semilogy(h["ov_singular_values"], lw=0.8, label=f"L{h['layer']}H{h['head']}")
    axes[0].set_title("W_QK = W_Qᵀ W_K singular values", fontsize=9)
    axes[1].set_title("W_OV = W_O W_V singular values", fontsize=9)
    for ax in axes:
        ax.set(xlabel="index i (largest first)", ylabel="σᵢ")
    axes[1].legend(fontsize=5, ncol=2)
    rotary = "; with rotary positions W_Qᵀ W_K is the circuit at offset 0 (next figure)" if sec.get("rotary") else ""
    figs.append((_caption("Singular values of each head's QK and OV circuits (rank ≤ head size)" + rotary,
                          "a first QK singular value far above the second means one direction sets most of the head's "
                          "scores" + ("." if rotary else " (in layer 0 of the default model, the position)."),
                          "why-are-the-top-singular-values-of-the-qk-circuit-so-much-larger-than-the-rest"), _png(fig)))

    if sec.get("rotary"):
        figs.append(rotary_figure(sec["rotary"], (sec.get("init") or {}).get("rotary")))

    att = np.asarray(sec["prompt_attention"])
    L, H = att.shape[:2]
    fig, axes = _grid(L * H, H, 2.8, 2.9, xlabel="key position", ylabel="query position")
    labels = [_mpl_text(token_label(t)) for t in (prompt_tokens if prompt_tokens is not None else prompt)]
    for i in range(L):
        for j in range(H):
            ax = axes[i * H + j]
            ax.imshow(att[i, j], cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"L{i}H{j}", fontsize=10)
            if len(labels) <= 40:        # short prompts: the tokens themselves on the axes
                ax.set_xticks(range(len(labels)))
                ax.set_yticks(range(len(labels)))
                ax.set_xticklabels(labels, fontsize=4)
                ax.set_yticklabels(labels, fontsize=4)
    figs.append((_caption("Attention patterns (row: query position, column: key position) for the prompt",
                          "a line just below the diagonal is a previous-token head, dark cells that step along the text "
                          "are a head that looks back at one kind of token (a space, say), an even grey is a head that averages.",
                          "4-inner-products-and-norms"), _png(fig)))
    return figs


def rotary_figure(rot, init=None):
    """σ₁ of each head's QK circuit W_Qᵀ R(−Δ) W_K against the offset Δ, one panel per layer, one line per head
    (dashed: the same head at initialization)."""
    sigma = np.asarray(rot["sigma1"], dtype=float)                 # (L, H, offsets)
    L, H, _ = sigma.shape
    fig, axes = _grid(L, min(L, 4), 3.6, 2.8, xlabel="offset Δ = query − key position", ylabel="σ₁(Δ)")
    for i, ax in enumerate(axes[:L]):
        for h in range(H):
            ax.plot(rot["offsets"], sigma[i, h], color=f"C{h % 10}", lw=1, label=f"H{h}")
            if init is not None:
                ax.plot(init["offsets"], np.asarray(init["sigma1"])[i, h], "--", color=f"C{h % 10}", lw=0.6, alpha=0.6)
        ax.set_title(f"layer {i}", fontsize=10)
        ax.legend(fontsize=6, ncol=2)
    return (_caption("Top singular value σ₁(Δ) of each head's QK circuit under rotary positions, W_Qᵀ R(−Δ) W_K, against "
                     "the offset Δ between query and key" + (" (dashed: at initialization)" if init is not None else ""),
                     "a head whose line peaks at a small Δ and falls away is built to score nearby tokens; a flat line "
                     "scores every distance alike, so its pattern comes from the tokens, not their positions.",
                     "the-qk-circuit-under-rotation"), _png(fig))


def embeddings_figures(sec):
    plt = _plt()
    figs = []
    rows = [("trained", sec)] + ([("init", sec["init"])] if sec.get("init") else [])
    fig, axes = plt.subplots(len(rows), 3, figsize=(13, 4 * len(rows)), squeeze=False, layout="constrained")
    for r, (label, s) in enumerate(rows):
        evr = np.asarray(s["pca_explained_variance_ratio"])
        ax = axes[r, 0]
        ax.bar(np.arange(1, len(evr) + 1), evr, color="C0")
        ax.plot(np.arange(1, len(evr) + 1), np.cumsum(evr), "r-", lw=1)
        ax.set_title(f"PCA explained variance ({label})", fontsize=9)
        ax.set_xlabel("component")
        ax = axes[r, 1]
        xy = np.asarray(s["pca_map"])
        ax.scatter(xy[:, 0], xy[:, 1], s=0)
        for (px, py), ch in zip(xy, s["chars"]):
            ax.text(px, py, _mpl_text(token_label(ch)), fontsize=7, ha="center", va="center",
                    color="C3" if ch.strip().isupper() else ("C0" if ch.strip().isalpha() else "k"))
        ax.set_title(f"token embeddings on PC1-PC2 ({label})", fontsize=9)
        ax = axes[r, 2]
        if s.get("position_cosine") is None:         # a Llama: positions are rotations inside attention
            ax.axis("off")
            ax.text(0.5, 0.5, "no position embeddings:\nrotary positions turn q and k\ninside every attention "
                    "\n(see the circuits section:\nthe QK circuit against the offset)", ha="center", va="center",
                    fontsize=9, transform=ax.transAxes)
            continue
        pos = np.asarray(s.get("positions", np.arange(len(s["position_cosine"]))))
        half = (pos[1] - pos[0]) / 2 if len(pos) > 1 else 0.5     # pixels centred on the positions they show
        im = ax.imshow(np.asarray(s["position_cosine"]), cmap="RdBu_r", vmin=-1, vmax=1,
                       extent=(pos[0] - half, pos[-1] + half, pos[-1] + half, pos[0] - half))
        ax.set_title(f"cosine similarity of position embeddings ({label})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    positions = sec.get("position_cosine") is not None
    figs.append((_caption("PCA of the token embeddings (eigendecomposition of their covariance; upper case red, lower case blue)"
                          + (" and the cosine similarities of the position embeddings" if positions else
                             " (a Llama has no position embeddings to compare)"),
                          "groups of colour in the map" + (" and a bright band along the diagonal of the position "
                                                           "similarities are" if positions else " are") +
                          " learned, since random embeddings give a shapeless cloud" + (" and cosines near 0." if positions else "."),
                          "1-vectors-and-vector-spaces"), _png(fig)))
    hs = sec["head_subspaces"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key in zip(axes, ("read", "write")):
        im = ax.imshow(np.asarray(hs[key]), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(hs["labels"])))
        ax.set_yticks(range(len(hs["labels"])))
        ax.set_xticklabels(hs["labels"], rotation=90, fontsize=6)
        ax.set_yticklabels(hs["labels"], fontsize=6)
        ax.set_title(f"{key} subspaces: mean cos² of principal angles", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    figs.append((_caption(f"Overlap between heads' read (W_V rows) and write (W_O columns) subspaces; two random subspaces "
                          f"give {hs['random_baseline']:.2f}",
                          f"compare the colour off the diagonal with {hs['random_baseline']:.2f} = D/C: near it, the heads "
                          "use almost randomly placed subspaces, and only a pair well above it shares directions.",
                          "5-orthogonality-and-basis"), _png(fig)))
    return figs


def probes_figures(sec):
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for name, v in sec["probes"].items():
        axes[0].plot([r["score"] for r in v["per_layer"]], "o-", label=f"{name} ({v['metric']})")
    axes[0].set_xlabel("layer (0 = embeddings)")
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].legend(fontsize=7)
    axes[0].set_title("held-out probe score per layer", fontsize=9)
    ll = sec["logit_lens"]
    axes[1].plot(ll["loss"], "o-", label="loss")
    ax2 = axes[1].twinx()
    ax2.plot(ll["accuracy"], "s--", color="C1", label="accuracy")
    axes[1].set_xlabel("layer (0 = embeddings)")
    axes[1].set_ylabel("loss")
    ax2.set_ylabel("next-token accuracy")
    axes[1].set_title("logit lens: the final norm and the head on each layer", fontsize=9)
    return [(_caption("Least-squares probes and logit lens per layer",
                      "the rise from column 0 (the embeddings) is what the blocks wrote into the residual stream; a "
                      "probe that stays at its column-0 value reads nothing new.", "6-linear-systems"), _png(fig))]


def lowrank_figures(sec):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    c = sec["curve"]
    ax.plot([r["param_fraction"] for r in c], [r["loss"] for r in c], "o-", label="plain SVD")
    if c and "whitened_loss" in c[0]:
        ax.plot([r["param_fraction"] for r in c], [r["whitened_loss"] for r in c], "s-", ms=3,
                label="whitened SVD (Cholesky of XᵀX)")
    for r in c:
        ax.annotate(f"{r['rank_fraction']:.2g}", (r["param_fraction"], r["loss"]), fontsize=6)
    ax.axhline(sec["base_loss"], color="grey", ls="--", lw=0.8, label="full model")
    ax.axhline(sec["base_loss"] * (1 + sec["tolerance"]), color="r", ls=":", lw=0.8, label=f"+{100 * sec['tolerance']:.0f}%")
    ax.set_xlabel("fraction of block-linear parameters kept (factored form)")
    ax.set_ylabel("validation loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    white = bool(c) and "whitened_loss" in c[0]
    return [(_caption("Validation loss after truncating every block linear weight to rank k, by plain SVD"
                      + (" and by whitened SVD" if white else "") + " (labels: k / full rank)",
                      "the curve measures compression only below the uniform guess ln V (4.17 for 65 characters); above "
                      "it a broken model's loss need not fall with the rank.",
                      "what-happens-to-the-loss-if-i-keep-only-25-of-the-rank"), _png(fig))]


def ablation_figures(sec):
    """A layer × head heatmap of Δloss (and the same at initialization beside it, when given)."""
    plt = _plt()
    panels = [("trained", sec)] + ([("at initialization", sec["init"])] if sec.get("init") else [])
    grids = [np.asarray(p["delta"], dtype=float) for _, p in panels]
    top = max(float(np.nanmax(np.abs(g))) if np.isfinite(g).any() else 0.0 for g in grids) or 1.0
    L, H = grids[0].shape
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 0.7 * H * len(panels) + 1.5, 0.5 * L + 1.5), squeeze=False)
    for ax, (title, p), g in zip(axes[0], panels, grids):
        im = ax.imshow(g, cmap="RdBu_r", vmin=-top, vmax=top)      # one colour scale for both panels
        for (i, h), v in np.ndenumerate(g):
            if np.isfinite(v):
                ax.text(h, i, f"{v:+.3f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(v) > 0.6 * top else "black")
        ax.set_xticks(range(H), [f"H{h}" for h in range(H)], fontsize=7)
        ax.set_yticks(range(L), [f"L{i}" for i in range(L)], fontsize=7)
        ax.set_title(f"{title}: dense loss {p['dense_loss']:.3f}", fontsize=8)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="Δ validation loss")
    what = "zero" if sec["mode"] == "zero" else "its mean over the evaluation tokens"
    return [(_caption(f"Validation loss change when one head's output is replaced by {what} (rows: layers, columns: "
                      f"heads)" + ("; right: the same model at initialization" if sec.get("init") else ""),
                      "the heads the loss rises most without are the ones the model relies on; set them beside the "
                      "circuits section's pattern scores.", "what-if-i-switch-a-head-off"), _png(fig))]


def curvature_figures(sec):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ev = np.asarray(sec["eigenvalues"])
    ax.bar(range(1, len(ev) + 1), ev, color="C0", label="top Hessian eigenvalues")
    ax.axhline(sec["gd_threshold_2_over_lr"], color="r", ls="--", label="2 / peak lr")
    if sec.get("gd_threshold_at_step") and np.isfinite(sec["gd_threshold_at_step"]):
        ax.axhline(sec["gd_threshold_at_step"], color="orange", ls=":", label="2 / lr at this step")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    return [(_caption("Top eigenvalues of the loss Hessian (Lanczos on finite-difference Hessian-vector products) "
                      "against the gradient-descent stability threshold 2/η",
                      "eigenvalues below the 2/η line mean plain gradient descent at this step size would be stable "
                      "here; for Adam compare its preconditioned eigenvalue with its own threshold.",
                      "how-sharp-is-the-minimum"), _png(fig))]


def training_figures(sec):
    plt = _plt()
    figs = []
    if sec["metrics"]:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        m = sec["metrics"]
        ax.plot([r["step"] for r in m], [r.get("train_loss") for r in m], "o-", label="train")
        ax.plot([r["step"] for r in m], [r.get("val_loss") for r in m], "s-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
        figs.append((_caption("Training and validation loss (metrics.jsonl)",
                              "the loss starts near ln V, the uniform guess, and a gap opening between the two curves is "
                              "over-fitting.", "0-what-the-model-computes"), _png(fig)))
    if sec["spectra"]:
        rows = sec["spectra"]
        steps = [r["step"] for r in rows]
        names = list(rows[-1]["matrices"])
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
        kinds = sorted({n.split(".", 1)[-1] for n in names})
        color = {k: f"C{i % 10}" for i, k in enumerate(kinds)}
        for n in names:
            get = lambda key: [r["matrices"].get(n, {}).get(key) for r in rows]
            c = color[n.split(".", 1)[-1]]
            alpha = [np.nan if a is None else a for a in get("alpha")]
            axes[0].plot(steps, alpha, color=c, lw=0.8)
            axes[1].plot(steps, get("stable_rank"), color=c, lw=0.8)
            axes[2].plot(steps, [sv[0] if sv else np.nan for sv in get("top_sv")], color=c, lw=0.8)
        for ax, t in zip(axes, ("alpha", "stable rank", "top singular value σ₁")):
            ax.set_title(t, fontsize=9)
            ax.set_xlabel("step")
        for k in kinds:
            axes[2].plot([], [], color=color[k], label=k)
        axes[2].legend(fontsize=6)
        figs.append((_caption("Spectral metrics of every whole matrix during training (spectra.jsonl; colour = kind of matrix)",
                              "a σ₁ that keeps growing while the stable rank falls is one direction taking over, as in "
                              "layer 0's W_Q of the default model.", "3-linear-transformations"), _png(fig)))
    runs = [(sec.get("run", "this run"), [r for r in sec["spectra"] if r.get("updates")])]
    if sec.get("beside"):            # analyze.py --compare OTHER: the other run's updates beside these
        runs.append((sec["beside"].get("run", "--compare"), [r for r in sec["beside"]["spectra"] if r.get("updates")]))
    runs = [(label, rows) for label, rows in runs if rows]
    if runs:
        figs.append(update_figure(runs, plt))
    return figs


def update_figure(runs, plt):
    """The singular values of the applied updates ΔW, one row per run [(label, spectra rows)]: the last logged
    step's, each over its σ₁, and their stable rank over training (Muon's are flat, AdamW's fall off)."""
    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.4 * len(runs)), squeeze=False)
    names = []
    for (label, rows), (left, right) in zip(runs, axes):
        last = rows[-1]
        kinds = sorted({n.split(".", 3)[-1] for n in last["updates"]})
        color = {k: f"C{i % 10}" for i, k in enumerate(kinds)}
        for name, u in last["updates"].items():
            sv = np.array(u["sv"])
            c = color[name.split(".", 3)[-1]]
            left.plot(np.arange(1, len(sv) + 1), sv / sv[0] if sv[0] > 0 else sv, color=c, lw=0.8)
            right.plot([r["step"] for r in rows], [r["updates"].get(name, {}).get("stable_rank") for r in rows],
                       color=c, lw=0.8)
        for k in kinds:
            left.plot([], [], color=color[k], label=k)
        left.legend(fontsize=6)
        optimizer = last.get("optimizer") or "the optimizer"
        names.append(optimizer)
        left.set(xlabel="index i", ylabel="σᵢ / σ₁ of ΔW", ylim=(0, 1.05),
                 title=f"{label} ({optimizer}): singular values of the update at step {last['step'] - 1}")
        right.set(xlabel="step", ylabel="‖ΔW‖²_F / σ₁²", title=f"{label} ({optimizer}): stable rank of the update")
        for ax in (left, right):
            ax.title.set_fontsize(9)
    return (_caption(f"Singular values of the updates {' and '.join(names)} applied to each block matrix (spectra.jsonl"
                     + (", a row per run: this one, then --compare's" if len(runs) > 1 else "") + ")",
                     "Muon's are all equal by construction (its update is the polar factor U Vᵀ, stable rank the full "
                     "rank), while AdamW's fall off after a few directions.", "5-orthogonality-and-basis"), _png(fig))


# ----------------------------------------------------------------------------- HTML

CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
.where{color:#555;font-size:.9em}code{background:#f3f3f3;padding:0 .2em}
table{border-collapse:collapse;font-size:.8em;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f6f6f6}td:first-child,th:first-child{text-align:left}figure{margin:1em 0}img{max-width:100%}
figcaption{font-size:.85em;color:#444}code.flag{white-space:nowrap}.note{background:#fff8e0;padding:.5em;border-left:3px solid #e0b000}"""


def _table(header, rows):
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _folded(sec):
    """What folding the norms into the token circuit kept: LayerNorm's gains and centring, or RMSNorm's gains."""
    if sec.get("norm") == "RMSNorm":
        return "yes (RMSNorm's gains; the per-token 1/rms is left out)"
    return "yes (gains and centring; the per-token 1/std is left out)"


def _section_tables(name, sec, results):
    """HTML tables (and notes) for one section."""
    e = html.escape
    if name == "spectra":
        out = _table(SPECTRA_HEADER, spectra_rows(sec["trained"]))
        if sec.get("init"):
            out += f"<p>At initialization (seed {sec['init_seed']}):</p>" + _table(SPECTRA_HEADER, spectra_rows(sec["init"]))
        heads = [r for r in spectra_rows(sec["trained"], per_head=True) if ".head" in r[0]]
        out += f"<details><summary>per-head blocks ({len(heads)})</summary>{_table(SPECTRA_HEADER, heads)}</details>"
        return out
    if name == "circuits":
        pat = sec["patterns"]
        rows = [[f"L{h['layer']}H{h['head']}", f"{h['copying_score']:.3f}", f"{h['ov_copying_score']:.3f}",
                 f"{h['qk_singular_values'][0]:.3g}", f"{h['ov_singular_values'][0]:.3g}",
                 f"{pat['previous_token'][h['layer']][h['head']]:.3f}", f"{pat['induction'][h['layer']][h['head']]:.3f}"]
                for h in sec["heads"]]
        name_heads = lambda pairs: ", ".join(f"L{i}H{h}" for i, h in pairs) or "none"
        rot = sec.get("rotary")
        if rot:              # a Llama: where each head's QK circuit is largest over the offsets
            for r, h in zip(rows, sec["heads"]):
                i, j = h["layer"], h["head"]
                r += [str(rot["peak_offset"][i][j]), _num(rot["max_over_min"][i][j], "{:.2f}")]
        return (f"<p>Threshold {pat['threshold']}: previous-token heads: <b>{e(name_heads(pat['previous_token_heads']))}</b>; "
                f"induction heads: <b>{e(name_heads(pat['induction_heads']))}</b> (induction measured on random sequences of "
                f"{pat['induction_period']} tokens repeated twice). Layer norms folded into the token circuit: "
                f"{_folded(sec) if sec['fold_ln'] else 'no'}.</p>"
                + _table(["head", "copying score (W_U W_OV W_E)", "copying score (W_OV)", "σ₁(W_QK)", "σ₁(W_OV)",
                          "prev-token", "induction"] + (["Δ of max σ₁(W_Qᵀ R(−Δ) W_K)", "max/min over Δ"] if rot else []),
                         rows))
    if name == "ablation":
        out = f"<p>{e(ablation_title(sec, results))}.</p>" + _table(ABLATION_HEADER, ablation_rows(sec))
        if sec.get("init"):
            out += "<p>At initialization:</p>" + _table(ABLATION_HEADER, ablation_rows(sec["init"]))
        return out
    if name == "embeddings":
        an = sec["analogies"]
        out = (f"<p>{sec['pca_components_for_90pct']} principal components hold 90% of the variance of the token embeddings.</p>")
        if an.get("n"):
            out += (f"<p>Case analogies ('x' − 'X' + 'Y' → 'y') over {an['n']} pairs of letters: top-1 {100 * an['top1_accuracy']:.1f}%, "
                    f"top-5 {100 * an['top5_accuracy']:.1f}%, mean rank {an['mean_rank']:.1f}, median {an['median_rank']:.0f} "
                    f"(chance ≈ {an['chance_rank']:.0f}).</p>"
                    + _table(["query", "expected", "rank", "top 3"],
                             [[x["query"], token_label(x["expected"]), x["rank"], " ".join(token_label(t) for t in x["top"])]
                              for x in an["examples"]]))
        rows = [[token_label(ch)] + [f"{token_label(c)} {s:.2f}" for c, s in nb] for ch, nb in sec["neighbours"].items()]
        if sec.get("subset_rule"):
            out += (f"<p class='note'>Large vocabulary: neighbour lists, analogies and the PCA map use {e(sec['subset_rule'])}. "
                    "Neighbours are searched among all tokens; analogy answers are ranked within the subset. "
                    "The PCA itself is of every token's embedding.</p>")
        what = "of the tokens above" if sec.get("subset_rule") else "of every token"
        out += f"<details><summary>cosine nearest neighbours {what}</summary>{_table(['token', '1', '2', '3', '4', '5'], rows)}</details>"
        return out
    if name == "probes":
        L = len(sec["logit_lens"]["loss"])
        rows = [[n + f" ({v['metric']})"] + [f"{r['score']:.3f}" for r in v["per_layer"]] for n, v in sec["probes"].items()]
        rows.append(["logit-lens loss"] + [f"{x:.3f}" for x in sec["logit_lens"]["loss"]])
        rows.append(["logit-lens accuracy"] + [f"{x:.3f}" for x in sec["logit_lens"]["accuracy"]])
        return (f"<p>Ridge probes (λ = {sec['lam']}) solved in closed form from the regularized normal equation "
                f"(XᵀX + λI)B = XᵀY on {sec['n_tokens']} validation tokens"
                + (f" ({sec['n_windows']} windows of {sec['window']})" if "window" in sec else "") +
                ", scored on a held-out quarter. "
                "Column l is the residual stream after l blocks (0: embeddings).</p>"
                + _table(["readout"] + [str(i) for i in range(L)], rows))
    if name == "lowrank":
        b = sec["smallest_within_tolerance"]
        white = bool(sec["curve"]) and "whitened_loss" in sec["curve"][0]
        rows = [[f"{r['rank_fraction']:.3f}", f"{r['param_fraction']:.3f}", f"{r['loss']:.4f}", f"{100 * r['relative_increase']:+.2f}%"]
                + ([f"{r['whitened_loss']:.4f}", f"{100 * r['whitened_relative_increase']:+.2f}%"] if white else [])
                for r in sec["curve"]]
        head = (f"<p>Base loss {sec['base_loss']:.4f} on {sec['n_tokens']} validation tokens, "
                f"{len(sec['curve'])} rank fractions. " +
                (f"Smallest rank within {100 * sec['tolerance']:.0f}%: {100 * b['rank_fraction']:.1f}% of each matrix's rank "
                 f"({100 * b['param_fraction']:.1f}% of the block parameters).</p>" if b else "No truncation stays within tolerance.</p>"))
        cols = ["rank / full rank", "params kept", "loss (SVD)", "change"] + (["loss (whitened)", "change"] if white else [])
        note = (f"<p class='note'>Whitened: each layer's factors minimize its output error on {sec['calib_tokens']} "
                "calibration tokens of the training text (Cholesky S of XᵀX, SVD of W S, triangular solve back; "
                "tinylm/lowrank/compress.py). Same ranks, so the same parameters kept.</p>") if white else ""
        samples = ""
        if sec.get("samples"):
            label = lambda s: "dense" if s["model"] == "dense" else f"{s['model']}, rank {s['rank_fraction']:.3g} of full"
            samples = "<h4>Samples (same seed, temperature 0.8)</h4>" + "".join(
                f"<p><b>{e(label(s))}</b></p><pre>{e(s['text'])}</pre>" for s in sec["samples"])
        return head + _table(cols, rows) + note + samples
    if name == "curvature":
        rows = [["top eigenvalues of H", ", ".join(f"{v:.4g}" for v in sec["eigenvalues"])],
                ["2 / peak learning rate", _num(sec["gd_threshold_2_over_lr"], "{:.4g}")],
                ["2 / learning rate at this step", _num(sec["gd_threshold_at_step"], "{:.4g}")]]
        if "adam_preconditioned_top" in sec:
            rows += [["top eigenvalue of P^-½ H P^-½ (Adam)", f"{sec['adam_preconditioned_top']:.4g}"],
                     ["(2 + 2β₁) / ((1 − β₁) lr)", _num(sec["adam_threshold"], "{:.4g}")]]
        return (_table(["quantity", "value"], rows) +
                f"<p class='note'>On one fixed batch of {sec['batch_tokens']} tokens, float64, {sec['n_params']:,} parameters. "
                "2/η is the edge of stability of plain gradient descent. The model was trained with AdamW, whose step "
                "is preconditioned by P = √v̂ + ε: the raw Hessian may exceed 2/η without instability; the comparable quantity is "
                "the top eigenvalue of the preconditioned Hessian against (2 + 2β₁)/((1 − β₁)η) (Cohen et al. 2022).</p>")
    if name == "training":
        if not sec["metrics"]:
            return f"<p class='note'>{_flags_html(sec['note'])}</p>"
        rows = [[r.get("step"), _num(r.get("train_loss"), "{:.4f}"), _num(r.get("val_loss"), "{:.4f}"),
                 _num(r.get("lr"), "{:.2e}"), _num(r.get("tokens_per_s"), "{:.0f}")] for r in sec["metrics"]]
        note = "" if sec["spectra"] else ("<p class='note'>" + _flags_html("No spectra.jsonl: train with --track_spectra true "
                                                                          "to see spectra during training.") + "</p>")
        return _table(["step", "train loss", "val loss", "lr", "tokens/s"], rows) + note
    return ""


def section_figures(name, sec, results):
    if name == "spectra":
        return spectra_figures(sec)
    if name == "circuits":
        return circuits_figures(sec, results["chars"], results["prompt"], results.get("prompt_tokens"))
    if name == "ablation":
        return ablation_figures(sec)
    if name == "embeddings":
        return embeddings_figures(sec)
    if name == "probes":
        return probes_figures(sec)
    if name == "lowrank":
        return lowrank_figures(sec)
    if name == "curvature":
        return curvature_figures(sec)
    if name == "training":
        return training_figures(sec) if sec["metrics"] or sec["spectra"] else []
    return []


def write_html(results, path, figures=True):
    """A self-contained page: one section per analysis, naming its concepts and the code that computes it."""
    e = html.escape
    cfg = results["config"]
    try:         # the tour beside the code, from where the page is written (an absolute path on another drive)
        tour_href = os.path.relpath(TOUR_PATH, os.path.dirname(os.path.abspath(path))).replace(os.sep, "/")
    except ValueError:
        tour_href = TOUR_PATH
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>tinylm analysis</title><style>{CSS}</style></head><body>",
             f"<h1>tinylm analysis of {e(results['checkpoint'])}</h1>",
             f"<p>Step {e(str(results.get('step')))}; model: {e(', '.join(f'{k}={v}' for k, v in cfg.items()))}; "
             f"{results['n_params']:,} parameters.</p>"]
    if scale_note(results):
        parts.append(f"<p class='note'>{_flags_html(scale_note(results))}</p>")
    if not figures:
        parts.append("<p class='note'>Figures need matplotlib: <code>pip install -e '.[plot]'</code>, then run the command again.</p>")
    parts.append("<ul>" + "".join(f"<li><a href='#{n}'>{e(SECTIONS[n][0])}</a></li>" for n in SECTION_NAMES if n in results) + "</ul>")
    for name in SECTION_NAMES:
        if name not in results:
            continue
        title, concepts, where = SECTIONS[name]
        sec = results[name]
        parts.append(f"<section id='{name}'><h2>{e(title)}</h2>"
                     f"<p class='where'>Concepts: {e(concepts)}. Computed by <code>{e(where)}</code>.</p>")
        parts.append(_section_tables(name, sec, results))
        if figures:
            for caption, b64 in section_figures(name, sec, results):
                parts.append(f"<figure><img alt='{e(caption.split('. What to notice:')[0])}' src='data:image/png;base64,{b64}'>"
                             f"<figcaption>{_caption_html(caption, tour_href)}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts))
