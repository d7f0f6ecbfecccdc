"""The model-facing analysis on inputs whose answers are known: head extraction, circuits, head detection,
probes and logit lens, low-rank truncation, Hessian-vector products and tracking."""
import json

import numpy as np
import pytest

from tinylm.fast import model as M
from tinylm.core import gpt2 as G
from tinylm.analysis import circuits, embeddings, hessian, linalg, lowrank, probes, tracking, weights


@pytest.fixture(scope="module")
def small():
    config = G.GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=8)
    return config, G.init_params(config, seed=3, dtype=np.float64)


# ---------------------------------------------------------------- weights and circuits


def test_head_blocks_are_the_slices_the_forward_pass_uses(small):
    config, params = small
    C, H, D = 8, 2, 4
    c_attn = params["transformer.h.1.attn.c_attn.weight"]
    c_proj = params["transformer.h.1.attn.c_proj.weight"]
    hw = weights.head_weights(params, config, 1)
    x = np.random.default_rng(0).standard_normal((5, C))
    q, k, v = np.split(x @ c_attn.T, 3, axis=-1)
    for h in range(H):
        cols = slice(h * D, (h + 1) * D)
        np.testing.assert_allclose(x @ hw["W_Q"][h].T, q[:, cols])
        np.testing.assert_allclose(x @ hw["W_K"][h].T, k[:, cols])
        np.testing.assert_allclose(x @ hw["W_V"][h].T, v[:, cols])
    # c_proj applied to the concatenated heads is the sum of each head's W_O block
    a = np.random.default_rng(1).standard_normal((5, C))
    np.testing.assert_allclose(a @ c_proj.T, sum(a[:, h * D:(h + 1) * D] @ hw["W_O"][h].T for h in range(H)))
    mats = weights.weight_matrices(params, config, per_head=True)
    np.testing.assert_array_equal(mats["h1.attn.k"], c_attn[C:2 * C])
    np.testing.assert_array_equal(mats["h1.attn.v.head1"], c_attn[2 * C + D:3 * C])
    assert mats["h1.attn.c_proj.head0"].shape == (C, D)


def test_circuits_match_the_formed_products(small):
    config, params = small
    C, D = 8, 4
    c_attn = params["transformer.h.0.attn.c_attn.weight"]
    c_proj = params["transformer.h.0.attn.c_proj.weight"]
    wte = params["transformer.wte.weight"]
    out = circuits.head_circuits(params, config, 0, fold_ln=False)
    for h, res in enumerate(out):
        rows = slice(h * D, (h + 1) * D)
        W_QK = c_attn[:C][rows].T @ c_attn[C:2 * C][rows]
        W_OV = c_proj[:, rows] @ c_attn[2 * C:][rows]
        np.testing.assert_allclose(res["qk_singular_values"], np.linalg.svd(W_QK, compute_uv=False)[:D], atol=1e-12)
        np.testing.assert_allclose(res["ov_singular_values"], np.linalg.svd(W_OV, compute_uv=False)[:D], atol=1e-12)
        full = np.linalg.eigvals(wte @ W_OV @ wte.T)
        full = full[np.argsort(-np.abs(full))][:D]
        np.testing.assert_allclose(np.sort_complex(res["token_ov_eigenvalues"]), np.sort_complex(full), atol=1e-10)
        assert res["copying_score"] == pytest.approx(linalg.copying_score(full), abs=1e-9)


def test_an_identity_ov_circuit_copies():
    config = G.GPTConfig(block_size=4, vocab_size=6, n_layer=1, n_head=1, n_embd=4)
    params = G.init_params(config, seed=0, dtype=np.float64)
    C = 4
    params["transformer.h.0.attn.c_attn.weight"][2 * C:] = np.eye(C)       # W_V = I
    params["transformer.h.0.attn.c_proj.weight"][:] = np.eye(C)            # W_O = I
    res = circuits.head_circuits(params, config, 0, fold_ln=False)[0]
    assert res["copying_score"] == pytest.approx(1.0)                      # wte wteᵀ is positive semi-definite
    params["transformer.h.0.attn.c_proj.weight"][:] = -np.eye(C)
    assert circuits.head_circuits(params, config, 0, fold_ln=False)[0]["copying_score"] == pytest.approx(-1.0)


