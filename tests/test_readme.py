"""The README cannot rot: its Python snippets run, and CI runs exactly its test command."""
import os
import re
import shutil

from conftest import ROOT, check_markdown_links


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


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
    commands = [line.split("#")[0].strip() for line in quick.strip().splitlines()]
    assert commands[0] == "pip install -e . && python train.py"
    test_command = commands[1]
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci_lines = [l.strip() for l in f if l.strip() and not l.startswith("#")]
    assert test_command in ci_lines


def test_links_point_at_files_that_exist_and_name_real_functions():
    text = readme()
    check_markdown_links(text, ROOT)
    anchors = re.findall(r"\]\(docs/tour\.md#([\w-]+)\)", text)
    with open(os.path.join(ROOT, "docs", "tour.md"), encoding="utf-8") as f:
        headings = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                    for h in re.findall(r"^#+ (.+)$", f.read(), re.M)}
    assert len(anchors) == 7 and set(anchors) <= headings, (anchors, headings)
