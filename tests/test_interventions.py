"""Interventions (tinylm/analysis/interventions.py): the edited forward is the model when nothing is edited,
an ablation changes exactly what it should, steering is a bias, and the case direction moves the case."""
import json
import os

import numpy as np
import pytest

from conftest import run_script

from tinylm.fast import model
from tinylm.core import gpt2 as G
from tinylm.fast import decode as D
from tinylm.analysis import interventions as I


def reference_forward(params, config, idx, targets=None):
    """core's forward in float64: (logits, loss)."""
    return G.forward({k: np.asarray(v, np.float64) for k, v in params.items()}, config, idx, targets)[:2]
from tinylm.errors import TinyLMError
from tinylm.core.gpt2 import GPTConfig


def perturbed(config, seed, dtype=np.float64):
    """init_params moved off init (layer-norm gains of 1 and zero biases would hide a dropped term)."""
    rng = np.random.default_rng(seed)
    params = G.init_params(config, seed=seed, dtype=np.float64)
    return {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(dtype) for k, v in params.items()}


CONFIGS = [GPTConfig(block_size=10, vocab_size=13, n_layer=2, n_head=2, n_embd=16, bias=False),
           GPTConfig(block_size=10, vocab_size=13, n_layer=3, n_head=4, n_embd=16, bias=True)]


def tokens(config, seed=1, batch=3):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, config.vocab_size, size=(batch, config.block_size)),
            rng.integers(0, config.vocab_size, size=(batch, config.block_size)))


@pytest.mark.parametrize("config", CONFIGS)
def test_the_forward_without_edits_is_the_model(config):
    idx, targets = tokens(config)
    p64 = perturbed(config, 3)
    fast_logits, fast_loss, _ = model.forward(p64, config, idx, targets, for_backward=False)
    logits, loss = I.forward(p64, config, idx, targets)
    np.testing.assert_allclose(logits, fast_logits, rtol=0, atol=1e-10)
    assert abs(loss - fast_loss) < 1e-10
    np.testing.assert_allclose(logits, reference_forward(p64, config, idx)[0], rtol=0, atol=1e-10)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    logits32, loss32 = I.forward(p32, config, idx, targets)
    assert logits32.dtype == np.float32                       # computed in the parameters' dtype
    np.testing.assert_allclose(logits32, model.forward(p32, config, idx, for_backward=False)[0], rtol=1e-5, atol=1e-5)
    assert abs(loss32 - fast_loss) < 1e-5
    # starting at block l from the dense residual stream there is the same model
    xs, _ = I.dense_run(p64, config, idx)
    for l in range(config.n_layer):
        np.testing.assert_allclose(I.forward_from(p64, config, xs[l], l)[0], fast_logits, rtol=0, atol=1e-10)


def with_c_proj_columns_zeroed(params, layer, cols, shift=None):
    """The same parameters with columns `cols` of block `layer`'s attention c_proj set to zero (and its bias
    shifted by `shift`): the same model as the head(s) reading into those columns ablated, built independently."""
    p = dict(params)
    name = f"transformer.h.{layer}.attn.c_proj"
    W = p[name + ".weight"].copy()
    W[:, cols] = 0.0
    p[name + ".weight"] = W
    if shift is not None:
        p[name + ".bias"] = p.get(name + ".bias", 0.0) + shift
    return p


@pytest.mark.parametrize("config", CONFIGS)
def test_ablation_changes_exactly_what_it_should(config):
    idx, targets = tokens(config)
    params = perturbed(config, 4)
    D = config.n_embd // config.n_head
    dense = reference_forward(params, config, idx, targets)[1]
    assert I.ablate_heads(params, config, [], "zero", idx, targets) == pytest.approx(dense, abs=1e-12)   # nothing: Δ = 0
    for l in range(config.n_layer):
        # every head of a layer zeroed = no attention branch (with biases: the branch is its c_proj bias only)
        every = [(l, h) for h in range(config.n_head)]
        no_branch = reference_forward(with_c_proj_columns_zeroed(params, l, slice(None)), config, idx, targets)[1]
        assert I.ablate_heads(params, config, every, "zero", idx, targets) == pytest.approx(no_branch, abs=1e-10)
        assert abs(no_branch - dense) > 1e-4                  # so the equality above says something
    l, h = config.n_layer - 1, 1
    cols = slice(h * D, (h + 1) * D)
    one = reference_forward(with_c_proj_columns_zeroed(params, l, cols), config, idx, targets)[1]
    assert I.ablate_heads(params, config, [(l, h)], "zero", idx, targets) == pytest.approx(one, abs=1e-10)
    # mean ablation: the head's columns read a constant m, so W_O m moves into the bias
    _, means = I.dense_run(params, config, idx)
    W_O = params[f"transformer.h.{l}.attn.c_proj.weight"][:, cols]
    shifted = reference_forward(with_c_proj_columns_zeroed(params, l, cols, W_O @ means[l, h]), config, idx, targets)[1]
    assert I.ablate_heads(params, config, [(l, h)], "mean", idx, targets) == pytest.approx(shifted, abs=1e-10)
    assert abs(shifted - one) > 1e-6                          # the two modes differ


