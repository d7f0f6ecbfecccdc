"""The tour as a notebook: docs/tour.ipynb is exactly what docs/make_notebook.py makes from docs/tour.md, it
holds every word and snippet of the tour, and it runs top to bottom in a Jupyter kernel (nbclient), training
its own model first as a reader's would when there is none."""
import json
import os
import re
import runpy
import time

import pytest

from conftest import ROOT

TOUR = os.path.join(ROOT, "docs", "tour.md")
NOTEBOOK = os.path.join(ROOT, "docs", "tour.ipynb")


def converter():
    return runpy.run_path(os.path.join(ROOT, "docs", "make_notebook.py"), run_name="make_notebook")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def cells():
    return [(c["cell_type"], "".join(c["source"])) for c in json.loads(read(NOTEBOOK))["cells"]]


def test_the_notebook_is_what_the_converter_makes_from_the_tour(capsys):
    make = converter()
    assert read(NOTEBOOK) == make["expected"](), (
        "docs/tour.ipynb is not what docs/tour.md makes: edit tour.md, then run python docs/make_notebook.py "
        "(a notebook saved with its outputs differs too)")
    assert make["main"](["--check"]) == 0 and "is current" in capsys.readouterr().out


def test_the_notebook_holds_every_word_and_snippet_of_the_tour_in_order():
    tour, make = read(TOUR), converter()
    snippets = [s.strip("\n") for s in re.findall(r"```python\n(.*?)```", tour, re.S)]
    code = [src for kind, src in cells() if kind == "code"]
    setup, figures = code[0], [c for c in code if c.startswith("# Figure ")]
    assert "out/ckpt.npz" in setup and "train(" in setup and "%matplotlib inline" in setup
    assert [c for c in code[1:] if c not in figures] == snippets
    # the seven concept figures, each drawn again right after the default model's picture of it
    assert [int(re.match(r"# Figure (\d)", c).group(1)) for c in figures] == list(range(1, 8))
    order = cells()
    for i, (kind, src) in enumerate(order):
        if src in figures:
            n = src.split()[2]
            assert order[i - 1][0] == "markdown" and re.search(rf"\(figures/{n}_\w+\.png\)\s*$", order[i - 1][1])
    # the text: the tour less its python blocks, word for word, and the note that opens the notebook
    words = lambda s: s.split()
    markdown = "\n".join(src for kind, src in order if kind == "markdown")
    assert words(markdown.replace(make["NOTE"], "")) == words(re.sub(r"```python\n.*?```", " ", tour, flags=re.S))


def test_the_notebook_is_valid_nbformat_4():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


# The first cell trains the default model's shape for 300 steps when out/ckpt.npz is missing (half a minute).
# Here a cell put before it makes that model smaller, the test suite's usual small model; the notebook itself
# then runs unchanged, in an empty folder, as a reader's would on a first visit.
SMALLER = '''\
import tinylm.train.loop as loop
_TrainArgs = loop.TrainArgs
loop.TrainArgs = lambda **kw: _TrainArgs(**{**kw, "n_layer": 2, "n_head": 2, "n_embd": 48, "block_size": 32,
                                          "batch_size": 16, "eval_iters": 5, "warmup_iters": 20,
                                          "learning_rate": 3e-3, "progress": False})'''


def test_the_notebook_runs_top_to_bottom_and_trains_its_model_first(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    from nbclient import NotebookClient
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(SMALLER))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    client.execute()                   # raises CellExecutionError, with the cell and its traceback, if one fails
    elapsed = time.perf_counter() - t0
    print(f"the notebook ran top to bottom in {elapsed:.1f}s")
    assert (tmp_path / "out" / "ckpt.npz").exists()
    code = [c for c in nb.cells[1:] if c.cell_type == "code"]
    text = lambda c: "".join(o.get("text", "") for o in c.outputs if o.output_type == "stream" and o.name == "stdout")
    images = lambda c: [o for o in c.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert "No out/ckpt.npz: training a small model" in text(code[0])
    figures = [c for c in code if c.source.startswith("# Figure ")]
    assert len(figures) == 7 and all(len(images(c)) == 1 for c in figures)
    for c in code[1:]:
        if c not in figures:           # every snippet prints the number that matters, as tests/test_docs.py asks
            assert text(c).strip() and "nan" not in text(c).lower(), c.source[:200]
    assert elapsed < 120, elapsed
