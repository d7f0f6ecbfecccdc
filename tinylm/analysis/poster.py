"""The poster: one picture of the seven concepts of the README's table, each panel drawn from the user's own model.

`poster_data` computes every number with the analysis modules (no matplotlib needed);
`draw_panel` draws one concept into a matplotlib axis; `draw_poster` puts the seven
panels and a caption into one 2×4 image. docs/make_figures.py draws the same panels one
per file for the tour, so the docs show exactly what `analyze.py CKPT --poster FILE` gives.
"""
import math
import os
import warnings

import numpy as np

from tinylm.errors import TinyLMError
from tinylm.core.arch import arch_of, model_of
from tinylm.analysis.circuits import attention_for_prompt
from tinylm.analysis.embeddings import case_analogies, embedding_pca, head_subspace_overlaps, token_label
from tinylm.analysis.probes import probe_targets, run_probes
from tinylm.analysis.scale import MAX_PROMPT, token_labels
from tinylm.analysis.spectra import esd, fit_power_law, singular_values, stable_rank
from tinylm.analysis.weight_spectra import init_like
from tinylm.analysis.weights import block_matrix, embedding, kind_of, weight_matrices
from tinylm.analysis.textdata import fixed_windows, resolve_data_path, validation_ids
from tinylm.analysis.interventions import trace_forward

# The seven concepts, in the README's order; every panel title starts with one of these.
CONCEPTS = ("1 vectors", "2 matrices", "3 linear maps", "4 inner products", "5 orthogonality",
            "6 linear systems", "7 SVD")
# The matrix of panel 3 (layer 0's query projection W_Q (C, C)); panel 2 shows W_Q, W_K, W_V side by side.
MATRIX = "h0.attn.q"
PLOT_HINT = "the poster needs matplotlib: pip install -e '.[plot]'"


def _validation_windows(tok, meta, config, data, n_seq):
    train_args = meta.get("train_args") or {}
    val = validation_ids(tok, resolve_data_path(meta, data), train_args.get("encoding_errors", "strict"))
    return fixed_windows(val, config.block_size, n_seq, seed=0)


