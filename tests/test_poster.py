"""The poster: seven panels, one per concept, from the model's own weights; one clear line without matplotlib."""
import os
import re
import struct
import sys

import pytest

from tinylm.fast import model as M
from tinylm.core import gpt2 as G
from tinylm.analysis import poster as P
from tinylm.cli.analyze import analyze_main
from tinylm.io.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def ckpt(trained_dir):
    return load_checkpoint(os.path.join(trained_dir["dir"], "ckpt.npz"), with_optimizer=False)


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_titles_name_each_concept_and_its_number_without_matplotlib(ckpt, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # the numbers need no plotting library
    d = P.poster_data(ckpt)
    titles = P.panel_titles(d)
    assert [t.split(":")[0] for t in titles] == list(P.CONCEPTS)
    assert "top-1" in titles[0] and "params" in titles[1] and "stable rank" in titles[2]
    assert "alpha" in titles[6] and "probe accuracy" in titles[5]
    assert d["stable_rank"] < d["stable_rank_init"]          # training concentrates W_Q on few directions
    for i in (0, 2, 3, 5, 6):                                 # each number that claims structure, beside its value at init
        assert re.search(r"[(;] ?init ", titles[i]), titles[i]
    assert len(d["probe_init"]) == len(d["probe"]) and d["esd_init"].shape == d["esd"].shape


def test_poster_png_has_seven_panels(ckpt, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sub" / "poster.png"
    titles = P.make_poster(ckpt, str(path))
    assert len(titles) == 7
    for title, concept in zip(titles, P.CONCEPTS):
        assert title.startswith(concept + ": ")
    w, h = png_size(path)
    assert 1000 <= w <= 2000 and 500 <= h <= 1000
    assert 30_000 < path.stat().st_size < 1_000_000


def test_cli_poster_alone(trained_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "poster.png"
    assert analyze_main([trained_dir["dir"], "--poster", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout and "stable rk" not in stdout     # the poster only, not the table
    png_size(out)


def test_cli_poster_without_matplotlib_is_one_line(trained_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = analyze_main([trained_dir["dir"], "--poster", str(tmp_path / "p.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "pip install -e '.[plot]'" in err[0]
    assert not (tmp_path / "p.png").exists()


def test_matmul_flops_counts_the_products():
    from tinylm.core.gpt2 import GPTConfig
    c = GPTConfig(block_size=4, vocab_size=3, n_layer=1, n_head=1, n_embd=2)
    f = G.matmul_flops(c, batch_size=5)
    # per token: 2·(12·C² + V·C) for the weights, 4·T·C for QKᵀ and AV
    assert f["forward_per_token"] == 2 * (12 * 4 + 6) + 4 * 4 * 2
    assert f["per_step"] == 3 * f["forward_per_token"] * 20


def test_attention_panel_labels_match_the_tokens_drawn(ckpt, monkeypatch):
    monkeypatch.setattr(P, "MAX_PROMPT", 5)                  # a prompt longer than the drawn window
    d = P.poster_data(ckpt, prompt="ROMEO: But soft, what light")
    assert d["attention"].shape == (5, 5) and d["prompt_labels"] == list(" light"[1:])
