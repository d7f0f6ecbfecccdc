"""Every analysis section on a Llama: tiny models with shared K/V heads (n_kv_head < n_head), tied and untied, each
number checked against a computation that does not go through the analysis (np.linalg.svd of the named matrix,
core/llama.py's forward with a head's o_proj columns zeroed, finite differences of core's loss, the full V×V
token circuit), the rotary QK circuit against a model worked out on paper, and analyze.py / sample.py end to end."""
import json
import re

import numpy as np
import pytest

from conftest import run_script

from tinylm.analysis import circuits, hessian, interventions as I, lowrank, weights
from tinylm.analysis.compare import compare_weights
from tinylm.analysis.embeddings import analyze_embeddings
from tinylm.analysis.probes import analyze_probes
from tinylm.analysis.tracking import spectra_snapshot
from tinylm.analysis.weight_spectra import analyze_spectra
from tinylm.core import layers as L, llama


def tiny(tied=False, seed=0, dtype=np.float64):
    """A 2-layer Llama, 4 query heads sharing 2 K/V heads of width 4, with RMSNorm gains away from 1 (so folding them
    matters)."""
    config = llama.LlamaConfig(block_size=16, vocab_size=20, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
                               ffn_hidden=24, tie_embeddings=tied)
    params = llama.init_params(config, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    for name, p in params.items():
        if p.ndim == 1:
            params[name] = (1 + 0.3 * rng.standard_normal(p.shape)).astype(dtype)
        else:
            params[name] = (p * 10).astype(dtype)        # weights large enough that the heads do something
    return params, config


def batch(config, B=3, T=12, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, config.vocab_size, (B, T)), rng.integers(0, config.vocab_size, (B, T)))