def test_previous_token_and_induction_scores_on_hand_built_patterns():
    T, L = 8, 4
    att = np.zeros((2, 3, T, T))
    att[:, :, 0, 0] = 1
    for t in range(1, T):
        att[:, 0, t, t - 1] = 1                   # head 0: previous token
        att[:, 1, t, :t + 1] = 1 / (t + 1)        # head 1: uniform
        att[:, 2, t, t] = 1                       # head 2: itself ...
    for t in range(L, T):
        att[:, 2, t] = 0
        att[:, 2, t, t - L + 1] = 1               # ... and in the second copy, the token after the earlier occurrence
    prev = circuits.previous_token_scores(att)
    ind = circuits.induction_scores(att, L)
    assert prev[0] == 1 and prev[2] < 0.5 and prev[1] == pytest.approx(np.mean([1 / (t + 1) for t in range(1, T)]))
    assert ind[2] == 1 and ind[0] < 0.3
    idx, period = circuits.repeated_random_tokens(G.GPTConfig(block_size=10, vocab_size=7), n_seq=3)
    assert period == 5 and np.array_equal(idx[:, :5], idx[:, 5:])


def test_planted_previous_token_head_is_detected():
    """A head whose query is position t and key position t-1 (through the position embeddings) attends back one step."""
    T, C = 8, 16
    config = G.GPTConfig(block_size=T, vocab_size=5, n_layer=1, n_head=1, n_embd=C)
    params = G.init_params(config, seed=0, dtype=np.float64)
    params["transformer.wte.weight"][:] = 0
    wpe = np.zeros((T, C))
    wpe[np.arange(T), np.arange(T)] = 1.0          # position t is basis vector e_t (LN keeps it distinct)
    params["transformer.wpe.weight"][:] = wpe
    W = np.zeros((3 * C, C))
    W[np.arange(T - 1) + 1, np.arange(T - 1) + 1] = 40.0  # query of position t: e_t
    W[C + np.arange(T - 1) + 1, np.arange(T - 1)] = 40.0  # key of position t-1: e_t
    params["transformer.h.0.attn.c_attn.weight"][:] = W
    idx = np.random.default_rng(0).integers(0, 5, size=(2, T))
    scores = circuits.head_pattern_scores(params, config, idx, n_seq=2)
    assert scores["previous_token"][0, 0] > 0.95
    assert scores["previous_token_heads"] == [[0, 0]]


# ---------------------------------------------------------------- embeddings


def test_case_analogy_finds_a_planted_case_direction():
    chars = list("ABCDabcd!")
    rng = np.random.default_rng(0)
    # nearly orthogonal unit vectors in 256 dimensions: upper case = lower case + one shared case direction
    vecs = rng.standard_normal((6, 256)) / 16
    base, case = dict(zip("abcd!", vecs)), vecs[5]
    E = np.array([base[c.lower()] + case if c.isupper() else base[c] for c in chars])
    res = embeddings.case_analogies(E, chars)
    assert res["n"] == 12 and res["top1_accuracy"] == 1.0 and res["mean_rank"] == 1.0


def test_head_subspace_overlap_is_one_for_shared_and_zero_for_orthogonal_heads():
    config = G.GPTConfig(block_size=4, vocab_size=5, n_layer=1, n_head=2, n_embd=4)
    params = G.init_params(config, seed=0, dtype=np.float64)
    W = np.zeros((12, 4))
    W[8:10, 0:2] = np.eye(2)      # head 0 reads e0, e1
    W[10:12, 2:4] = np.eye(2)     # head 1 reads e2, e3
    params["transformer.h.0.attn.c_attn.weight"][:] = W
    params["transformer.h.0.attn.c_proj.weight"][:] = np.hstack([np.eye(4)[:, :2], np.eye(4)[:, :2] @ [[1, 1], [0, 1]]])
    res = embeddings.head_subspace_overlaps(params, config)
    assert res["read"][0, 1] == pytest.approx(0.0, abs=1e-12)
    assert res["write"][0, 1] == pytest.approx(1.0)
    assert res["random_baseline"] == 0.5


# ---------------------------------------------------------------- probes and logit lens


def test_logit_lens_of_the_last_layer_is_the_model_loss(small):
    config, params = small
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 11, (3, 8)), rng.integers(0, 11, (3, 8))
    res = probes.analyze_probes(params, config, x, y, list("abcdefghijk"))
    _, loss, _ = M.forward(params, config, x, y)
    assert res["logit_lens"]["loss"][-1] == pytest.approx(loss, rel=1e-9)
    assert len(res["logit_lens"]["loss"]) == config.n_layer + 1
    assert set(res["probes"]) == {"current character", "previous character", "next character is a vowel", "position"}
    targets = probes.probe_targets(x, y, list("abcdefghijk"))
    assert np.array_equal(targets["next character is a vowel"][1], np.isin(y, [0, 4, 8]).ravel())   # a, e, i
    assert np.array_equal(targets["previous character"][1].reshape(3, 8)[:, 1:], x[:, :-1])


