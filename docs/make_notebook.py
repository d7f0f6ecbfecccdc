"""Make docs/tour.ipynb from docs/tour.md:  python docs/make_notebook.py  (--check: only say whether it is current)

The tour has one source, the markdown; the notebook is made from it, so their text and code cannot drift
apart (tests/test_notebook.py fails when tour.ipynb is not what this script makes from tour.md). The
notebook is plain nbformat 4 JSON, written with the json module:

- every ```python block of the tour becomes a code cell, the text around it markdown cells (cut at each
  heading and after each figure; the other fenced blocks, shell commands and printed output, stay text);
- a first code cell goes to the repository's root (Jupyter starts in docs/) and, when there is no
  out/ckpt.npz yet, trains a small model into out/, so that every cell below has a model to read (and a
  small Llama into out-llama/, which section 8 reads);
- after each of the seven concept figures (figures/1_vectors.png ... 7_svd.png, the default model's) a
  code cell draws the same figure from the reader's own model, inline: the poster's panel,
  tinylm.analysis.poster.draw_panel, as docs/make_figures.py draws it into a file.

Edit tour.md, never tour.ipynb, then run this script.
"""
import argparse
import json
import os
import re
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
TOUR_MD = os.path.join(DOCS, "tour.md")
TOUR_IPYNB = os.path.join(DOCS, "tour.ipynb")

# The steps the first cell trains when there is no checkpoint: the default model's shape (every shape the
# tour names holds), trained for a seventh of the default 2,000 steps.
SMALL_STEPS = 300

NOTE = (f"*This notebook is made from [tour.md](tour.md) by [make_notebook.py](make_notebook.py); edit the "
        f"markdown, not this file. Run the first code cell first: it moves to the repository's root and, if "
        f"`out/ckpt.npz` is not there yet, trains a small model into `out/` ({SMALL_STEPS} steps, about half a "
        f"minute on two cores), and a small Llama into `out-llama/` for section 8 when that is missing. The numbers the tour quotes come from the default model (`python train.py`, 2,000 steps); on "
        f"the small one every cell runs the same, and its numbers differ. After each concept's figure a cell "
        f"draws the same figure from your model.*")

SETUP = f'''\
# Run me first. The tour's snippets run from the repository's root and read out/ckpt.npz.
%matplotlib inline
import os
import sys

if os.path.isfile("tour.md") and os.path.isdir(os.path.join("..", "tinylm")):   # Jupyter starts in docs/
    os.chdir("..")
sys.path.insert(0, os.getcwd())              # tinylm and benchmarks/ import from here, installed or not

from functools import cache
from tinylm.analysis.poster import poster_data
from tinylm.io.checkpoint import load_checkpoint
from tinylm.train.loop import TrainArgs, train

if not os.path.exists("out/ckpt.npz"):
    print("No out/ckpt.npz: training a small model into out/ ({SMALL_STEPS} steps of the default model's shape, "
          "about half a minute). Its numbers will differ from the tour's, which come from the default model "
          "(python train.py: 2,000 steps, validation loss 1.8918).")
    train(TrainArgs(out_dir="out", max_iters={SMALL_STEPS}, lr_decay_iters={SMALL_STEPS}, eval_interval=100, sample_tokens=0),
          log=print)
if not os.path.exists("out-llama/ckpt.npz"):     # section 8 reads a Llama beside the GPT-2
    print("No out-llama/ckpt.npz: training a small Llama into out-llama/ ({SMALL_STEPS} steps, two K/V heads; the tour's "
          "numbers come from python train.py --arch llama --n_kv_head 2 --out_dir out-llama, 2,000 steps).")
    train(TrainArgs(out_dir="out-llama", arch="llama", n_kv_head=2, max_iters={SMALL_STEPS},
                    lr_decay_iters={SMALL_STEPS}, eval_interval=100, sample_tokens=0), log=print)
print("the model:", os.path.abspath("out/ckpt.npz"))


@cache
def your_model():
    """What the seven figures show, computed once from out/ckpt.npz (tinylm.analysis.poster.poster_data)."""
    return poster_data(load_checkpoint("out/ckpt.npz"))'''

