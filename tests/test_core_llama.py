"""The Llama of tinylm/core/llama.py and the layers it adds to tinylm/core/layers.py, in float64: every new
backward against central finite differences, the whole model's gradient, and the properties the linear algebra
promises (rotations are orthogonal, scores depend on offsets only, RMSNorm fixes the norm, shared K/V heads are
repeated ones)."""
import math

import numpy as np
import pytest

from tinylm.core import gpt2
from tinylm.cli import gradcheck
from tinylm.core import layers as L
from tinylm.core import llama
from tinylm.errors import TinyLMError

EPS = 1e-6
TOL = 1e-7


def rel_error(a, b):
    """max|a − b| / max|b|."""
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def numerical_grad(f, x, eps=EPS):
    """∂f/∂x by central differences, one entry of x at a time: the package's own checker (cli/gradcheck.py)."""
    return gradcheck.numerical_gradient(f, x, eps=eps)


def weighted_sum(forward, R):
    """The scalar Σ out ⊙ R, whose gradient with respect to out is R."""
    return lambda: float(np.sum(forward() * R))


# ----------------------------------------------------------------------------- RMSNorm


def test_rmsnorm_output_has_rms_one_before_the_gain():
    rng = np.random.default_rng(0)
    x = 3.0 + 5.0 * rng.standard_normal((4, 7, 16))
    y, _ = L.rmsnorm_forward(x, np.ones(16), eps=0.0)
    np.testing.assert_allclose(np.sqrt((y ** 2).mean(-1)), 1.0, rtol=1e-14)
    assert np.abs(y.mean(-1)).max() > 0.1                  # unlike layer norm, the mean is not removed
    ms = (x ** 2).mean(-1)
    y, _ = L.rmsnorm_forward(x, np.ones(16))                # ε = 1e-5 shrinks the rms a hair
    np.testing.assert_allclose((y ** 2).mean(-1), ms / (ms + 1e-5), rtol=1e-14)
    w = rng.standard_normal(16)
    np.testing.assert_allclose(L.rmsnorm_forward(x, w)[0], y * w, rtol=1e-14)


def test_rmsnorm_backward():
    rng = np.random.default_rng(1)
    x, w = 1.0 + rng.standard_normal((2, 3, 6)), rng.standard_normal(6)
    y, cache = L.rmsnorm_forward(x, w, eps=1e-3)
    R = rng.standard_normal(y.shape)
    dx, grads = L.rmsnorm_backward(R, cache)
    f = weighted_sum(lambda: L.rmsnorm_forward(x, w, eps=1e-3)[0], R)
    assert rel_error(dx, numerical_grad(f, x)) < TOL
    assert set(grads) == {"w"} and rel_error(grads["w"], numerical_grad(f, w)) < TOL


# ----------------------------------------------------------------------------- rotary position embeddings


