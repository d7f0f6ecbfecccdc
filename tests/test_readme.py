"""The README cannot rot: its Python snippets run, every command it shows parses (the cheap ones run on a small
model), CI runs exactly its test command, its file map names every module, and it stays short."""
import argparse
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import sys

import pytest

from conftest import ROOT, check_markdown_links

DOCS = {name: os.path.join(ROOT, *name.split("/")) for name in (
    "README.md", "docs/guide.md", "docs/results.md", "docs/performance.md", "docs/tour.md", "benchmarks/README.md",
    "tinylm/exercises/README.md")}


def read(name):
    with open(DOCS.get(name, os.path.join(ROOT, name)), encoding="utf-8") as f:
        return f.read()


def readme():
    return read("README.md")


def slug(heading):
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading).strip().lower().replace(" ", "-")


def test_python_snippets_run_on_a_trained_checkpoint(trained_dir, tmp_path, monkeypatch, capsys):
    os.makedirs(tmp_path / "out")
    shutil.copy(os.path.join(trained_dir["dir"], "ckpt.npz"), tmp_path / "out" / "ckpt.npz")
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", readme(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})


def test_ci_runs_the_readmes_set_up_commands():
    quick = readme().split("## Quick start", 1)[1].split("```")[1]
    lines = quick.strip().splitlines()[1:] if quick.startswith("sh\n") else quick.strip().splitlines()
    commands = [line.split("#")[0].strip() for line in lines]
    assert commands[0] == "pip install -e . && python train.py"
    test_command = commands[1]
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci_lines = [l.strip() for l in f if l.strip() and not l.startswith("#")]
    assert test_command in ci_lines


def test_the_readme_is_short_and_keeps_run_logs_on_the_results_page():
    text = readme()
    assert len(text.splitlines()) <= 250
    assert not re.search(r"\b\d{1,2}:\d{2}\b", text), "a clock time: it belongs on docs/results.md"
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "a dated run: it belongs on docs/results.md"
    for phrase in ("load average", "other jobs", "quiet machine", "run 1", "Intel", "EPYC"):
        assert phrase.lower() not in text.lower(), phrase


def test_links_point_at_files_that_exist_and_name_real_functions():
    text = readme()
    check_markdown_links(text, ROOT)
    anchors = re.findall(r"\]\(docs/tour\.md#([\w-]+)\)", text)
    for n, concept in enumerate(("vectors", "matrices", "linear-transformations", "inner-products", "orthogonality",
                                 "linear-systems", "eigendecomposition"), 1):
        assert any(a.startswith(f"{n}-{concept}") for a in anchors), (n, concept)


@pytest.mark.parametrize("name", sorted(DOCS))
def test_every_link_and_anchor_of_the_front_door_pages_resolves(name):
    """Links between the pages, #anchors included: a renamed heading must take its links with it."""
    text, folder = read(name), os.path.dirname(DOCS[name])
    check_markdown_links(text, folder)
    for target, anchor in re.findall(r"\]\(([^)#\s]*\.md)?#([^)\s]+)\)", text):
        path = os.path.normpath(os.path.join(folder, target)) if target else DOCS[name]
        with open(path, encoding="utf-8") as f:
            headings = {slug(h) for h in re.findall(r"^#+ (.+)$", f.read(), re.M)}
        assert anchor in headings, f"{name}: {target or name}#{anchor}"


# ---- the file map ------------------------------------------------------------------------------------------