def poster_data(ckpt, data=None, prompt="ROMEO:\nBut soft, what light through yonder window breaks?", n_seq=32):
    """Everything the seven panels show, computed by the analysis modules.   ckpt: load_checkpoint's dict -> dict

    data: the text file for the probe (default: the run's own, its validation split); prompt: the text
    whose attention is drawn; n_seq: validation windows of block_size tokens for the probe.
    """
    params, config, tok, meta = ckpt["params"], ckpt["config"], ckpt["tokenizer"], ckpt["meta"]
    chars = token_labels(tok, config.vocab_size)
    wte = np.asarray(embedding(params, config), dtype=np.float64)
    d = {"config": config, "step": meta.get("step"), "best_val_loss": meta.get("best_val_loss"), "chars": chars}

    # 1 vectors: the characters' embedding map and the case analogy 'x' - 'X' + 'Y' ≈ 'y'
    # Beside every number that claims structure, the same number for the same model at initialization
    # (init_like: the run's seed, before step 1): what training made, not what any random model shows.
    init, _ = init_like(config, meta)
    d["pca_map"] = embedding_pca(wte, 2)["projections"]
    d["analogies"] = case_analogies(wte, chars)
    d["analogies_init"] = case_analogies(np.asarray(embedding(init, config), dtype=np.float64), chars)

    # 2 matrices and 3 linear maps: one weight matrix, its size in the model, its stretch factors
    W = np.asarray(weight_matrices(params, config)[MATRIX], dtype=np.float64)
    W0 = np.asarray(weight_matrices(init, config)[MATRIX], dtype=np.float64)
    batch = int((meta.get("train_args") or {}).get("batch_size", 12))
    qkv = [np.asarray(block_matrix(params, config, 0, "attn." + p), dtype=np.float64) for p in "qkv"]
    d.update(matrix=np.concatenate(qkv), matrix_rows=[len(M) for M in qkv],
             matrix_name="c_attn" if arch_of(config) == "gpt2" else "q_proj, k_proj, v_proj",
             n_params=model_of(config).count_params(config), flops=model_of(config).matmul_flops(config, batch), batch_size=batch,
             sv=singular_values(W), sv_init=singular_values(W0), stable_rank=stable_rank(W), stable_rank_init=stable_rank(W0))

    # 4 inner products: the attention weights softmax(q·k/√d) of the sharpest head on the prompt
    try:
        ids = tok.encode(prompt)[-min(config.block_size, MAX_PROMPT):]     # the tokens attention_for_prompt draws
    except TinyLMError:
        raise TinyLMError("--prompt has characters outside the model's vocabulary") from None
    if len(ids) < 2:
        raise TinyLMError("--prompt must have at least two characters")
    att = attention_for_prompt(params, config, ids)                 # (L, H, T, T)
    top = att.max(axis=-1).mean(axis=-1)                             # mean over queries of the largest weight
    layer, head = np.unravel_index(np.argmax(top), top.shape)
    top_init = attention_for_prompt(init, config, ids).max(axis=-1).mean(axis=-1)
    d.update(attention=att[layer, head], attention_head=(int(layer), int(head)), attention_top=float(top[layer, head]),
             attention_top_init=float(top_init.max()), prompt_labels=[token_label(chars[i]) for i in ids])

    # 5 orthogonality: principal angles between the subspaces the heads read from
    d["subspaces"] = head_subspace_overlaps(params, config)

    # 6 linear systems: a least-squares probe for the previous character, after every layer
    x, y = _validation_windows(tok, meta, config, data, n_seq)
    targets = probe_targets(x, y, chars)
    previous = next(k for k in targets if k.startswith("previous"))   # "previous character" (or token, for BPE)
    for key, p in (("probe", params), ("probe_init", init)):
        residuals = trace_forward(p, config, x)["residual"]
        d[key] = run_probes(residuals, {previous: targets[previous]})[previous]["per_layer"]
    d["probe_chance"] = 1.0 / config.vocab_size

    # 7 eigendecomposition and SVD: the ESD of every whole matrix, its power-law tail
    fits = {}
    for name, M in weight_matrices(params, config).items():
        fits[name] = fit_power_law(esd(M))
    alphas = [f["alpha"] for f in fits.values() if np.isfinite(f["alpha"])]
    init_mats = weight_matrices(init, config)
    alphas_init = [a for a in (fit_power_law(esd(M))["alpha"] for M in init_mats.values()) if np.isfinite(a)]
    shown = f"h{config.n_layer - 1}.{kind_of(config, 'mlp in')}"   # the MLP's input: the most eigenvalues
    d.update(alpha_median=float(np.median(alphas)) if alphas else math.nan, n_fits=len(alphas),
             alpha_median_init=float(np.median(alphas_init)) if alphas_init else math.nan,
             esd_name=shown, esd=esd(weight_matrices(params, config)[shown]), esd_fit=fits[shown],
             esd_init=esd(init_mats[shown]))
    return d


def panel_titles(d):
    """The seven panel titles: the concept, then the number that matters on this model."""
    an = d["analogies"]
    analogy = (f"'x'−'X'+'Y' ≈ 'y' top-1 {100 * an['top1_accuracy']:.0f}% (init {100 * d['analogies_init']['top1_accuracy']:.0f}%)"
               if an.get("n") else "no letter pairs")
    L, H = d["attention_head"]
    sub = d["subspaces"]
    iu = np.triu_indices(len(sub["labels"]), 1)
    apart = ~np.asarray(sub["same_kv_head"])[iu]                    # pairs sharing a K/V head read one subspace: left out
    iu = (iu[0][apart], iu[1][apart])
    probe = [r["score"] for r in d["probe"]]
    probe_init = [r["score"] for r in d["probe_init"]]
    return [
        f"{CONCEPTS[0]}: {analogy}",
        f"{CONCEPTS[1]}: {d['n_params'] / 1e6:.2f}M params, {d['flops']['per_step'] / 1e9:.1f} GFLOP/step",
        f"{CONCEPTS[2]}: stable rank {d['stable_rank']:.1f} (init {d['stable_rank_init']:.0f})",
        f"{CONCEPTS[3]}: L{L}H{H} top weight {d['attention_top']:.2f} (init {d['attention_top_init']:.2f})",
        f"{CONCEPTS[4]}: heads' overlap {np.mean(sub['read'][iu]):.2f} (random {sub['random_baseline']:.2f})",
        f"{CONCEPTS[5]}: probe accuracy {100 * probe[0]:.0f}% → {100 * max(probe):.0f}% (init {100 * max(probe_init):.0f}%)",
        f"{CONCEPTS[6]}: alpha {d['alpha_median']:.2f} (median of {d['n_fits']}; init {d['alpha_median_init']:.1f})",
    ]