def rope_by_pairs(x, positions, theta):
    """Hugging Face's layout written out: pair (j, j + D/2) of position t turned by positions[t]·θ^(−2j/D)."""
    D = x.shape[-1]
    y = np.empty_like(x)
    for t, m in enumerate(positions):
        for j in range(D // 2):
            a = m * theta ** (-2 * j / D)
            x1, x2 = x[..., t, j], x[..., t, j + D // 2]
            y[..., t, j] = math.cos(a) * x1 - math.sin(a) * x2
            y[..., t, j + D // 2] = math.sin(a) * x1 + math.cos(a) * x2
    return y


def rope_matrix(position, D, theta=10000.0):
    """R with rope_forward(x, [position]) = R x, built from rope_forward applied to the identity's columns."""
    columns, _ = L.rope_forward(np.eye(D)[:, None, :], np.array([position]), theta)     # (D, 1, D): R e_i
    return columns[:, 0, :].T


def test_rope_forward_is_the_pairwise_rotation():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 5, 8))
    positions = np.array([0, 1, 2, 7, 100])
    y, _ = L.rope_forward(x, positions, theta=500.0)
    np.testing.assert_allclose(y, rope_by_pairs(x, positions, 500.0), rtol=1e-13, atol=1e-14)
    np.testing.assert_array_equal(y[..., 0, :], x[..., 0, :])             # position 0 is not turned


@pytest.mark.parametrize("position", [0, 1, 5, 63, 1000])
def test_each_rope_rotation_is_orthogonal(position):
    R = rope_matrix(position, 8)
    np.testing.assert_allclose(R.T @ R, np.eye(8), atol=1e-12)
    assert abs(np.linalg.det(R) - 1.0) < 1e-12                            # a rotation, not a reflection
    if position:
        assert np.abs(R - np.eye(8)).max() > 1e-3                         # and not the identity


def test_rope_scores_depend_only_on_the_offset():
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((2, 3, 6, 8)), rng.standard_normal((2, 3, 6, 8))
    positions = np.arange(6)

    def scores(s):
        return L.rope_forward(q, positions + s)[0] @ L.rope_forward(k, positions + s)[0].transpose(0, 1, 3, 2)

    for s in (1, 7, 1000):
        np.testing.assert_allclose(scores(s), scores(0), rtol=1e-11, atol=1e-12)
    # (R_m q)·(R_n k) = q·R_{n−m} k, position by position
    m, n = 2, 5
    lhs = (rope_matrix(m, 8) @ q[0, 0, 0]) @ (rope_matrix(n, 8) @ k[0, 0, 0])
    assert abs(lhs - q[0, 0, 0] @ rope_matrix(n - m, 8) @ k[0, 0, 0]) < 1e-12
    assert np.abs(scores(0) - q @ k.transpose(0, 1, 3, 2)).max() > 1e-2   # the rotation does reach the scores


def test_rope_backward_is_the_transpose():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 2, 4, 6))
    positions = np.array([3, 0, 9, 4])
    y, cache = L.rope_forward(x, positions, theta=100.0)
    R = rng.standard_normal(y.shape)
    dx = L.rope_backward(R, cache)
    assert rel_error(dx, numerical_grad(weighted_sum(lambda: L.rope_forward(x, positions, 100.0)[0], R), x)) < TOL
    np.testing.assert_allclose(L.rope_backward(y, cache), x, rtol=1e-13, atol=1e-14)   # Rᵀ R x = x


# ----------------------------------------------------------------------------- SwiGLU


def test_swiglu():
    rng = np.random.default_rng(5)
    g, u = 3.0 * rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 5))
    y, cache = L.swiglu_forward(g, u)
    np.testing.assert_allclose(y, g / (1.0 + np.exp(-g)) * u, rtol=1e-14)
    R = rng.standard_normal(y.shape)
    dg, du = L.swiglu_backward(R, cache)
    f = weighted_sum(lambda: L.swiglu_forward(g, u)[0], R)
    assert rel_error(dg, numerical_grad(f, g)) < TOL
    assert rel_error(du, numerical_grad(f, u)) < TOL
    with np.errstate(all="raise"):                                       # no overflow far from 0
        y, cache = L.swiglu_forward(np.array([-1000.0, 1000.0]), np.ones(2))
        L.swiglu_backward(np.ones(2), cache)
    np.testing.assert_allclose(y, [0.0, 1000.0])


# ----------------------------------------------------------------------------- attention with shared K/V heads


