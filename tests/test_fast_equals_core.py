"""The fast model.forward equals core's forward (tinylm/core/gpt2.py) in float64, over several shapes."""
import numpy as np
import pytest

from tinylm.fast import model
from tinylm.core import gpt2 as G
from tinylm.core.gpt2 import GPTConfig


def perturbed_params(config, seed):
    """init_params in float64, with every weight and bias moved off its initial value
    (init sets layer-norm weights to 1 and biases to 0, which would hide a dropped w or b)."""
    rng = np.random.default_rng(seed)
    params = G.init_params(config, seed=seed, dtype=np.float64)
    return {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}


@pytest.mark.parametrize("n_layer,n_head,n_embd,bias", [
    (1, 1, 8, False), (2, 2, 16, True), (3, 4, 16, False), (2, 8, 32, True)])
def test_fast_forward_equals_core(n_layer, n_head, n_embd, bias):
    config = GPTConfig(block_size=12, vocab_size=11, n_layer=n_layer, n_head=n_head, n_embd=n_embd, bias=bias)
    params = perturbed_params(config, seed=n_layer + 10 * n_head)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, config.vocab_size, size=(3, config.block_size))
    targets = rng.integers(0, config.vocab_size, size=idx.shape)
    fast_logits, fast_loss, _ = model.forward(params, config, idx, targets, for_backward=False)
    ref_logits, ref_loss, _ = G.forward(params, config, idx, targets)
    assert fast_logits.dtype == np.float64
    np.testing.assert_allclose(fast_logits, ref_logits, rtol=0, atol=1e-10)
    assert abs(fast_loss - ref_loss) < 1e-10
    # a shorter sequence than block_size (positions are sliced, the mask is T×T)
    short_logits, _, _ = model.forward(params, config, idx[:, :5], for_backward=False)
    np.testing.assert_allclose(short_logits, G.forward(params, config, idx[:, :5])[0], rtol=0, atol=1e-10)
