"""Make the figures of docs/tour.md from a checkpoint:  python docs/make_figures.py out/ckpt.npz --out DIR

Writes into DIR (default figures-mine/, in the current folder) poster.png (what `analyze.py CKPT
--poster FILE` draws), the architecture diagram of Part 0 (0_architecture.png, its shapes from the
checkpoint's config), one figure per concept (the poster's panels, one per file) and two for the
closing questions. It never writes into docs/figures/ unless that folder is named: the figures in
the repository come from the default recipe, `python train.py && python docs/make_figures.py
out/ckpt.npz --out docs/figures`.
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tinylm.analysis import poster as P  # noqa: E402
from tinylm.analysis.circuits import head_circuits  # noqa: E402
from tinylm.analysis.lowrank import rank_sweep  # noqa: E402
from tinylm.analysis.weight_spectra import init_like  # noqa: E402
from tinylm.analysis.weights import head_weights  # noqa: E402
from tinylm.io.checkpoint import load_checkpoint  # noqa: E402

DPI = 80
NAMES = ("1_vectors", "2_matrices", "3_linear_maps", "4_inner_products", "5_orthogonality", "6_linear_systems", "7_svd")


# The rows of the architecture diagram, top to bottom: (what is computed, the shape of its result, the
# weight it uses or ""). A row whose name starts with "+" is added to the residual stream x.
ARCH_ROWS = (
    ("token ids idx", "(B, T) integers < V", ""),
    ("x = wte[idx] + wpe[:T]", "(B, T, C)", "wte (V, C), wpe (block, C)"),
    ("h = ln_1(x)", "(B, T, C)", "γ, β (C,)"),
    ("q, k, v = split(h W_attnᵀ), heads apart", "3 × (B, H, T, D)", "W_attn (3C, C)"),
    ("A = softmax(q kᵀ / √D + mask)", "(B, H, T, T)", ""),
    ("y = A v, heads side by side", "(B, T, C)", ""),
    ("+ x = x + y W_oᵀ", "(B, T, C)", "W_o (C, C)"),
    ("h = ln_2(x)", "(B, T, C)", "γ, β (C,)"),
    ("u = gelu(h W_fcᵀ)", "(B, T, 4C)", "W_fc (4C, C)"),
    ("+ x = x + u W_pᵀ", "(B, T, C)", "W_p (C, 4C)"),
    ("x = ln_f(x)", "(B, T, C)", "γ, β (C,)"),
    ("logits = x wteᵀ", "(B, T, V)", "wte (V, C), tied"),
    ("p = softmax(logits): next-token distribution", "(B, T, V)", ""),
    ("loss = −mean log p[targets]", "scalar", ""),
)


def architecture_figure(config, folder, plt):
    """Part 0's diagram: the forward of tinylm/core/gpt2.py as boxes and arrows, the shape of every array beside it."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle
    n = len(ARCH_ROWS)
    fig, ax = plt.subplots(figsize=(7.6, 8.6))
    ax.set_xlim(0, 10)
    ax.set_ylim(-1.6, n)
    ax.axis("off")
    y_of = lambda i: n - 1 - i                     # row 0 at the top
    block = [i for i, (name, _, _) in enumerate(ARCH_ROWS) if name.startswith(("h = ln_", "q,", "A =", "y =", "+", "u ="))]
    top, bottom = y_of(block[0]) + 0.5, y_of(block[-1]) - 0.5
    ax.add_patch(Rectangle((0.25, bottom), 9.55, top - bottom, fill=True, color="#f4f4f4", zorder=0))
    ax.text(9.7, top - 0.2, f"block, × L = {config.n_layer}", ha="right", va="top", fontsize=9, style="italic")
    for i, (name, shape, weight) in enumerate(ARCH_ROWS):
        y = y_of(i)
        added = name.startswith("+")
        face = "#dbe8f6" if added or i == 1 else ("#fde9d4" if i >= n - 2 else "white")
        ax.add_patch(FancyBboxPatch((1.3, y - 0.3), 4.6, 0.6, boxstyle="round,pad=0.02,rounding_size=0.12",
                                    fc=face, ec="0.3", lw=0.8, zorder=2))
        ax.text(3.6, y, name.lstrip("+ "), ha="center", va="center", fontsize=8.5, zorder=3)
        ax.text(6.05, y + (0.13 if weight else 0), shape, ha="left", va="center", fontsize=8.5, color="C3", family="monospace")
        if weight:
            ax.text(6.05, y - 0.17, weight, ha="left", va="center", fontsize=7, color="0.35", family="monospace")
        if i < n - 1:
            ax.add_patch(FancyArrowPatch((3.6, y - 0.3), (3.6, y - 0.7), arrowstyle="-|>", mutation_scale=8, lw=0.8,
                                         color="0.3", zorder=1))
    # The residual stream: x goes round each sub-layer and is added back (the two skip connections).
    adds = [i for i, (name, _, _) in enumerate(ARCH_ROWS) if name.startswith("+")]
    for k, (start, end) in enumerate(((block[0] - 1, adds[0]), (adds[0], adds[1]))):
        y0, y1, xs = y_of(start) - 0.1, y_of(end), 1.0 - 0.15 * k
        ax.plot([1.3, xs, xs], [y0, y0, y1], color="C0", lw=1.2, zorder=1)
        ax.add_patch(FancyArrowPatch((xs, y1), (1.3, y1), arrowstyle="-|>", mutation_scale=9, lw=1.2, color="C0", zorder=1))
        ax.text(1.15, y1 + 0.12, "+", color="C0", fontsize=10, ha="center", va="center", weight="bold")
    ax.text(0.55, (y_of(block[0]) + y_of(adds[-1])) / 2, "residual stream x", rotation=90, ha="center", va="center",
            fontsize=8, color="C0")
    D = config.n_embd // config.n_head
    ax.text(0.3, -0.9, f"B sequences, T ≤ {config.block_size} tokens each;  C = {config.n_embd},  H = {config.n_head} heads of "
            f"D = C/H = {D},  V = {config.vocab_size},  L = {config.n_layer}.\nRed: the shape of the result; grey: the "
            "weights (out, in); blue: the residual stream x, written and added to.  Code: tinylm/core/gpt2.py.", fontsize=7.5, va="center", color="0.2")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "0_architecture.png"), dpi=DPI)
    plt.close(fig)
    print("0_architecture.png")