def grouped_attention_by_loops(q, k, v):
    """Each query head h reads K/V head h // G, one query at a time."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    y = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                s = k[b, h // G, :t + 1] @ q[b, h, t] / math.sqrt(D)
                a = np.exp(s - s.max())
                y[b, h, t] = (a / a.sum()) @ v[b, h // G, :t + 1]
    return y


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_grouped_attention(n_kv_head):
    rng = np.random.default_rng(6)
    q = rng.standard_normal((2, 4, 5, 3))
    k, v = rng.standard_normal((2, n_kv_head, 5, 3)), rng.standard_normal((2, n_kv_head, 5, 3))
    y, cache = L.grouped_attention_forward(q, k, v)
    np.testing.assert_allclose(y, grouped_attention_by_loops(q, k, v), rtol=1e-13, atol=1e-14)
    R = rng.standard_normal(y.shape)
    dq, dk, dv = L.grouped_attention_backward(R, cache)
    assert dk.shape == k.shape and dv.shape == v.shape
    f = weighted_sum(lambda: L.grouped_attention_forward(q, k, v)[0], R)
    for analytic, x in ((dq, q), (dk, k), (dv, v)):
        assert rel_error(analytic, numerical_grad(f, x)) < TOL


def test_grouped_attention_with_as_many_kv_heads_is_gpt2_attention():
    rng = np.random.default_rng(7)
    qkv = rng.standard_normal((2, 5, 3 * 8))
    q, k, v = (L.split_heads(a, 2) for a in np.split(qkv, 3, axis=-1))
    y, cache = L.grouped_attention_forward(q, k, v)
    np.testing.assert_array_equal(L.merge_heads(y), L.attention_forward(qkv, 2)[0])
    R = rng.standard_normal(y.shape)
    np.testing.assert_array_equal(np.concatenate([L.merge_heads(d) for d in L.grouped_attention_backward(R, cache)], -1),
                                  L.attention_backward(L.merge_heads(R), L.attention_forward(qkv, 2)[1]))


def test_shared_kv_heads_equal_repeated_ones():
    rng = np.random.default_rng(8)
    q, k, v = rng.standard_normal((1, 6, 4, 2)), rng.standard_normal((1, 2, 4, 2)), rng.standard_normal((1, 2, 4, 2))
    y, _ = L.grouped_attention_forward(q, k, v)
    y_rep, _ = L.grouped_attention_forward(q, np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1))
    np.testing.assert_array_equal(y, y_rep)


def test_embedding_without_positions():
    idx = np.array([[1, 3, 1]])
    wte = np.random.default_rng(9).standard_normal((5, 2))
    x, cache = L.embedding_forward(idx, wte)
    np.testing.assert_array_equal(x[0], wte[[1, 3, 1]])
    grads = L.embedding_backward(np.ones((1, 3, 2)), cache)
    assert set(grads) == {"wte"}
    np.testing.assert_array_equal(grads["wte"][:, 0], [0, 2, 0, 1, 0])


# ----------------------------------------------------------------------------- the config


def test_config_defaults_round_trip_and_refuse_unknown_or_missing_fields():
    config = llama.LlamaConfig(n_embd=128, n_head=4)
    assert config.n_kv_head == 4 and config.ffn_hidden == 352 and config.arch == "llama"
    assert llama.LlamaConfig(n_embd=4096, n_head=32).ffn_hidden == 10944     # 2/3 of 4C, up to a multiple of 32
    assert llama.LlamaConfig(n_embd=48, n_head=4).ffn_hidden == 128
    config = llama.LlamaConfig(block_size=16, vocab_size=13, n_layer=3, n_head=4, n_kv_head=2, n_embd=16,
                               ffn_hidden=40, rope_theta=500.0, norm_eps=1e-6, tie_embeddings=True)
    d = config.to_dict()
    assert d["arch"] == "llama" and llama.LlamaConfig.from_dict(d) == config
    with pytest.raises(TinyLMError, match="unknown.*bias"):
        llama.LlamaConfig.from_dict(dict(d, bias=False))
    with pytest.raises(TinyLMError, match="missing.*rope_theta"):
        llama.LlamaConfig.from_dict({k: v for k, v in d.items() if k != "rope_theta"})
    with pytest.raises(TinyLMError, match="JSON object"):
        llama.LlamaConfig.from_dict([1, 2])
    assert llama.LlamaConfig.from_dict(dict(d, n_kv_head=None, ffn_hidden=None)).n_kv_head == 4


@pytest.mark.parametrize("field,value,flag", [
    ("n_kv_head", 3, "--n_kv_head"), ("n_kv_head", 0, "--n_kv_head"), ("n_embd", 12, "--n_embd"),
    ("n_head", 3, "--n_head"), ("rope_theta", 0.0, "--rope_theta"), ("rope_theta", -1.0, "--rope_theta"),
    ("rope_theta", math.inf, "--rope_theta"), ("rope_theta", math.nan, "--rope_theta"),
    ("rope_theta", "1e4", "--rope_theta"), ("ffn_hidden", 0, "--ffn_hidden"), ("ffn_hidden", 2.5, "--ffn_hidden"),
    ("norm_eps", 0.0, "--norm_eps"), ("tie_embeddings", "yes", "--tie_embeddings"), ("dropout", 1.0, "--dropout"),
    ("block_size", 0, "--block_size"), ("arch", "gpt2", "arch")])
def test_config_names_the_flag_that_cannot_work(field, value, flag):
    d = llama.LlamaConfig(n_head=4, n_kv_head=2, n_embd=16).to_dict()
    with pytest.raises(TinyLMError, match=flag) as e:
        llama.LlamaConfig.from_dict(dict(d, **{field: value}))
    assert "\n" not in str(e.value)


def test_odd_head_width_is_refused_for_rotary_pairs():
    with pytest.raises(TinyLMError, match="even"):
        llama.LlamaConfig(n_embd=12, n_head=4).validate()         # D = 3


# ----------------------------------------------------------------------------- parameters


def test_param_names_and_shapes_are_hugging_face_llamas():
    config = llama.LlamaConfig(vocab_size=11, n_layer=1, n_head=4, n_kv_head=2, n_embd=16, ffn_hidden=24)
    assert llama.param_shapes(config) == {
        "model.embed_tokens.weight": (11, 16),
        "model.layers.0.self_attn.q_proj.weight": (16, 16), "model.layers.0.self_attn.k_proj.weight": (8, 16),
        "model.layers.0.self_attn.v_proj.weight": (8, 16), "model.layers.0.self_attn.o_proj.weight": (16, 16),
        "model.layers.0.mlp.gate_proj.weight": (24, 16), "model.layers.0.mlp.up_proj.weight": (24, 16),
        "model.layers.0.mlp.down_proj.weight": (16, 24),
        "model.layers.0.input_layernorm.weight": (16,), "model.layers.0.post_attention_layernorm.weight": (16,),
        "model.norm.weight": (16,), "lm_head.weight": (11, 16)}
    tied = llama.LlamaConfig(**dict(config.to_dict(), tie_embeddings=True))
    assert set(llama.param_shapes(config)) - set(llama.param_shapes(tied)) == {"lm_head.weight"}
    assert llama.count_params(config) - llama.count_params(tied) == 11 * 16
    assert llama.count_params(config) == 2 * 11 * 16 + 16 * 16 * 2 + 8 * 16 * 2 + 24 * 16 * 3 + 3 * 16
    assert all(llama.is_block_matrix(n, s) == (n.startswith("model.layers.") and len(s) == 2)
               for n, s in llama.param_shapes(config).items())


def test_init_is_reproducible_from_the_seed_and_scaled_like_gpt2():
    config = llama.LlamaConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    a, b = llama.init_params(config, seed=3), llama.init_params(config, seed=3)
    assert list(a) == list(llama.param_shapes(config))
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == np.float32 for k in a)
    assert not np.array_equal(a["model.embed_tokens.weight"], llama.init_params(config, seed=4)["model.embed_tokens.weight"])
    assert all(np.all(v == 1.0) for k, v in a.items() if k.endswith("norm.weight"))
    for name, std in (("model.layers.1.mlp.up_proj.weight", 0.02), ("model.layers.1.mlp.down_proj.weight", 0.01),
                      ("model.layers.0.self_attn.o_proj.weight", 0.01), ("lm_head.weight", 0.02)):
        assert abs(a[name].std() / std - 1) < 0.1, name                 # 0.02/√(2·2) = 0.01
    assert llama.init_params(config, seed=3, dtype=np.float64)["model.norm.weight"].dtype == np.float64


# ----------------------------------------------------------------------------- the whole model


def tiny(**kw):
    return llama.LlamaConfig(**dict(dict(block_size=5, vocab_size=7, n_layer=2, n_head=2, n_kv_head=1, n_embd=8,
                                         ffn_hidden=12, rope_theta=100.0), **kw))


def perturbed_params(config, seed, scale=0.1):
    """init_params in float64 with every entry moved off its start (RMSNorm gains of exactly 1 would hide one)."""
    rng = np.random.default_rng(seed)
    return {k: v + scale * rng.standard_normal(v.shape) for k, v in llama.init_params(config, seed, np.float64).items()}


def batch(config, B, T, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, size=(B, T)), rng.integers(0, config.vocab_size, size=(B, T))


def llama_by_hand(P, config, idx):
    """The logits written another way: one query head at a time reading K/V head h // G, each pair turned by
    rope_by_pairs, silu as g/(1 + e^−g)."""
    H, T = config.n_head, idx.shape[1]
    D, G = config.n_embd // H, H // config.n_kv_head
    future = np.triu(np.ones((T, T), dtype=bool), k=1)

    def norm(x, w):
        return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + config.norm_eps) * w

    x = P["model.embed_tokens.weight"][idx]
    for i in range(config.n_layer):
        W = {n: P[f"model.layers.{i}.{n}.weight"] for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
             "post_attention_layernorm")}
        h = norm(x, W["input_layernorm"])
        heads = []
        for head in range(H):
            rows, kv_rows = slice(head * D, head * D + D), slice(head // G * D, head // G * D + D)
            q = rope_by_pairs(h @ W["self_attn.q_proj"][rows].T, range(T), config.rope_theta)
            k = rope_by_pairs(h @ W["self_attn.k_proj"][kv_rows].T, range(T), config.rope_theta)
            s = np.where(future, -np.inf, q @ k.transpose(0, 2, 1) / math.sqrt(D))
            a = np.exp(s - s.max(axis=-1, keepdims=True))
            heads.append(a / a.sum(axis=-1, keepdims=True) @ (h @ W["self_attn.v_proj"][kv_rows].T))
        x = x + np.concatenate(heads, axis=-1) @ W["self_attn.o_proj"].T
        h = norm(x, W["post_attention_layernorm"])
        g, u = h @ W["mlp.gate_proj"].T, h @ W["mlp.up_proj"].T
        x = x + (g / (1.0 + np.exp(-g)) * u) @ W["mlp.down_proj"].T
    head = P["model.embed_tokens.weight" if config.tie_embeddings else "lm_head.weight"]
    return norm(x, P["model.norm.weight"]) @ head.T


@pytest.mark.parametrize("kw", [dict(n_kv_head=1), dict(n_kv_head=2, tie_embeddings=True),
                                dict(n_head=4, n_kv_head=2, n_embd=16, norm_eps=0.05, rope_theta=10.0)])
def test_llama_forward_is_the_model_written_another_way(kw):
    config = tiny(block_size=6, **kw)
    params = perturbed_params(config, seed=3, scale=0.3)
    idx, targets = batch(config, B=2, T=6)
    logits, loss, _ = llama.forward(params, config, idx, targets)
    np.testing.assert_allclose(logits, llama_by_hand(params, config, idx), rtol=1e-12, atol=1e-13)
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    assert abs(loss + np.take_along_axis(logp, targets[..., None], -1).mean()) < 1e-13


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_llama_gradient_matches_finite_differences(tie, n_kv_head):
    config = tiny(n_kv_head=n_kv_head, tie_embeddings=tie)
    params = perturbed_params(config, seed=2)
    idx, targets = batch(config, B=2, T=4)
    _, _, cache = llama.forward(params, config, idx, targets)
    grads = llama.backward(params, config, cache)
    assert list(grads) == list(params) == list(llama.param_shapes(config))
    for name, p in params.items():
        assert grads[name].shape == p.shape
        numerical = numerical_grad(lambda: llama.forward(params, config, idx, targets)[1], p, eps=1e-5)
        assert rel_error(grads[name], numerical) < 1e-6, name


def repeat_kv_weights(params, config):
    """params of a Llama with n_kv_head = n_head computing the same function: each K/V head's rows of k_proj and
    v_proj repeated for the G query heads that share it."""
    G, D = config.n_head // config.n_kv_head, config.n_embd // config.n_head
    out = dict(params)
    for name, W in params.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            out[name] = np.repeat(W.reshape(config.n_kv_head, D, -1), G, axis=0).reshape(config.n_head * D, -1)
    return out


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_shared_kv_heads_equal_a_llama_with_repeated_kv_weights(n_kv_head):
    config = tiny(n_head=4, n_kv_head=n_kv_head, n_embd=16)
    full = llama.LlamaConfig(**dict(config.to_dict(), n_kv_head=4))
    params = perturbed_params(config, seed=4)
    idx, targets = batch(config, B=2, T=5)
    logits, loss, cache = llama.forward(params, config, idx, targets)
    logits_full, loss_full, cache_full = llama.forward(repeat_kv_weights(params, config), full, idx, targets)
    np.testing.assert_allclose(logits, logits_full, rtol=1e-13, atol=1e-13)
    grads, grads_full = llama.backward(params, config, cache), llama.backward(params, full, cache_full)
    G, D = 4 // n_kv_head, 4
    for name in grads:               # a shared row's gradient is the sum of its copies'
        want = grads_full[name]
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            want = want.reshape(n_kv_head, G, D, -1).sum(axis=1).reshape(n_kv_head * D, -1)
        np.testing.assert_allclose(grads[name], want, rtol=1e-12, atol=1e-14)


def test_future_tokens_never_change_earlier_logits():
    config = tiny(block_size=8)
    params = perturbed_params(config, seed=5)
    idx, _ = batch(config, B=1, T=8)
    base, _, _ = llama.forward(params, config, idx)
    for t in range(8):
        changed = idx.copy()
        changed[0, t] = (changed[0, t] + 1) % config.vocab_size
        logits, _, _ = llama.forward(params, config, changed)
        np.testing.assert_array_equal(logits[0, :t], base[0, :t])
        assert np.abs(logits[0, t:] - base[0, t:]).max() > 0


def test_position_reaches_the_logits_through_rotation_only(monkeypatch):
    """Llama has no wpe, yet the same token after the same tokens gets different logits at different positions:
    in one block, [3 5] and [3 5 3 5] hold each token as often, so only the rotation tells them apart. With every
    position turned by 0, it cannot."""
    config = tiny(block_size=4, n_layer=1)
    params = perturbed_params(config, seed=6)
    idx = np.array([[3, 5, 3, 5]])
    logits, _, _ = llama.forward(params, config, idx)
    assert np.abs(logits[0, 1] - logits[0, 3]).max() > 1e-4
    rope = L.rope_forward
    monkeypatch.setattr(L, "rope_forward", lambda x, positions, theta: rope(x, 0 * positions, theta))
    logits, _, _ = llama.forward(params, config, idx)
    np.testing.assert_allclose(logits[0, 1], logits[0, 3], rtol=1e-13, atol=1e-14)


def test_forward_refuses_long_sequences_and_backward_without_targets():
    config = tiny()
    params = perturbed_params(config, seed=0)
    with pytest.raises(TinyLMError):
        llama.forward(params, config, np.zeros((1, config.block_size + 1), dtype=int))
    _, loss, cache = llama.forward(params, config, np.zeros((1, 3), dtype=int))
    assert loss is None
    with pytest.raises(TinyLMError):
        llama.backward(params, config, cache)


def test_generate_is_greedy_forward_over_a_sliding_window():
    config = tiny(block_size=4, tie_embeddings=True)
    params = perturbed_params(config, seed=7, scale=1.0)
    out = list(llama.generate(params, config, [1, 2], 6, lambda logits: int(np.argmax(logits))))
    tokens = [1, 2]
    for _ in range(6):
        logits, _, _ = llama.forward(params, config, np.array([tokens[-4:]]))
        tokens.append(int(np.argmax(logits[0, -1])))
    assert out == tokens[2:] and len(set(out)) > 1
    with pytest.raises(TinyLMError):
        list(llama.generate(params, config, [], 1, int))


def test_gpt2_configs_have_no_arch_field():
    assert "arch" not in gpt2.GPTConfig().to_dict()
    with pytest.raises(TinyLMError, match="unknown.*arch"):
        gpt2.GPTConfig.from_dict(dict(gpt2.GPTConfig().to_dict(), arch="llama"))
