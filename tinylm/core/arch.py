"""GPT-2 or Llama: which model a config is, by its `arch` field ("llama"; a config without the field is GPT-2)."""
from tinylm.core import gpt2, llama
from tinylm.errors import TinyLMError

ARCHS = {"gpt2": (gpt2.GPTConfig, gpt2), "llama": (llama.LlamaConfig, llama)}


def arch_of(config):
    """"gpt2" or "llama" for a config object (GPTConfig has no arch field)."""
    return getattr(config, "arch", "gpt2")


def model_of(config):
    """The core module of the config's model: gpt2 or llama (param_shapes, init_params, forward, is_block_matrix, …)."""
    return ARCHS[arch_of(config)][1]


def config_from_dict(d):
    """GPTConfig or LlamaConfig from a dict (e.g. a checkpoint's metadata), chosen by its "arch" field, validated."""
    if not isinstance(d, dict):
        raise TinyLMError("model config must be a JSON object")
    arch = d.get("arch", "gpt2")
    if not isinstance(arch, str) or arch not in ARCHS:
        raise TinyLMError(f"model config has an unknown arch {str(arch)[:40]!r}; this tinylm knows "
                          f"{', '.join(ARCHS)}")
    if arch == "gpt2":
        d = {k: v for k, v in d.items() if k != "arch"}       # GPT-2's config has no arch field of its own
    return ARCHS[arch][0].from_dict(d)
