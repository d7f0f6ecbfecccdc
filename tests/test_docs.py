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
def workdir(trained_dir, shakespeare_head, tmp_path_factory):
    """A folder whose out/ckpt.npz is the small trained model (and its metrics.jsonl), and whose
    out-llama/ckpt.npz is a small Llama trained by train.py's own loop (two query heads sharing one
    K/V head, 200 steps: a few seconds), for the section that sets GPT-2 and Llama side by side."""
    from tinylm.train.args import TrainArgs
    from tinylm.train.loop import train
    d = tmp_path_factory.mktemp("tour")
    os.makedirs(d / "out")
    for name in ("ckpt.npz", "metrics.jsonl"):
        shutil.copy(os.path.join(trained_dir["dir"], name), d / "out" / name)
    args = TrainArgs(data=shakespeare_head, out_dir=str(d / "out-llama"), arch="llama", n_layer=2, n_head=2,
                     n_kv_head=1, n_embd=48, block_size=32, batch_size=16, max_iters=200, lr_decay_iters=200,
                     warmup_iters=20, eval_interval=100, eval_iters=5, learning_rate=3e-3, sample_tokens=0,
                     progress=False)
    train(args, log=lambda *a: None)
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
    from tinylm.cli.analyze import analyze_main
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


def test_make_figures_writes_every_figure_the_tour_shows_into_its_own_folder(workdir, tmp_path, monkeypatch, capsys):
    """Without --out the figures go to figures-mine/ in the current folder; docs/figures is never touched."""
    pytest.importorskip("matplotlib")
    import runpy
    folder = os.path.join(ROOT, "docs", "figures")
    before = {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)}
    mod = runpy.run_path(os.path.join(ROOT, "docs", "make_figures.py"), run_name="make_figures")
    monkeypatch.chdir(tmp_path)
    mod["main"]([str(workdir / "out" / "ckpt.npz")])
    shown = {os.path.basename(f) for f in re.findall(r"\(figures/([\w.]+\.png)\)", tour())}
    assert "0_architecture.png" in shown
    assert shown <= set(os.listdir(tmp_path / "figures-mine"))
    assert {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)} == before


def test_part_0_opens_the_tour_and_points_at_the_lines_of_the_core_model():
    text = tour()
    heads = re.findall(r"^## (\d) ", text, re.M)
    assert heads[:8] == [str(n) for n in range(8)], heads
    part0 = text.split("## 0 What the model computes", 1)[1].split("## 1 ", 1)[0]
    assert "```python" in part0 and "figures/0_architecture.png" in part0
    lines = {}
    for name in ("gpt2", "layers"):
        with open(os.path.join(ROOT, "tinylm", "core", name + ".py"), encoding="utf-8") as f:
            lines[name] = f.read().splitlines()
    links = re.findall(r"\[lines? (\d+)(?:–(\d+))?\]\(\.\./tinylm/core/(gpt2|layers)\.py#L(\d+)\)", part0)
    assert len(links) >= 6
    for first, last, name, anchor in links:
        assert first == anchor and int(last or first) <= len(lines[name]), (first, last, anchor)
    # Each equation of the model is linked at the line that holds it (if core moves, so must the tour).
    for name, code in (("gpt2", "L.embedding_forward(idx"), ("gpt2", "block_forward(P, config, block_prefix(i), x)"),
                       ("gpt2", 'h, c["ln_1"] = layernorm'), ("gpt2", 'h, c["ln_2"] = layernorm'),
                       ("gpt2", 'cache["ln_f"] = layernorm'), ("gpt2", "def backward("), ("gpt2", "def block_backward("),
                       ("layers", "scores = np.where(future"), ("layers", "logp = z - np.log")):
        n = next(i + 1 for i, line in enumerate(lines[name]) if code in line)
        assert (name, n) in {(f, int(a)) for _, _, f, a in links}, (code, n)


GLOSSARY = os.path.join(ROOT, "docs", "glossary.md")
TERMS = ("Residual stream", "Logit", "Logit lens", "QK circuit and OV circuit", "Copying score", "Induction head",
         "ESD", "Marchenko-Pastur", "Power-law exponent", "Lanczos", "Stable rank", "Polar factor", "LoRA")


def slug(heading):
    """GitHub's anchor for a heading, as test_readme computes it."""
    return re.sub(r"[^\w\- ]", "", heading).strip().lower().replace(" ", "-")


def test_glossary_defines_every_term_points_at_the_code_and_the_tour_links_it():
    with open(GLOSSARY, encoding="utf-8") as f:
        text = f.read()
    check_markdown_links(text, os.path.join(ROOT, "docs"))
    entries = dict(re.findall(r"^### ([^\n]+)\n(.*?)(?=^### |\Z)", text, re.M | re.S))
    for term in TERMS:
        name = next((h for h in entries if h.startswith(term)), None)
        assert name, term
        body = entries[name]
        assert 1 <= len(re.findall(r"[.!?](?:\s|$)", body)) <= 3, (name, body)      # one to three sentences
        assert "](../tinylm/" in body, name
    anchors = set(re.findall(r"\]\(glossary\.md#([^)]+)\)", tour()))
    assert len(anchors) >= 10 and anchors <= {slug(h) for h in entries}, anchors - {slug(h) for h in entries}