def _panel_vectors(ax, d):
    xy, chars = d["pca_map"], d["chars"]
    ax.scatter(xy[:, 0], xy[:, 1], s=0)
    for (px, py), ch in zip(xy, chars):
        ax.text(px, py, token_label(ch), fontsize=8, ha="center", va="center",
                color="C3" if ch.isupper() else ("C0" if ch.isalpha() else "0.35"))
    ax.set_xlabel("PC 1 (red: upper case, blue: lower case)")
    ax.set_ylabel("PC 2")


def _panel_matrix(ax, d):
    W = d["matrix"].T                        # W_Q, W_K, W_V stacked (C + 2·Hkv·D, C), transposed: a row per input dimension
    C = W.shape[0]
    lim = np.quantile(np.abs(W), 0.99)
    ax.imshow(W, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest", aspect="auto")
    ends = np.cumsum(d["matrix_rows"])
    for end in ends[:-1]:
        ax.axvline(end - 0.5, color="k", lw=0.8)
    ax.set_xticks(ends - np.asarray(d["matrix_rows"]) / 2)
    ax.set_xticklabels(["W_Qᵀ", "W_Kᵀ", "W_Vᵀ"], fontsize=8)
    ax.set_xlabel(f"layer 0's {d['matrix_name']}, transposed: {C} × {W.shape[1]}")
    ax.set_ylabel(f"input dimension ({C})")


def _panel_stretch(ax, d):
    r = np.arange(1, len(d["sv"]) + 1)
    ax.semilogy(r, d["sv"], "-", color="C0", lw=1.5, label="trained")
    ax.semilogy(r, d["sv_init"], "--", color="0.5", lw=1, label="at init")
    ax.set_xlabel("i")
    ax.set_ylabel("σᵢ = how far W stretches vᵢ")
    ax.legend(fontsize=7, frameon=False)


def _panel_attention(ax, d):
    A, labels = d["attention"], d["prompt_labels"]
    ax.imshow(A, cmap="Blues", vmin=0, vmax=max(float(A.max()), 1e-9), interpolation="nearest")
    step = max(1, math.ceil(len(labels) / 16))
    ticks = range(0, len(labels), step)
    ax.set_xticks(list(ticks))
    ax.set_xticklabels([labels[i] for i in ticks], fontsize=5)
    ax.set_yticks(list(ticks))
    ax.set_yticklabels([labels[i] for i in ticks], fontsize=5)
    ax.set_xlabel("key")
    ax.set_ylabel("query")


def _panel_orthogonality(ax, d):
    sub = d["subspaces"]
    ax.imshow(sub["read"], vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    n = len(sub["labels"])
    step = max(1, n // 8)
    ax.set_xticks(range(0, n, step))
    ax.set_xticklabels(sub["labels"][::step], rotation=90, fontsize=6)
    ax.set_yticks(range(0, n, step))
    ax.set_yticklabels(sub["labels"][::step], fontsize=6)
    ax.set_xlabel("mean cos² of principal angles, read subspaces", fontsize=8)


def _panel_probe(ax, d):
    acc = [r["score"] for r in d["probe"]]
    major = [r["majority"] for r in d["probe"]]
    ax.plot(range(len(acc)), acc, "o-", color="C2", label="held-out accuracy")
    ax.plot(range(len(acc)), [r["score"] for r in d["probe_init"]], "--", color="0.5", lw=1, label="same probe at init")
    ax.plot(range(len(acc)), major, ":", color="0.5", label="most frequent class")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(range(len(acc)))
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("reads the previous character")
    ax.legend(fontsize=7, frameon=False, loc="lower right")


def _panel_spectrum(ax, d):
    ev = d["esd"][d["esd"] > 0]
    fit = d["esd_fit"]
    bins = np.logspace(np.log10(ev.min()), np.log10(ev.max()), 24)
    counts, edges = np.histogram(ev, bins=bins, density=True)
    ax.stairs(counts, edges, fill=True, color="C0", alpha=0.5, label=f"ESD of {d['esd_name']}")
    ev0 = d["esd_init"][d["esd_init"] > 0]
    counts0, edges0 = np.histogram(ev0, bins=np.logspace(np.log10(ev0.min()), np.log10(ev0.max()), 12), density=True)
    ax.stairs(counts0, edges0, color="0.4", lw=1, label="the same at init")
    if np.isfinite(fit["alpha"]):
        lam = np.logspace(np.log10(fit["xmin"]), np.log10(ev.max()), 30)
        frac = fit["n_tail"] / len(ev)       # the tail's share of the density
        ax.plot(lam, frac * (fit["alpha"] - 1) / fit["xmin"] * (lam / fit["xmin"]) ** -fit["alpha"], "r-", lw=1.5,
                label=f"λ^-α, α = {fit['alpha']:.2f}")
        ax.axvline(fit["xmin"], color="r", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue λ of WᵀW (σ²)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7, frameon=False, loc="upper right")


PANELS = (_panel_vectors, _panel_matrix, _panel_stretch, _panel_attention, _panel_orthogonality, _panel_probe,
          _panel_spectrum)


def draw_panel(ax, i, d, title=True):
    """Draw concept i (0..6) into a matplotlib axis; return its title."""
    t = panel_titles(d)[i]
    PANELS[i](ax, d)
    ax.tick_params(labelsize=7)
    if title:
        ax.set_title(t, fontsize=9, loc="left")
    return t


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise TinyLMError(PLOT_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def draw_poster(d, path, dpi=80, source=""):
    """The seven panels in a 2×4 grid, the eighth cell a caption; write a PNG to path.   -> the seven titles"""
    plt = _plt()
    fig, axes = plt.subplots(2, 4, figsize=(17, 8.4))
    fig.subplots_adjust(left=0.045, right=0.99, bottom=0.08, top=0.9, wspace=0.32, hspace=0.38)
    titles = [draw_panel(ax, i, d) for i, ax in enumerate(axes.ravel()[:7])]
    cap = axes.ravel()[7]
    cap.axis("off")
    c = d["config"]
    loss = d.get("best_val_loss")
    kv = f" ({c.n_kv_head} K/V)" if arch_of(c) == "llama" and c.n_kv_head < c.n_head else ""
    lines = [f"{'a Llama' if arch_of(c) == 'llama' else 'GPT-2'}: {c.n_layer} layers, {c.n_head} heads{kv},",
             f"{c.n_embd} wide, context {c.block_size}, {c.vocab_size} tokens,",
             f"{d['n_params']:,} parameters",
             f"step {d['step']}" + (f", best val loss {loss:.4f}" if isinstance(loss, (int, float)) else ""),
             "", "every panel is computed from",
             "these weights by tinylm.analysis;", "docs/tour.md explains each one.", "",
             "python analyze.py CKPT --poster FILE"]
    cap.text(0.02, 0.95, "\n".join(lines), va="top", fontsize=10.5, family="monospace", transform=cap.transAxes)
    fig.suptitle("The linear algebra inside this language model" + (f": {source}" if source else ""),
                 fontsize=15, x=0.01, ha="left")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with warnings.catch_warnings():     # a log axis of all-zero values (a model of zero weights) stays empty
        warnings.filterwarnings("ignore", message="Data has no positive values")
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return titles


def make_poster(ckpt, path, data=None, prompt=None, source=""):
    """poster_data then draw_poster: the poster of a loaded checkpoint, written to path.   -> the seven titles"""
    _plt()          # fail before the work if matplotlib is missing
    kw = {} if prompt is None else {"prompt": prompt}
    return draw_poster(poster_data(ckpt, data, **kw), path, source=source)