def file_map():
    """The paths the README's file map names: an indented tree, a folder `name/` a line, files `a.py b.py`
    at the start of a line (or after their folder), each line's description after them."""
    block = readme().split("## Files", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    names, stack = set(), []
    for line in block.splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        del stack[depth:]
        where = list(stack)
        for token in line.split():
            if token.endswith("/") and re.fullmatch(r"[\w.-]+/", token):
                where.append(token[:-1])
                stack = list(where)
                names.add("/".join(where))
            elif re.fullmatch(r"[\w.-]+\.(py|md|txt)", token):
                names.add("/".join(where + [token]))
            else:
                break
    return names


def test_every_module_is_in_the_file_map_and_the_map_names_only_real_files():
    named = file_map()
    modules = set()
    for top in ("tinylm", "benchmarks"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            rel = os.path.relpath(folder, ROOT).replace(os.sep, "/")
            modules |= {f"{rel}/{f}" for f in files if f.endswith(".py") and f != "__init__.py"}
    missing = sorted(modules - named)
    assert not missing, f"modules missing from the README's file map: {missing}"
    stale = sorted(n for n in named if not os.path.exists(os.path.join(ROOT, n)))
    assert not stale, f"the README's file map names files that do not exist: {stale}"


# ---- the commands --------------------------------------------------------------------------------------------

def sh_commands(text):
    """Every command of the ```sh blocks as an argv, comments dropped and `a && b` split in two."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.strip().splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                out.append(words[:cut])
                words = words[cut + 1:]
    return out


def entry_point(argv):
    """(main function, its argv) for a command line, or None for pytest; unknown programs fail the test."""
    if argv[0] in ("mpiexec", "mpirun"):
        argv = argv[argv.index("python"):]
    assert argv[0] == "python", argv
    scripts = {"train.py": ("tinylm.cli.train", "train_main"), "sample.py": ("tinylm.cli.sample", "sample_main"),
               "analyze.py": ("tinylm.cli.analyze", "analyze_main")}
    if argv[1] in scripts:
        module, name = scripts[argv[1]]
        return getattr(importlib.import_module(module), name), argv[2:]
    assert argv[1] == "-m", argv
    if argv[2] == "pytest":
        return None
    assert argv[2].split(".")[0] in ("tinylm", "benchmarks"), argv
    module = importlib.import_module(argv[2])
    if not hasattr(module, "main"):       # a package run with -m: the main its __main__.py imports (not run here)
        with open(os.path.join(os.path.dirname(module.__file__), "__main__.py"), encoding="utf-8") as f:
            module = importlib.import_module(re.search(r"^from ([\w.]+) import main$", f.read(), re.M).group(1))
    return module.main, argv[3:]


class Parsed(BaseException):
    """Raised by parse_args once a command line parsed: the command's work is never started."""


def parse_only(main, args, monkeypatch, capsys):
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            main(list(args))
        except Parsed as p:
            return p.args[0]
        except SystemExit as e:
            pytest.fail(f"{args}: exit {e.code}: {capsys.readouterr().err.strip()}")
    pytest.fail(f"{args}: never parsed its arguments")


def check_pip(argv):
    assert argv[:3] == ["pip", "install", "-e"], argv
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        extras = set(re.findall(r"^(\w+) = \[", f.read().split("[project.optional-dependencies]")[1].split("\n[")[0],
                                re.M))
    spec = re.fullmatch(r"\.(?:\[(\w+)\])?", argv[3])
    assert spec and (spec.group(1) is None or spec.group(1) in extras), argv


@pytest.mark.parametrize("name", sorted(DOCS))
def test_every_command_shown_parses(name, monkeypatch, capsys):
    """Each flag and value of each command in the page's sh blocks, through the command's own parser."""
    commands = sh_commands(read(name))
    if name != "docs/results.md":
        assert commands, name
    for argv in commands:
        if argv[0] == "pip":
            check_pip(argv)
            continue
        found = entry_point(argv)
        if found is not None:
            parse_only(*found, monkeypatch, capsys)


def test_the_readmes_cheap_commands_run_on_a_small_model(trained_dir, tmp_path, monkeypatch, capsys):
    """sample, analyze, compress and export as the README shows them, on the small trained model in out/; the
    commands that train, or read a folder the reader makes first, are parsed (above), not run."""
    os.makedirs(tmp_path / "out")
    shutil.copy(os.path.join(trained_dir["dir"], "ckpt.npz"), tmp_path / "out" / "ckpt.npz")
    monkeypatch.chdir(tmp_path)
    has_plot = importlib.util.find_spec("matplotlib") is not None
    cheap = {"analyze.py": ["--n-boot", "0", "--eval-seqs", "8", "--hessian-k", "1", "--no-progress"],
             "sample.py": [], "tinylm.compress": ["--no_progress"], "tinylm.export": []}
    ran = []
    for argv in sh_commands(readme()):
        program = argv[2] if argv[:2] == ["python", "-m"] else argv[1] if argv[0] == "python" else None
        if program not in cheap or ("--poster" in argv and not has_plot):
            continue
        reads = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--out_dir", "--init_from")]
        if not all(os.path.exists(p) for p in reads + ([argv[2]] if program == "analyze.py" else [])):
            continue
        main, args = entry_point(argv)
        assert main(args + cheap[program]) == 0, (argv, capsys.readouterr().err)
        out = capsys.readouterr().out
        ran.append(program)
        if program == "tinylm.compress":        # each validation loss says what it was averaged over
            assert re.search(r"validation loss on [\d,]+ tokens \([\d,]+ evenly spaced windows of \d+ of the "
                             r"validation split\): \d\.\d{4} -> \d\.\d{4}", out), out
        if argv[1:] == ["analyze.py", "out/ckpt.npz"]:
            assert re.search(r"low rank: validation loss \d\.\d{4} on [\d,]+ tokens", out), out
    assert sorted(set(ran)) == sorted(cheap), ran
    assert ran.count("sample.py") >= 2 and ran.count("analyze.py") >= 3


def test_the_readme_names_every_installed_command():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        scripts = re.findall(r"^(tinylm-\w+) = ", f.read().split("[project.scripts]")[1].split("\n[")[0], re.M)
    assert len(scripts) >= 5
    for script in scripts:
        assert f"`{script}`" in readme(), script


# ---- the figures ---------------------------------------------------------------------------------------------

def test_each_result_in_the_readme_is_on_the_results_page():
    """The README gives a figure once, in its results table; the results page holds it with its runs."""
    table = readme().split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in table.splitlines() if r.startswith("| ") and "](docs/results.md#" in r]
    assert len(rows) >= 5
    results = read("docs/results.md")
    for row in rows:
        for number in re.findall(r"\d+(?:[.,]\d+)*", row.split("|")[2]):
            assert re.search(rf"(?<![\d.,]){re.escape(number)}(?![\d]|[.,]\d)", results), (number, row)


def test_the_validation_loss_table_says_what_each_tool_averages_over():
    """docs/results.md#validation-loss gives each tool's windows; hold it to the code's defaults."""
    from benchmarks.compress_bench import EVAL_TOKENS
    from tinylm.analysis.scale import DEFAULT_EVAL_SEQS
    from tinylm.cli.compress import compress_parser
    from tinylm.train.loop import TrainArgs
    section = read("docs/results.md").split("## Validation loss", 1)[1].split("\n## ", 1)[0]
    a, T = TrainArgs(), 64
    rows = {row.split("|")[1]: row for row in section.splitlines() if row.startswith("| `")}
    train = next(r for k, r in rows.items() if "train.py" in k)
    assert f"{a.eval_iters} batches of {a.batch_size}" in train and f"{a.eval_iters * a.batch_size * T:,}" in train
    compress = next(r for k, r in rows.items() if "tinylm.compress" in k)
    n = compress_parser().get_default("eval_tokens")
    assert f"{n // T:,}, evenly spaced" in compress and f"{n:,}" in compress
    bench = next(r for k, r in rows.items() if "compress_bench" in k)
    assert f"{EVAL_TOKENS // T:,}, evenly spaced" in bench and f"{EVAL_TOKENS:,}" in bench
    analysis = next(r for k, r in rows.items() if "analyze.py" in k)
    assert f"{DEFAULT_EVAL_SEQS} at random starts" in analysis and f"{DEFAULT_EVAL_SEQS * T:,}" in analysis


def test_the_tour_states_its_seed_and_the_spread_of_random_cosines():
    """Tour section 4: position embeddings at initialization, cosines of random vectors in R^128."""
    import numpy as np
    from tinylm.analysis.linalg import cosine_similarity_matrix
    from tinylm.core.gpt2 import GPTConfig, init_params
    from tinylm.train.loop import TrainArgs
    tour = read("docs/tour.md")
    seed = TrainArgs().seed
    assert f"the run's seed (`--seed`, {seed} by default) before step 1" in " ".join(tour.split("## 0 ", 1)[0].split())
    config = GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128)
    wpe = init_params(config, seed=seed, dtype=np.float64)["transformer.wpe.weight"]
    cos = cosine_similarity_matrix(wpe)
    pairs = cos[np.triu_indices(64, 1)]
    four = [f"{v:.2f}" for v in np.abs(cos[0, [1, 16, 32, 63]])]      # positions 1, T/4, T/2, T-1
    section = tour.split("## 4 ", 1)[1].split("## 5 ", 1)[0]
    words = " ".join(section.split())
    assert f"{pairs.std():.3f}" in words and f"largest {np.abs(pairs).max():.2f}" in words, words
    assert f"{100 * np.mean(np.abs(pairs) < 0.09):.0f}% of them within ±0.09" in words
    assert f"{100 * np.mean(np.abs(pairs) < 0.18):.0f}% within ±0.18" in words
    assert f"measure {', '.join(four[:-1])} and {four[-1]}" in words, (four, words)


def test_the_exercises_folder_learners_write_to_is_ignored_by_git(tmp_path, monkeypatch):
    from tinylm.exercises import grader
    assert grader.default_file(1) == os.path.join("exercises", "ex1.py")      # relative to where you run it
    with open(os.path.join(ROOT, ".gitignore"), encoding="utf-8") as f:
        assert "/exercises/" in f.read().split()
    monkeypatch.chdir(tmp_path)
    grader.main(["start", "1"])
    assert (tmp_path / "exercises" / "ex1.py").is_file()