def concept_figures(d, folder, plt):
    for i, name in enumerate(NAMES):
        fig, ax = plt.subplots(figsize=(5.4, 4.0))
        title = P.draw_panel(ax, i, d)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, f"{name}.png"), dpi=DPI)
        plt.close(fig)
        print(f"{name}.png  {title}")


def qk_figure(ckpt, folder, plt):
    """Why the top singular value of W_QK stands out: in layer 0 its key-side direction reads position."""
    params, config = ckpt["params"], ckpt["config"]
    wpe = np.asarray(params["transformer.wpe.weight"], dtype=np.float64)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for layer, style in ((0, "-"), (config.n_layer - 1, ":")):
        for c in head_circuits(params, config, layer):
            axes[0].semilogy(np.arange(1, len(c["qk_singular_values"]) + 1), c["qk_singular_values"], style,
                             color=f"C{c['head']}", lw=1.2, label=f"L{layer}H{c['head']}")
    init, _ = init_like(config, ckpt["meta"])                    # the same heads before training, for comparison
    for c in head_circuits(init, config, 0):
        axes[0].semilogy(np.arange(1, len(c["qk_singular_values"]) + 1), c["qk_singular_values"], "-", color="0.6",
                         lw=0.8, label="layer 0 at init" if c["head"] == 0 else None)
    axes[0].set_xlabel("i")
    axes[0].set_ylabel("σᵢ of W_QK = W_Qᵀ W_K")
    axes[0].set_title(f"QK singular values, layer 0 (solid) and {config.n_layer - 1} (dotted)", fontsize=9)
    axes[0].legend(fontsize=6, ncol=2, frameon=False)
    hw = head_weights(params, config, 0)
    for h in range(config.n_head):
        _, _, Vt = np.linalg.svd(hw["W_Q"][h].T.astype(np.float64) @ hw["W_K"][h].astype(np.float64))
        axes[1].plot((wpe - wpe.mean(0)) @ Vt[0], color=f"C{h}", lw=1.2, label=f"L0H{h}")
    hw0 = head_weights(init, config, 0)
    wpe0 = np.asarray(init["transformer.wpe.weight"], dtype=np.float64)
    _, _, Vt0 = np.linalg.svd(hw0["W_Q"][0].T.astype(np.float64) @ hw0["W_K"][0].astype(np.float64))
    axes[1].plot((wpe0 - wpe0.mean(0)) @ Vt0[0], color="0.6", lw=0.8, label="L0H0 at init")
    axes[1].set_xlabel("position t")
    axes[1].set_ylabel("(wpe[t] − mean) · v₁")
    axes[1].set_title("layer 0: position embeddings along the top key direction v₁", fontsize=9)
    axes[1].legend(fontsize=6, frameon=False)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "faq_qk.png"), dpi=DPI)
    plt.close(fig)
    print("faq_qk.png")


