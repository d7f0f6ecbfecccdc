"""The tour cannot rot: every snippet of docs/tour.md runs on a small trained model, every analyze.py
command it shows runs, every link and figure it points to exists."""
import os
import re
import shutil

import pytest

from conftest import ROOT, check_markdown_links

TOUR = os.path.join(ROOT, "docs", "tour.md")


def tour():
    with open(TOUR, encoding="utf-8") as f:
        return f.read()


PY_BLOCKS = re.findall(r"```python\n(.*?)```", tour(), re.S)
SH_COMMANDS = [line.strip() for block in re.findall(r"```sh\n(.*?)```", tour(), re.S)
               for line in block.strip().splitlines()]


@pytest.fixture(scope="module")
def workdir(trained_dir, tmp_path_factory):
    """A folder whose out/ckpt.npz is the small trained model (and its metrics.jsonl)."""
    d = tmp_path_factory.mktemp("tour")
    os.makedirs(d / "out")
    for name in ("ckpt.npz", "metrics.jsonl"):
        shutil.copy(os.path.join(trained_dir["dir"], name), d / "out" / name)
    return d


def test_the_tour_has_a_snippet_per_concept_and_the_four_questions():
    assert len(PY_BLOCKS) >= 7
    text = tour()
    for n in range(1, 8):
        assert re.search(rf"^## {n} ", text, re.M), n
    for question in ("QK circuit", "25% of the rank", "Which head copies", "How sharp is the minimum"):
        assert question in text


@pytest.mark.parametrize("i", range(len(PY_BLOCKS)))
def test_python_snippet_runs(i, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    exec(compile(PY_BLOCKS[i], f"docs/tour.md snippet {i + 1}", "exec"), {"__name__": "tour"})
    out = capsys.readouterr().out
    assert out.strip(), "every snippet prints the number that matters"
    assert "nan" not in out.lower()


def test_analyze_commands_run(workdir, monkeypatch, capsys):
    pytest.importorskip("matplotlib")        # one of them draws the poster
    from tinylm.analysis.cli import analyze_main
    commands = [c for c in SH_COMMANDS if c.startswith("python analyze.py")]
    assert len(commands) >= 4
    monkeypatch.chdir(workdir)
    cheap = ["--n-boot", "0", "--eval-seqs", "8", "--hessian-k", "1", "--hessian-batch", "2", "--no-progress"]
    for command in commands:
        args = command.split()[2:]
        assert analyze_main(args + cheap) == 0, (command, capsys.readouterr().err)
        out = capsys.readouterr().out
        if "--only" in args:
            section = args[args.index("--only") + 1]
            assert out.startswith(section[:4] if section != "lowrank" else "low rank"), out
    assert (workdir / "poster.png").stat().st_size > 10_000


def test_links_and_figures_exist():
    text = tour()
    check_markdown_links(text, os.path.join(ROOT, "docs"))
    figures = re.findall(r"!\[[^\]]*\]\((figures/[\w.]+\.png)\)", text)
    assert "figures/poster.png" in figures and len(figures) >= 8
    folder = os.path.join(ROOT, "docs", "figures")
    sizes = [os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)]
    assert sum(sizes) < 1_500_000


def test_make_figures_writes_every_figure_the_tour_shows(workdir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import runpy
    mod = runpy.run_path(os.path.join(ROOT, "docs", "make_figures.py"), run_name="make_figures")
    mod["main"]([str(workdir / "out" / "ckpt.npz"), "--out", str(tmp_path)])
    shown = {os.path.basename(f) for f in re.findall(r"\(figures/([\w.]+\.png)\)", tour())}
    assert shown <= set(os.listdir(tmp_path))