def test_ablation_table_rows_agree_with_single_ablations():
    config = CONFIGS[1]
    idx, targets = tokens(config)
    params = perturbed(config, 5)
    heads = I.parse_heads("all", config)
    tab = I.ablation_table(params, config, heads, "mean", idx, targets, together=True)
    assert len(tab["rows"]) == config.n_layer * config.n_head and tab["delta"].shape == (config.n_layer, config.n_head)
    deltas = [r["delta"] for r in tab["rows"]]
    assert deltas == sorted(deltas, reverse=True)
    for r in tab["rows"][:3] + tab["rows"][-2:]:
        alone = I.ablate_heads(params, config, [(r["layer"], r["index"])], "mean", idx, targets)
        assert r["loss"] == pytest.approx(alone, abs=1e-10) and tab["delta"][r["layer"], r["index"]] == r["delta"]
    assert tab["together"]["loss"] == pytest.approx(I.ablate_heads(params, config, heads, "mean", idx, targets), abs=1e-12)
    with pytest.raises(TinyLMError, match="'zero' or 'mean'"):
        I.ablate_heads(params, config, heads, "half", idx, targets)


def test_parse_heads():
    config = GPTConfig(n_layer=2, n_head=4)
    assert I.parse_heads("L1H1") == [(1, 1)]
    assert I.parse_heads("l0h3, L1H0,L0H3", config) == [(0, 3), (1, 0)]
    assert len(I.parse_heads("all", config)) == 8
    for bad in ("foo", "L1", "H1", "L1H1x", "", "L-1H0", "all,L0H0"):
        with pytest.raises(TinyLMError, match="L<layer>H<head>"):
            I.parse_heads(bad, config)
    for beyond in ("L2H0", "L0H4", "L9H9"):
        with pytest.raises(TinyLMError, match="layers 0-1 and heads 0-3"):
            I.parse_heads(beyond, config)


@pytest.mark.parametrize("spec, words", [("L9H9", ["L9H9", "layers 0-1"]), ("foo", ["foo", "L<layer>H<head>"]),
                                         ("", ["L<layer>H<head>"])])
def test_analyze_refuses_bad_heads_in_one_line(trained_dir, spec, words):
    proc = run_script("analyze.py", os.path.join(trained_dir["dir"], "ckpt.npz"), "--ablate", spec)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not proc.stdout