@pytest.mark.parametrize("tied", [False, True])
def test_every_named_matrix_is_its_parameter_and_its_spectrum_is_its_svd(tied):
    params, config = tiny(tied)
    mats = weights.weight_matrices(params, config, per_head=True)
    assert ("lm_head" in mats) == (not tied) and "embed_tokens" in mats and "wte" not in mats
    for i in range(config.n_layer):
        pre = f"model.layers.{i}."
        for kind, param in (("attn.q", "self_attn.q_proj"), ("attn.k", "self_attn.k_proj"), ("attn.v", "self_attn.v_proj"),
                            ("attn.o", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"), ("mlp.up", "mlp.up_proj"),
                            ("mlp.down", "mlp.down_proj")):
            assert mats[f"h{i}.{kind}"] is params[pre + param + ".weight"]
            assert weights.source_name(f"h{i}.{kind}", config) == pre + param + ".weight"
        assert sum(f"h{i}.attn.k.head" in n for n in mats) == config.n_kv_head      # k, v: one block per K/V head
        assert sum(f"h{i}.attn.o.head" in n for n in mats) == config.n_head
        np.testing.assert_array_equal(mats[f"h{i}.attn.o.head3"], params[pre + "self_attn.o_proj.weight"][:, 12:16])
    assert weights.linear_weight_names(config)[:7] == [f"model.layers.0.{p}.weight" for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj")]
    spectra = analyze_spectra(params, config, n_boot=0, progress=False)
    assert set(spectra) == set(mats)
    for name, W in mats.items():
        np.testing.assert_allclose(spectra[name]["singular_values"], np.linalg.svd(W, compute_uv=False), rtol=1e-10, atol=1e-12)
    snap = spectra_snapshot(params, config)                       # --track_spectra's line: the whole matrices
    assert snap["h1.mlp.down"]["spectral"] == pytest.approx(np.linalg.norm(params["model.layers.1.mlp.down_proj.weight"], 2))
    assert all(m["relative_change"] == 0 for m in compare_weights(params, params, config).values())


def test_each_query_head_reads_the_key_value_head_of_its_group():
    params, config = tiny()
    hw = weights.head_weights(params, config, 1)
    k = params["model.layers.1.self_attn.k_proj.weight"]
    for h in range(4):                    # G = 2: heads 0, 1 read K/V head 0; heads 2, 3 read K/V head 1
        np.testing.assert_array_equal(hw["W_K"][h], k[(h // 2) * 4:(h // 2 + 1) * 4])
    assert hw["W_Q"].shape == hw["W_K"].shape == hw["W_V"].shape == (4, 4, 16) and hw["W_O"].shape == (4, 16, 4)


@pytest.mark.parametrize("tied", [False, True])
def test_the_analysis_forward_and_its_trace_equal_core(tied):
    params, config = tiny(tied)
    x, y = batch(config)
    logits, loss, _ = llama.forward(params, config, x, y)
    mine, my_loss = I.forward(params, config, x, y)
    np.testing.assert_allclose(mine, logits, atol=1e-10)
    assert my_loss == pytest.approx(loss, abs=1e-10)
    rec = I.trace_forward(params, config, x)
    np.testing.assert_allclose(rec["logits"], logits, atol=1e-10)
    assert len(rec["residual"]) == 3 and len(rec["attention"]) == 2
    att = rec["attention"][0]
    np.testing.assert_allclose(att.sum(-1), 1, atol=1e-12)
    assert np.all(np.triu(att[0, 0], 1) == 0)                     # causal
    # the logit lens at the last layer is the model itself
    probes = analyze_probes(params, config, x, y, [chr(97 + i) for i in range(20)])
    assert probes["logit_lens"]["loss"][-1] == pytest.approx(loss, abs=1e-9)


@pytest.mark.parametrize("tied", [False, True])
def test_ablating_a_head_is_zeroing_its_o_proj_columns(tied):
    params, config = tiny(tied)
    x, y = batch(config)
    for layer, head in ((0, 1), (1, 3)):
        edited = dict(params)
        name = f"model.layers.{layer}.self_attn.o_proj.weight"
        edited[name] = params[name].copy()
        edited[name][:, head * 4:(head + 1) * 4] = 0            # the head's output never reaches the stream
        expected = llama.forward(edited, config, x, y)[1]
        assert I.ablate_heads(params, config, [(layer, head)], "zero", x, y) == pytest.approx(expected, abs=1e-10)
        assert expected != pytest.approx(llama.forward(params, config, x, y)[1], abs=1e-6)
    table = I.ablation_table(params, config, [(0, 0), (1, 2)], "mean", x, y, together=True)
    assert table["delta"].shape == (2, 4) and np.isfinite(table["delta"][1, 2]) and table["together"]


@pytest.mark.parametrize("tied", [False, True])
def test_steering_a_llama(tied):
    """Layer 0: every embedding row shifted, which a tied head turns into the same shift of every logit (the
    probabilities do not move); past it, the vector added inside the forward, sampled by steer_generate."""
    params, config = tiny(tied)
    x, _ = batch(config)
    d = np.random.default_rng(3).standard_normal(16)
    steered, add = I.steering(params, config, d, 0, 0.7)
    assert add is None
    z = llama.forward(steered, config, x)[0]
    want = I.forward(params, config, x, add={0: 0.7 * d})[0]
    prob = lambda a: np.exp(a - a.max(-1, keepdims=True)) / np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)
    np.testing.assert_allclose(prob(z), prob(want), atol=1e-10)
    same, add = I.steering(params, config, d, 2, 0.7)
    assert same is params and set(add) == {2}
    moved = I.forward(params, config, x, add=add)[0]
    assert np.abs(moved - I.forward(params, config, x)[0]).max() > 1e-3
    greedy = lambda z: np.argmax(z, axis=-1)
    tokens = [int(t[0]) for t in I.steer_generate(params, config, [1, 2, 3], 1, 5, greedy, add)]
    ctx = [1, 2, 3]
    for t in tokens:                                              # each step: the steered forward's argmax
        assert t == int(np.argmax(I.forward(params, config, np.array([ctx]), add=add)[0][0, -1]))
        ctx.append(t)
    with pytest.raises(Exception, match="--steer_layer must be in 0..2"):
        I.steering(params, config, d, 3, 1.0)


def test_the_hessian_of_a_llama_against_finite_differences_of_cores_loss():
    params, config = tiny(tied=True)
    x, y = batch(config, B=2, T=8)
    theta, names, grad = hessian.model_grad_fn(params, config, x, y)
    v = np.random.default_rng(5).standard_normal(theta.size)
    v /= np.linalg.norm(v)
    loss = lambda t: llama.forward(hessian.unflatten(t, params, names), config, x, y)[1]
    h = 1e-4
    assert grad(theta) @ v == pytest.approx((loss(theta + h * v) - loss(theta - h * v)) / (2 * h), rel=1e-6)
    curvature = (loss(theta + 1e-3 * v) - 2 * loss(theta) + loss(theta - 1e-3 * v)) / 1e-6
    assert v @ hessian.hvp(grad, theta, v) == pytest.approx(curvature, rel=1e-3)
    u = np.random.default_rng(6).standard_normal(theta.size)
    assert u @ hessian.hvp(grad, theta, v) == pytest.approx(v @ hessian.hvp(grad, theta, u), rel=1e-5)   # H symmetric


@pytest.mark.parametrize("tied", [False, True])
def test_the_token_ov_circuit_folds_rmsnorm_and_reads_the_head(tied):
    """The copying eigenvalues against the whole V×V matrix W_U diag(g_f) W_O W_V diag(g_1) W_E, formed here."""
    params, config = tiny(tied)
    out = circuits.head_circuits(params, config, 1)
    E = params["model.embed_tokens.weight"]
    U = E if tied else params["lm_head.weight"]
    g1, gf = params["model.layers.1.input_layernorm.weight"], params["model.norm.weight"]
    hw = weights.head_weights(params, config, 1)
    for h in range(4):
        M = U @ np.diag(gf) @ hw["W_O"][h] @ hw["W_V"][h] @ np.diag(g1) @ E.T          # (V, V)
        ev = np.linalg.eigvals(M)
        ev = ev[np.argsort(-np.abs(ev))][:4]
        np.testing.assert_allclose(np.sort_complex(out[h]["token_ov_eigenvalues"]), np.sort_complex(ev), atol=1e-8)
        qk = np.linalg.svd(hw["W_Q"][h].T @ hw["W_K"][h], compute_uv=False)[:4]
        np.testing.assert_allclose(out[h]["qk_singular_values"], qk, atol=1e-10)


def test_the_rotation_is_ropes_and_orthogonal():
    D, theta = 8, 10000.0
    x = np.random.default_rng(0).standard_normal((3, 1, D))
    for t in (0, 1, 5, 13):
        R = circuits.rotation(t, D, theta)
        np.testing.assert_allclose(R.T @ R, np.eye(D), atol=1e-12)
        np.testing.assert_allclose(x @ R.T, L.rope_forward(x, np.array([t]), theta)[0], atol=1e-12)
    np.testing.assert_allclose(circuits.rotation(0, D, theta), np.eye(D))


def test_the_rotary_qk_circuit_is_the_score_between_offsets_and_its_zero_is_the_plain_circuit():
    params, config = tiny()
    sigma = circuits.rotary_qk(params, config, 1)
    assert sigma.shape == (4, config.block_size)
    plain = [c["qk_singular_values"][0] for c in circuits.head_circuits(params, config, 1, fold_ln=False)]
    np.testing.assert_allclose(sigma[:, 0], plain, rtol=1e-10)
    # x_mᵀ W_Qᵀ R(−Δ) W_K x_n is the rotated score (R_m W_Q x_m)·(R_n W_K x_n) with Δ = m − n
    hw = weights.head_weights(params, config, 1)
    rng = np.random.default_rng(2)
    xm, xn = rng.standard_normal(16), rng.standard_normal(16)
    m, n = 11, 4
    q = L.rope_forward((hw["W_Q"][2] @ xm)[None], np.array([m]), config.rope_theta)[0][0]
    k = L.rope_forward((hw["W_K"][2] @ xn)[None], np.array([n]), config.rope_theta)[0][0]
    circuit = hw["W_Q"][2].T @ circuits.rotation(-(m - n), 4, config.rope_theta) @ hw["W_K"][2]
    assert xm @ circuit @ xn == pytest.approx(q @ k, rel=1e-10)


def test_a_head_built_on_one_rotary_pair_has_the_sigma_worked_out_on_paper():
    """Head 0's query is a·x₀ in coordinate 0 only; its key puts s₁·x₁ in coordinate 0 and s₂·x₂ in coordinate 2, the
    partner of 0 (frequency ω = 1). Then q·R(−Δ)k = a x₀ (s₁ cos Δ x₁ + s₂ sin Δ x₂): the circuit is the rank-one
    a e₀ (s₁ cos Δ e₁ + s₂ sin Δ e₂)ᵀ, and σ₁(Δ) = |a| √(s₁² cos² Δ + s₂² sin² Δ)."""
    params, config = tiny()
    a, s1, s2 = 1.5, 2.0, 0.5
    pre = "model.layers.0.self_attn."
    for name in ("q_proj", "k_proj"):
        params[pre + name + ".weight"] = np.zeros_like(params[pre + name + ".weight"])
    params[pre + "q_proj.weight"][0, 0] = a
    params[pre + "k_proj.weight"][0, 1] = s1
    params[pre + "k_proj.weight"][2, 2] = s2
    sigma = circuits.rotary_qk(params, config, 0)
    delta = np.arange(config.block_size)
    np.testing.assert_allclose(sigma[0], abs(a) * np.sqrt(s1 ** 2 * np.cos(delta) ** 2 + s2 ** 2 * np.sin(delta) ** 2),
                               rtol=1e-10)
    np.testing.assert_allclose(sigma[1:], 0, atol=1e-12)          # the other heads have no query weights
    summary = circuits.rotary_summary(sigma)
    assert summary["peak_offset"][0] == 0 and summary["max_over_min"][0] == pytest.approx(
        s1 / np.sqrt(s1 ** 2 * np.cos(delta) ** 2 + s2 ** 2 * np.sin(delta) ** 2).min() * 1, rel=1e-10)


def test_embeddings_and_lowrank_of_a_llama():
    params, config = tiny(dtype=np.float32)
    chars = [chr(65 + i) if i < 10 else chr(97 + i - 10) for i in range(20)]
    emb = analyze_embeddings(params, config, chars)
    assert emb["position_cosine"] is None and len(emb["head_subspaces"]["labels"]) == 8
    shared = emb["head_subspaces"]["read"]
    assert shared[0, 1] == pytest.approx(1.0, abs=1e-5)           # heads 0 and 1 read the same V head
    x, y = batch(config)
    sweep = lowrank.rank_sweep(params, config, [(x, y)], fractions=(0.25, 1.0), progress=False)
    full = sweep["curve"][-1]
    assert full["loss"] == pytest.approx(sweep["base_loss"], abs=1e-5)
    assert sweep["base_loss"] == pytest.approx(llama.forward(params, config, x, y)[1], abs=1e-4)
    assert sweep["curve"][0]["loss"] != pytest.approx(sweep["base_loss"], abs=1e-4)


# ----------------------------------------------------------------------------- the command lines


@pytest.fixture(scope="module")
def llama_dir(shakespeare_head, tmp_path_factory):
    """A tiny Llama (4 query heads, 2 K/V heads) trained 40 steps with --track_spectra."""
    from tinylm.analysis.tracking import log_spectra
    from tinylm.train.args import TrainArgs
    from tinylm.train.loop import train
    out = tmp_path_factory.mktemp("llama_analysis")
    train(TrainArgs(data=shakespeare_head, out_dir=str(out), arch="llama", n_layer=2, n_head=4, n_kv_head=2,
                    n_embd=16, block_size=16, batch_size=8, max_iters=40, lr_decay_iters=40, warmup_iters=5,
                    eval_interval=20, eval_iters=2, learning_rate=3e-3, sample_tokens=0, progress=False,
                    track_spectra=True), log=lambda *a: None, tracker=log_spectra)
    return out


def test_analyze_all_sections_of_a_llama_with_its_report(llama_dir, tmp_path):
    report, poster = tmp_path / "report", tmp_path / "poster.png"
    proc = run_script("analyze.py", llama_dir / "ckpt.npz", "--only", "all", "--report", report, "--compare-init",
                      "--compare", llama_dir / "best.npz", "--poster", poster, "--n-boot", "5", "--eval-seqs", "4",
                      "--hessian-k", "1", "--hessian-batch", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "rotary QK circuit" in proc.stdout and "h1.mlp.gate" in proc.stdout
    m = json.load(open(report / "metrics.json"))
    for section in ("spectra", "circuits", "embeddings", "probes", "lowrank", "curvature", "ablation", "training"):
        assert section in m, section
    rot = m["circuits"]["rotary"]
    assert np.array(rot["sigma1"]).shape == (2, 4, 16) and len(rot["peak_offset"]) == 2
    assert "rotary" in m["circuits"]["init"]
    assert "h0.attn.o" in m["spectra"]["init"] and len(m["training"]["spectra"]) == 3
    assert m["ablation"]["delta"] and m["compare"]["matrices"]["h1.mlp.down"]["k"] >= 1
    assert "whitened_loss" in m["lowrank"]["curve"][0] and m["lowrank"]["samples"]    # tinylm.compress whitens a Llama
    page = re.sub(r"base64,[A-Za-z0-9+/=]+", "", open(report / "index.html", encoding="utf-8").read())
    assert "the-qk-circuit-under-rotation" in page and page.count("<img") >= 15
    for gpt2_name in ("c_attn", "ln_f", "c_fc", "wte", "wpe", "ln_1"):       # no GPT-2 name on a Llama's page
        assert not re.search(rf"\b{gpt2_name}\b", page), gpt2_name
    assert poster.stat().st_size > 10_000


def test_ablate_and_steer_a_llama_from_the_command_line(llama_dir):
    proc = run_script("analyze.py", llama_dir / "ckpt.npz", "--ablate", "L1H3,L0H0", "--ablate-mode", "mean", "--eval-seqs", "2")
    assert proc.returncode == 0, proc.stderr
    assert "L1H3+L0H0 together" in proc.stdout
    texts = {}
    for layer in ("0", "1"):
        proc = run_script("sample.py", "--out_dir", llama_dir, "--steer", "case", "--steer_layer", layer, "--steer_scale",
                          "3", "--max_new_tokens", "20", "--num_samples", "2", "--start", "a")
        assert proc.returncode == 0, proc.stderr
        assert f"block {layer}'s input" in proc.stderr and len(proc.stdout.split("---------------")) == 3
        texts[layer] = proc.stdout
    assert texts["0"] != texts["1"]