def lowrank_figure(ckpt, folder, plt):
    x, y = P._validation_windows(ckpt["tokenizer"], ckpt["meta"], ckpt["config"], None, 32)
    sweep = rank_sweep(ckpt["params"], ckpt["config"], [(x[i:i + 8], y[i:i + 8]) for i in range(0, len(x), 8)],
                       progress=False)
    c = sweep["curve"]
    fig, ax = plt.subplots(figsize=(5.4, 3.6))
    ax.plot([100 * r["rank_fraction"] for r in c], [r["loss"] for r in c], "o-")
    ax.axhline(sweep["base_loss"], color="0.5", ls="--", lw=0.8, label=f"full rank {sweep['base_loss']:.3f}")
    # Above ln V the compressed model is worse than a uniform guess: there the curve measures how
    # confidently a broken model is wrong, which need not fall with the rank (docs/tour.md explains).
    V = ckpt["config"].vocab_size
    ax.axhline(np.log(V), color="C3", ls=":", lw=0.8, label=f"uniform guess ln {V} = {np.log(V):.2f}")
    q = next(r for r in c if r["rank_fraction"] == 0.25)
    ax.annotate(f"25%: {q['loss']:.3f}", (25, q["loss"]), (40, q["loss"] + 1.0), fontsize=8,
                arrowprops=dict(arrowstyle="->", lw=0.7))
    ax.set_xlabel("rank kept, % of each block matrix's full rank")
    ax.set_ylabel("validation loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "faq_lowrank.png"), dpi=DPI)
    plt.close(fig)
    print(f"faq_lowrank.png  base {sweep['base_loss']:.4f}, 25% rank {q['loss']:.4f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default="out/ckpt.npz")
    ap.add_argument("--out", default="figures-mine", help="folder for the PNGs (default figures-mine/; the "
                    "repository's own are docs/figures, written only when named here)")
    a = ap.parse_args(argv)
    plt = P._plt()
    ckpt = load_checkpoint(a.checkpoint, with_optimizer=False)
    os.makedirs(a.out, exist_ok=True)
    architecture_figure(ckpt["config"], a.out, plt)
    d = P.poster_data(ckpt)
    P.draw_poster(d, os.path.join(a.out, "poster.png"), source=os.path.basename(a.checkpoint))
    print("poster.png")
    concept_figures(d, a.out, plt)
    qk_figure(ckpt, a.out, plt)
    lowrank_figure(ckpt, a.out, plt)
    total = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out) if f.endswith(".png"))
    print(f"{a.out}: {total / 1e6:.2f} MB of PNG")


if __name__ == "__main__":
    main()