def test_probe_reads_a_planted_feature_only_where_it_is():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    noise = rng.standard_normal((600, 6))
    planted = noise + 5 * np.eye(6)[labels]
    out = probes.run_probes([noise[None], planted[None]], {"label": ("class", labels)})
    scores = [r["score"] for r in out["label"]["per_layer"]]
    assert scores[1] > 0.95 and abs(scores[0] - 1 / 3) < 0.1


# ---------------------------------------------------------------- low rank


def test_full_rank_truncation_keeps_the_loss_and_rank_one_hurts(small):
    config, params = small
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 11, (2, 8)), rng.integers(0, 11, (2, 8)))]
    base = lowrank.mean_loss(params, config, batches)
    factors = lowrank.svd_all(params, weights.linear_weight_names(config))
    full, kept, dense = lowrank.truncated_params(params, factors, 1.0)
    assert lowrank.mean_loss(full, config, batches) == pytest.approx(base, rel=1e-12)
    assert kept == dense
    res = lowrank.rank_sweep(params, config, batches, fractions=(0.125, 1.0), progress=False)
    assert res["curve"][-1]["relative_increase"] == pytest.approx(0.0, abs=1e-12)
    assert res["curve"][0]["param_fraction"] < 1
    assert res["smallest_within_tolerance"] is not None


# ---------------------------------------------------------------- Hessian


def test_lanczos_on_hvps_recovers_a_known_quadratic():
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.standard_normal((30, 30)))[0]
    eig = np.concatenate([[50.0, 20.0, 7.0], rng.uniform(-1, 1, 27)])
    A = Q @ np.diag(eig) @ Q.T
    grad = lambda theta: A @ theta                  # L = ½ θᵀAθ
    theta = rng.standard_normal(30)
    v = rng.standard_normal(30)
    np.testing.assert_allclose(hessian.hvp(grad, theta, v), A @ v, rtol=1e-8)
    vals, _ = hessian.top_eigenvalues(grad, theta, k=3, n_iter=30)
    np.testing.assert_allclose(vals, [50.0, 20.0, 7.0], rtol=1e-8)


def test_model_hvp_matches_second_differences_and_is_symmetric(small):
    config, params = small
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 11, (2, 8)), rng.integers(0, 11, (2, 8))
    theta, names, grad = hessian.model_grad_fn(params, config, x, y)
    u, v = rng.standard_normal(len(theta)), rng.standard_normal(len(theta))
    u /= np.linalg.norm(u)
    v /= np.linalg.norm(v)
    Hv, Hu = hessian.hvp(grad, theta, v), hessian.hvp(grad, theta, u)
    # uᵀHv from losses alone: the mixed second difference of L
    like = {n: params[n] for n in names}
    L = lambda t: M.forward(hessian.unflatten(t, like, names), config, x, y)[1]
    e = 1e-3
    mixed = (L(theta + e * u + e * v) - L(theta + e * u - e * v) - L(theta - e * u + e * v) + L(theta - e * u - e * v)) / (4 * e * e)
    assert u @ Hv == pytest.approx(mixed, rel=1e-4, abs=1e-6)
    assert u @ Hv == pytest.approx(v @ Hu, rel=1e-6, abs=1e-9)
    # the finite difference is converged: a ten times smaller step gives the same product
    np.testing.assert_allclose(hessian.hvp(grad, theta, v, eps=1e-5), Hv, rtol=1e-4, atol=1e-8)


# ---------------------------------------------------------------- tracking


def test_log_spectra_appends_strict_json_lines(small, tmp_path):
    config, params = small
    path = tmp_path / "spectra.jsonl"
    tracking.log_spectra(params, config, 0, str(path))
    tracking.log_spectra(params, config, 10, str(path))
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 10]
    m = rows[0]["matrices"]["h0.attn.q"]
    s = np.linalg.svd(params["transformer.h.0.attn.c_attn.weight"][:8], compute_uv=False)
    assert m["spectral"] == pytest.approx(s[0]) and m["stable_rank"] == pytest.approx(np.sum(s**2) / s[0] ** 2)
    assert set(rows[0]["matrices"]) == set(weights.weight_matrices(params, config))
    assert tracking.read_jsonl(str(path)) == rows
