import os
import subprocess
import sys

# One BLAS thread: the tests' matrices are small, and two threads contending with a busy
# second core run far slower than one. Must be set before NumPy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from tinylm.train.args import TrainArgs     # after the thread settings above: it imports NumPy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "tinylm", "data", "tinyshakespeare.txt")
# Text that trips tokenizers: contractions, runs of spaces, digits, accents, CJK, an emoji, a special token.
TRICKY = ["Hello world", "it's I'm we'll they've", "  two  spaces\n\nand lines\t", "$1,000.50 ?!",
          "naïve café, 東京 🙂", "<|endoftext|>next doc"]


def run_script(script, *args, cwd=None, timeout=300, env=None):
    """Run one of the entry points as a user would; returns CompletedProcess with text output."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def shakespeare_head(tmp_path_factory):
    """The first 200,000 characters of Tiny Shakespeare, as a file."""
    path = tmp_path_factory.mktemp("data") / "shakespeare_head.txt"
    with open(SHAKESPEARE, encoding="utf-8") as f:
        path.write_text(f.read()[:200_000], encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory, shakespeare_head):
    """A small model trained for a few hundred steps on real text: shared by the tests that need one."""
    from tinylm.train.args import TrainArgs
    from tinylm.train.loop import train
    out = tmp_path_factory.mktemp("trained")
    args = TrainArgs(data=shakespeare_head, out_dir=str(out), n_layer=2, n_head=2, n_embd=48, block_size=32,
                     batch_size=16, max_iters=300, lr_decay_iters=300, warmup_iters=20, eval_interval=100,
                     eval_iters=5, learning_rate=3e-3, sample_tokens=0, progress=False)
    summary = train(args, log=lambda *a: None)
    return {"dir": str(out), "summary": summary, "args": args}


def check_markdown_links(text, folder):
    """Every relative link in a Markdown text points at a file, and a link named after functions
    (`[`f`, `g`](path.py)`) points at the file that defines them. folder: where the text lives."""
    import re
    links = [l for l in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text) if "://" not in l]
    assert links
    for link in links:
        assert os.path.exists(os.path.join(folder, link)), link
    for names, target in re.findall(r"\[((?:`\w+`(?:, | and )?)+)\]\(((?:\.\./)?tinylm/[\w/]+\.py)\)", text):
        with open(os.path.normpath(os.path.join(folder, target)), encoding="utf-8") as f:
            source = f.read()
        for name in re.findall(r"`(\w+)`", names):
            assert re.search(rf"^def {name}\(", source, re.M), f"{name} not defined in {target}"


def llama_args(data, out, max_iters, **kw):
    """TrainArgs of a tiny Llama (2 layers, 4 query heads sharing 2 K/V heads, 32 wide) for max_iters steps."""
    base = dict(data=data, out_dir=str(out), arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                block_size=16, batch_size=4, max_iters=max_iters, lr_decay_iters=max_iters, warmup_iters=3,
                eval_interval=10, eval_iters=4, learning_rate=3e-3, sample_tokens=0, progress=False)
    base.update(kw)
    return TrainArgs(**base)
