"""Text for the analysis: the validation part of the model's training text, as fixed windows."""
import os

import numpy as np

from tinylm.text.data import DEFAULT_DATA, read_text, train_val_split
from tinylm.errors import TinyLMError


def resolve_data_path(meta, override=None):
    """The text file to evaluate on: --data if given, else the run's own data file, else the bundled Tiny Shakespeare."""
    if override:
        return override
    saved = (meta.get("train_args") or {}).get("data")
    if isinstance(saved, str) and os.path.isfile(saved):
        return saved
    return DEFAULT_DATA


def validation_ids(tokenizer, path, encoding_errors="strict"):
    """The last 10% of the text's tokens (the split training held out), as token ids."""
    ids = tokenizer.encode(read_text(path, encoding_errors))
    _, val = train_val_split(ids)
    return val


def fixed_windows(ids, block_size, n_seq, seed=0):
    """n_seq windows of block_size + 1 tokens at seeded random starts: (x (n, T), y (n, T)), y = x shifted by one."""
    if len(ids) < block_size + 1:
        raise TinyLMError(f"evaluation text is too short: {len(ids)} tokens, need at least {block_size + 1}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - block_size, size=n_seq)
    w = np.asarray(ids)[starts[:, None] + np.arange(block_size + 1)].astype(np.intp)
    return w[:, :-1], w[:, 1:]