FIGURE = '''\
# Figure {n} again, drawn from your model: the poster's panel {n} (analyze.py --poster draws all seven)
import matplotlib.pyplot as plt
from tinylm.analysis.poster import draw_panel

fig, ax = plt.subplots(figsize=(5.4, 4.0))
draw_panel(ax, {i}, your_model())
plt.show()'''

CONCEPT_FIGURE = re.compile(r"!\[[^\]]*\]\(figures/([1-7])_\w+\.png\)")


def blocks(text):
    """The tour as [(kind, text)]: kind "markdown" or "python", in order; fences other than ```python stay markdown."""
    out, lines, fence = [], [], None          # fence: the open fence's language, "" for a bare ```
    code = []
    for line in text.split("\n"):
        if fence is None and line.startswith("```python"):
            fence = "python"
            out.append(("markdown", "\n".join(lines)))
            lines = []
        elif fence == "python" and line.startswith("```"):
            fence = None
            out.append(("python", "\n".join(code)))
            code = []
        elif fence == "python":
            code.append(line)
        else:
            if line.startswith("```"):
                fence = None if fence is not None else line[3:].strip()
            lines.append(line)
    assert fence is None, "tour.md ends inside a fenced block"
    out.append(("markdown", "\n".join(lines)))
    return out


def markdown_cells(text):
    """One markdown block cut into cells: before each heading (outside fences) and after each figure line."""
    cells, current, fenced = [], [], False
    for line in text.split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("#") and current:
            cells.append(current)
            current = []
        current.append(line)
        if not fenced and line.startswith("!["):
            cells.append(current)
            current = []
    cells.append(current)
    return [s for s in ("\n".join(c).strip("\n") for c in cells) if s.strip()]


def cell(kind, source, index):
    """A cell of nbformat 4.5: the source as Jupyter writes it, a list of lines; a stable id from its position."""
    lines = source.split("\n")
    c = {"cell_type": kind, "id": f"tour-{index:03d}", "metadata": {},
         "source": [line + "\n" for line in lines[:-1]] + [lines[-1]]}
    if kind == "code":
        c.update(execution_count=None, outputs=[])
    return c


def build(tour):
    """tour.md's text -> the notebook, a dict of nbformat 4.5."""
    parts = []
    for kind, text in blocks(tour):
        if kind == "python":
            parts.append(("code", text.strip("\n")))
            continue
        for md in markdown_cells(text):
            parts.append(("markdown", md))
            figure = CONCEPT_FIGURE.search(md)
            if figure:
                n = int(figure.group(1))
                parts.append(("code", FIGURE.format(n=n, i=n - 1)))
    title, rest = parts[0], parts[1:]
    assert title[0] == "markdown" and title[1].startswith("# "), "tour.md opens with its title"
    head, _, intro = title[1].partition("\n")
    parts = [("markdown", head + "\n\n" + NOTE), ("code", SETUP)] + ([("markdown", intro.strip("\n"))] if intro.strip() else []) + rest
    return {"cells": [cell(kind, source, i) for i, (kind, source) in enumerate(parts)],
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                         "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def dumps(nb):
    """The notebook's file text, in Jupyter's own layout (one-space indent, sorted keys, unescaped Unicode)."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def expected():
    with open(TOUR_MD, encoding="utf-8") as f:
        return dumps(build(f.read()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if tour.ipynb is not what tour.md makes")
    a = ap.parse_args(argv)
    text = expected()
    current = open(TOUR_IPYNB, encoding="utf-8").read() if os.path.exists(TOUR_IPYNB) else None
    if a.check:
        ok = current == text
        print(f"{os.path.relpath(TOUR_IPYNB)} is {'current' if ok else 'out of date: python docs/make_notebook.py'}")
        return 0 if ok else 1
    if current != text:
        with open(TOUR_IPYNB, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    cells = json.loads(text)["cells"]
    print(f"{os.path.relpath(TOUR_IPYNB)}: {len(cells)} cells, {sum(c['cell_type'] == 'code' for c in cells)} of them code"
          + ("" if current != text else " (unchanged)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
