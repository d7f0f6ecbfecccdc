"""analyze.py on a GPT-2 folder in the Hugging Face layout with a BPE vocabulary over scale.LARGE_VOCAB."""
import json

import numpy as np
import pytest

from conftest import SHAKESPEARE

from tinylm.analysis import scale
from tinylm.cli.analyze import DEFAULT_SECTIONS, analyze_main
from tinylm.text.bpe import train_bpe
from tinylm.io.hf import export_hf
from tinylm.core.gpt2 import GPTConfig, init_params


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A random 2-layer GPT-2 with a 600-token BPE and block_size 320 (> scale.MAX_WINDOW), exported as an HF folder."""
    root = tmp_path_factory.mktemp("gpt2an")
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()[:60_000]
    data = root / "text.txt"
    data.write_text(text, encoding="utf-8")
    tok = train_bpe(text, 600)
    assert tok.vocab_size == 600 > scale.LARGE_VOCAB
    config = GPTConfig(block_size=320, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, bias=True)
    export_hf({"params": init_params(config, seed=0), "config": config, "tokenizer": tok, "meta": {}}, root / "model")
    return root / "model", data, tok


def run(args, capsys):
    assert analyze_main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_every_default_section_runs_on_a_gpt2_folder(gpt2_folder, tmp_path, capsys):
    folder, data, tok = gpt2_folder
    report = tmp_path / "report"
    out = run([folder, "--data", data, "--report", report, "--n-boot", "5", "--eval-seqs", "4", "--no-progress"], capsys)
    assert "Scaled down" in out and "windows of 256 tokens" in out
    m = json.loads((report / "metrics.json").read_text(encoding="utf-8"))
    assert set(DEFAULT_SECTIONS) <= set(m)
    assert m["eval"] == {"window": 256, "n_windows": 4, "block_size": 320, "big_model": False, "large_vocab": True}

    # labels are the decoded token strings
    labels = m["chars"]
    assert len(labels) == 600 and labels[:3] == ["!", '"', "#"] and labels[-1] == "<|endoftext|>"
    assert all(labels[i] == tok.decode([i]) for i in range(256, 599))
    assert "".join(m["prompt_tokens"]) == m["prompt"] and len(m["prompt_tokens"]) < len(m["prompt"])

    # embeddings: the subset rule
    e = m["embeddings"]
    ids = e["token_ids"]
    assert len(ids) <= scale.SUBSET_SIZE and ids == sorted(ids) and "single-character" in e["subset_rule"]
    singles = [i for i, s in enumerate(labels) if len(s) == 1 and s.isprintable()]
    assert set(singles) <= set(ids) and any(len(labels[i]) > 1 for i in ids)
    assert set(e["neighbours"]) == {labels[i] for i in ids} and len(e["pca_map"]) == len(ids)
    assert e["analogies"]["n"] == 26 * 25                     # every letter is a single-byte token
    assert e["positions"] == list(range(0, 320, 2)) and len(e["position_cosine"]) == 160

    # probes: properties of BPE tokens
    names = list(m["probes"]["probes"])
    assert names[0].startswith("current token (63 most frequent") and "next token starts with a space" in names
    assert m["probes"]["window"] == 256 and m["probes"]["n_tokens"] == 4 * 256

    # circuits: every head, attention for the prompt's tokens
    assert len(m["circuits"]["heads"]) == 4
    assert np.asarray(m["circuits"]["prompt_attention"]).shape[-1] == len(m["prompt_tokens"])
    assert m["circuits"]["patterns"]["induction_period"] == 128
    assert len(m["lowrank"]["curve"]) == 12
    assert m["training"]["note"].startswith("no metrics.jsonl")

    page = (report / "index.html").read_text(encoding="utf-8")
    assert "Large vocabulary" in page and "␣the" in page and "Scaled down" in page


def test_big_model_rules_and_a_config_json_path(gpt2_folder, capsys, monkeypatch):
    folder, data, _ = gpt2_folder
    monkeypatch.setattr(scale, "BIG_MODEL", 0)        # the 2-layer model counts as big: fewer windows, fractions
    monkeypatch.setattr(scale, "BIG_EVAL_SEQS", 3)
    monkeypatch.setattr(scale, "BIG_LOWRANK_SEQS", 2)
    import tinylm.cli.analyze as cli
    args = cli.analyze_parser().parse_args([str(folder / "config.json"), "--data", str(data), "--no-progress"])
    from tinylm.io.hf import load_any
    res = cli.run_analysis(load_any(folder), cli.checkpoint_path(args.checkpoint), ["probes", "lowrank"], args)
    assert res["eval"]["n_windows"] == 3 and res["eval"]["big_model"]
    assert res["probes"]["n_tokens"] == 3 * 256 and res["lowrank"]["n_tokens"] == 2 * 256
    assert [r["rank_fraction"] for r in res["lowrank"]["curve"]] == list(scale.BIG_FRACTIONS)


def test_token_labels_escape_partial_utf8():
    tok = train_bpe("héllo wörld " * 50, 300)
    labels = scale.token_labels(tok, tok.vocab_size)
    assert labels[tok.vocab["Ã"]] == "\\xc3" and labels[tok.vocab["h"]] == "h"     # "Ã" stands for the byte 0xC3
    from tinylm.analysis.embeddings import token_label
    assert token_label(" the\n") == "␣the\\n"
