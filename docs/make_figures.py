"""Make the figures of docs/tour.md from a checkpoint:  python docs/make_figures.py out/ckpt.npz

Writes docs/figures/poster.png (what `analyze.py CKPT --poster FILE` draws), one figure per
concept (the poster's panels, one per file) and two for the closing questions. The figures in
the repository come from the default recipe: `python train.py && python docs/make_figures.py`.
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
from tinylm.analysis.weights import head_weights  # noqa: E402
from tinylm.checkpoint import load_checkpoint  # noqa: E402

DPI = 80
NAMES = ("1_vectors", "2_matrices", "3_linear_maps", "4_inner_products", "5_orthogonality", "6_linear_systems", "7_svd")


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
    axes[0].set_xlabel("i")
    axes[0].set_ylabel("σᵢ of W_QK = W_Qᵀ W_K")
    axes[0].set_title(f"QK singular values, layer 0 (solid) and {config.n_layer - 1} (dotted)", fontsize=9)
    axes[0].legend(fontsize=6, ncol=2, frameon=False)
    hw = head_weights(params, config, 0)
    for h in range(config.n_head):
        _, _, Vt = np.linalg.svd(hw["W_Q"][h].T.astype(np.float64) @ hw["W_K"][h].astype(np.float64))
        axes[1].plot((wpe - wpe.mean(0)) @ Vt[0], color=f"C{h}", lw=1.2, label=f"L0H{h}")
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
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "figures"), help="folder for the PNGs")
    a = ap.parse_args(argv)
    plt = P._plt()
    os.makedirs(a.out, exist_ok=True)
    ckpt = load_checkpoint(a.checkpoint, with_optimizer=False)
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