def test_analyze_ablate_prints_the_table_and_reports_it(trained_dir, tmp_path):
    ckpt = os.path.join(trained_dir["dir"], "ckpt.npz")
    proc = run_script("analyze.py", ckpt, "--ablate", "all", "--eval-seqs", "8", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("ablation:") and lines[1].split()[:2] == ["head", "dense"]
    rows = [l.split() for l in lines[3:] if l.startswith("L")]
    assert sorted(r[0] for r in rows) == ["L0H0", "L0H1", "L1H0", "L1H1"]      # all heads, only the ablation ran
    deltas = [float(r[3]) for r in rows]
    assert deltas == sorted(deltas, reverse=True) and max(deltas) > 0.005     # a trained model needs some head
    assert all(abs(float(r[2]) - float(r[1]) - float(r[3])) < 2e-4 for r in rows)
    assert "spectra:" not in proc.stdout
    report = tmp_path / "rep"
    proc = run_script("analyze.py", ckpt, "--ablate", "L1H0,L0H1", "--ablate_mode", "mean", "--only", "circuits",
                      "--eval-seqs", "4", "--report", report, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "L1H0+L0H1 together" in proc.stdout and "circuits:" in proc.stdout
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["ablation"]["mode"] == "mean" and len(metrics["ablation"]["rows"]) == 2
    assert metrics["ablation"]["delta"][1][1] is None                          # not ablated: NaN, strict JSON null
    page = (report / "index.html").read_text(encoding="utf-8")
    assert "id='ablation'" in page
    pytest.importorskip("matplotlib")
    section = page[page.index("id='ablation'"):]
    assert "data:image/png;base64," in section.split("</section>")[0]


# ----------------------------------------------------------------------------- steering


@pytest.mark.parametrize("config", CONFIGS)
def test_steering_is_adding_to_the_residual_stream(config):
    idx, _ = tokens(config)
    params = perturbed(config, 6)
    d = np.random.default_rng(0).standard_normal(config.n_embd)
    plain = model.forward(params, config, idx, for_backward=False)[0]
    for layer in range(config.n_layer + 1):
        steered = I.steer(params, config, d, layer, 0.7)
        want = I.forward(params, config, idx, add={layer: 0.7 * d})[0]
        np.testing.assert_allclose(model.forward(steered, config, idx, for_backward=False)[0], want, rtol=0, atol=1e-10)
        assert np.abs(want - plain).max() > 1e-3
        # the fast decoding path (KV cache, folded weights) samples from the same steered model
        cached, full = [], []
        list(D.generate(steered, config, idx[0, :3], 5, np.argmax, use_cache=True, trace=cached))
        list(D.generate(steered, config, idx[0, :3], 5, np.argmax, use_cache=False, trace=full))
        for (_, a), (_, b) in zip(cached, full):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)
    assert all(np.array_equal(v, params[k]) for k, v in I.steer(params, config, d, 1, 0.0).items() if k in params)
    assert "transformer.h.0.mlp.c_proj.bias" not in params or config.bias       # steer did not edit its input
    for bad in (-1, config.n_layer + 1):
        with pytest.raises(TinyLMError, match="steer_layer"):
            I.steer(params, config, d, bad, 1.0)
    with pytest.raises(TinyLMError, match="n_embd"):
        I.steer(params, config, d[:-1], 0, 1.0)


def test_case_direction_is_the_mean_case_offset():
    chars = list("aAbB.c")
    wte = np.arange(6 * 3, dtype=float).reshape(6, 3) ** 1.5
    np.testing.assert_allclose(I.case_direction(wte, chars), ((wte[1] - wte[0]) + (wte[3] - wte[2])) / 2)
    with pytest.raises(TinyLMError, match="both cases"):
        I.case_direction(wte, list("abcdef"))
    assert I.uppercase_fraction("AbC d!") == 0.5 and I.uppercase_fraction("12 !") == 0.0


def test_steering_along_the_case_direction_moves_the_case(trained_dir):
    from tinylm.analysis.scale import token_labels
    from tinylm.io.hf import load_any
    ck = load_any(os.path.join(trained_dir["dir"], "ckpt.npz"))
    params, config, tok = ck["params"], ck["config"], ck["tokenizer"]
    d = I.case_direction(params["transformer.wte.weight"], list(token_labels(tok, config.vocab_size)))
    frac = {}
    for scale in (-1.0, 0.0, 1.0):
        texts = I.sample_texts(I.steer(params, config, d, 0, scale), config, tok, "romeo", n_samples=3, n_tokens=100)
        frac[scale] = I.uppercase_fraction("".join(texts))
    plain = I.sample_texts(params, config, tok, "romeo", n_samples=3, n_tokens=100)
    assert I.uppercase_fraction("".join(plain)) == frac[0.0]                 # scale 0 is plain sampling
    assert frac[1.0] > frac[0.0] + 0.2, frac                                  # towards capitals ...
    assert frac[-1.0] <= frac[0.0], frac                                      # ... and away from them


def test_sample_py_steer(trained_dir, tmp_path):
    ckpt = os.path.join(trained_dir["dir"], "ckpt.npz")
    common = ["--init_from", ckpt, "--start", "romeo", "--num_samples", "2", "--max_new_tokens", "60"]
    plain = run_script("sample.py", *common)
    zero = run_script("sample.py", *common, "--steer", "case", "--steer_scale", "0")
    up = run_script("sample.py", *common, "--steer", "case", "--steer_scale", "1")
    assert plain.returncode == zero.returncode == up.returncode == 0, zero.stderr + up.stderr
    assert zero.stdout == plain.stdout and "case direction" in zero.stderr
    assert I.uppercase_fraction(up.stdout) > I.uppercase_fraction(plain.stdout) + 0.2
    vec = tmp_path / "d.npy"
    np.save(vec, np.zeros(7))
    for flags, words in ((["--steer", "sideways"], ["'case'"]), (["--steer", str(vec)], ["numbers", "(7,)"]),
                         (["--steer", "case", "--steer_layer", "9"], ["--steer_layer", "0..2"])):
        proc = run_script("sample.py", *common, *flags)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
        assert all(w in lines[0] for w in words), lines[0]
