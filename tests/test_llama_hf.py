"""An outside check of tinylm/core/llama.py: Hugging Face's LlamaForCausalLM, given tinylm's parameters by name,
computes the same logits. Skipped where transformers is not installed (CI does not install it).

In float64, Hugging Face's Llama still computes some things in float32: LlamaRMSNorm casts its input to float32,
LlamaRotaryEmbedding its angles, and the "eager" attention its softmax (the "sdpa" attention used here does
not). So the stock model agrees with tinylm to float32's precision only (~2e-7). For the tight check (1e-10),
`float64_throughout` replaces the norm's and the rotary angles' forwards by the same formulas without the casts;
everything else (the projections, the rotate_half layout, repeat_kv, the causal softmax, SwiGLU, the head,
tying) is Hugging Face's own code.
"""
import numpy as np
import pytest

from tinylm.core import llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")


def hf_model(config, params):
    """A LlamaForCausalLM of config's shape in float64 holding params, copied into its state dict by name."""
    hf_config = transformers.LlamaConfig(
        hidden_size=config.n_embd, intermediate_size=config.ffn_hidden, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings, vocab_size=config.vocab_size, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_config).to(torch.float64).eval()
    state = model.state_dict()
    expected = set(state) - ({"lm_head.weight"} if config.tie_embeddings else set())
    assert set(params) == expected                     # the same names, no more, no fewer
    for name, value in params.items():
        assert tuple(state[name].shape) == value.shape, name
    model.load_state_dict({name: torch.from_numpy(value) for name, value in params.items()},
                          strict=not config.tie_embeddings)
    if config.tie_embeddings:                          # the head is the embedding, one tensor
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def rmsnorm_float64(self, hidden_states):
    """LlamaRMSNorm.forward without its cast to float32."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def rotary_float64(self, x, position_ids):
    """LlamaRotaryEmbedding.forward (default rope type) with the angles computed in float64."""
    base, dim = self.config.rope_parameters["rope_theta"], self.inv_freq.shape[0] * 2
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = position_ids[..., None].to(torch.float64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


@pytest.fixture
def float64_throughout(monkeypatch):
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rmsnorm_float64)
    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", rotary_float64)


def perturbed(config, seed):
    """init_params in float64, every entry moved off its start (RMSNorm gains of exactly 1 would hide one)."""
    rng = np.random.default_rng(seed)
    return {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in llama.init_params(config, seed, np.float64).items()}


def logits_both(config, seed=0):
    params = perturbed(config, seed)
    idx = np.random.default_rng(seed + 1).integers(0, config.vocab_size, size=(2, config.block_size))
    ours, _, _ = llama.forward(params, config, idx)
    with torch.no_grad():
        theirs = hf_model(config, params)(torch.from_numpy(idx)).logits.numpy()
    return ours, theirs


CONFIGS = [dict(n_head=4, n_kv_head=2, tie_embeddings=False), dict(n_head=4, n_kv_head=2, tie_embeddings=True),
           dict(n_head=4, n_kv_head=1, tie_embeddings=False, ffn_hidden=24),
           dict(n_head=2, n_kv_head=2, tie_embeddings=True, norm_eps=1e-2)]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_logits_equal_hugging_face_llama_in_float64(kw, float64_throughout):
    config = llama.LlamaConfig(block_size=9, vocab_size=13, n_layer=2, n_embd=16, rope_theta=500.0, **kw)
    ours, theirs = logits_both(config)
    assert np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)) < 1e-10


def test_logits_equal_stock_hugging_face_llama_to_float32_precision():
    config = llama.LlamaConfig(block_size=9, vocab_size=13, n_layer=2, n_head=4, n_kv_head=2, n_embd=16)
    ours, theirs = logits_both(config)
    assert np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)) < 1e-5
