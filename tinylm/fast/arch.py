"""The fast path of a config's model: GPT-2's (model.py, decode.py) or Llama's (llama.py, llama_decode.py).

Both pairs offer the same functions with the same signatures: forward, loss_and_grads, loss_and_grads_parallel
(the models); generate, generate_rows (the decoders).
"""
from tinylm.core.arch import arch_of
from tinylm.fast import decode, llama, llama_decode, model

FAST = {"gpt2": (model, decode), "llama": (llama, llama_decode)}


def fast_model(config):
    """fast/model.py for GPT-2, fast/llama.py for Llama."""
    return FAST[arch_of(config)][0]


def decoder(config):
    """fast/decode.py for GPT-2, fast/llama_decode.py for Llama."""
    return FAST[arch_of(config)][1]
