"""Typed fields of a stranger's config.json, checked before use: the GPT-2 reader (hf.py) and the Llama's
(hf_llama.py) share them. JSON's true is a Python bool, which is also an int: it is never a number here."""
from tinylm.errors import TinyLMError, brief


def check_int(cfg, key, path):
    """cfg[key] when it is a positive JSON integer (not true/false, not 2.0); else one line naming key and path."""
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TinyLMError(f"{path}: {key} must be a positive integer, got {brief(value)}")
    return value


def is_number(value):
    """True for a JSON number (int or float, NaN and infinities included: callers bound the range), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_flag(cfg, key, path):
    """cfg[key] when it is true or false (not 0/1, not "true"); else one line naming key and path."""
    value = cfg[key]
    if not isinstance(value, bool):
        raise TinyLMError(f"{path}: {key} must be true or false, got {brief(value)}")
    return value
