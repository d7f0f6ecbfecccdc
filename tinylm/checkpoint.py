"""Checkpoints: one .npz file, written atomically, read without pickle.

Inside the zip: every weight under its nanoGPT name, the AdamW moments under
`optim.m.<name>` and `optim.v.<name>` (when saved), and `meta.json`, UTF-8 bytes
holding the format version, model config, tokenizer, step, best validation loss,
random states and training arguments.

The reader does not trust the file: it parses each array's .npy header itself,
accepts only the names, dtypes and shapes that the config in the same file implies,
and reads exactly that many bytes. A hostile file is only data.
"""
import json
import os
import tempfile
import zipfile
import zlib

import numpy as np

from .errors import TinyLMError
from .model import GPTConfig, param_shapes
from .tokenizer import tokenizer_from_dict

FORMAT_NAME = "tinylm-checkpoint"
FORMAT_VERSION = 1
META_KEY = "meta.json"
MAX_META_BYTES = 64 * 1024 * 1024
FLOAT_DTYPES = {"float32": np.float32, "float64": np.float64}


class CheckpointError(TinyLMError):
    """A checkpoint that cannot be read or does not hold what a tinylm checkpoint holds."""


def save_checkpoint(path, params, config, tokenizer, opt_state=None, meta=None):
    """Write params (and optimizer moments, if given) with their metadata to path, atomically.

    The file is written under a temporary name in the same folder, flushed to disk and
    renamed over `path`, so a crash at any moment leaves either the old file or the new one.
    """
    meta = dict(meta or {})
    meta.update(format=FORMAT_NAME, version=FORMAT_VERSION, config=config.to_dict(),
                tokenizer=tokenizer.to_dict(), dtype=str(params["transformer.wte.weight"].dtype))
    arrays = dict(params)
    if opt_state is not None:
        meta["optim_t"] = int(opt_state["t"])
        for name in params:
            arrays["optim.m." + name] = opt_state["m"][name]
            arrays["optim.v." + name] = opt_state["v"][name]
    arrays[META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:     # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def _read_npy(zf, info, expected_dtype, expected_shape, path):
    """One array from the zip member, checked against the dtype and shape it must have."""
    name = info.filename[:-4]
    with zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"damaged checkpoint {path}: array {name!r} has a bad header ({e})") from None
        if dtype.hasobject or dtype != np.dtype(expected_dtype):
            raise CheckpointError(f"checkpoint {path}: array {name!r} has dtype {dtype}, expected {np.dtype(expected_dtype)}")
        if tuple(shape) != tuple(expected_shape):
            raise CheckpointError(f"checkpoint {path}: array {name!r} has shape {tuple(shape)}, "
                                  f"expected {tuple(expected_shape)} from the config")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        try:
            data = f.read(nbytes)
            trailing = f.read(1)       # also makes zipfile verify the member's CRC
        except (OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
            raise CheckpointError(f"damaged checkpoint {path}: array {name!r} cannot be read ({e})") from None
        if len(data) != nbytes or trailing:
            raise CheckpointError(f"damaged checkpoint {path}: array {name!r} does not match its header")
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return np.array(array, order="C")      # writable, owns its memory


def _read_meta(zf, members, path):
    info = members.get(META_KEY)
    if info is None:
        raise CheckpointError(f"not a tinylm checkpoint (no {META_KEY}): {path}")
    if info.file_size > MAX_META_BYTES:
        raise CheckpointError(f"checkpoint {path}: metadata is implausibly large ({info.file_size} bytes)")
    with zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(f))
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"damaged checkpoint {path}: bad metadata header ({e})") from None
        if dtype != np.uint8 or len(shape) != 1 or shape[0] > MAX_META_BYTES:
            raise CheckpointError(f"checkpoint {path}: metadata has the wrong form")
        raw = f.read(shape[0])
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"damaged checkpoint {path}: metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"not a tinylm checkpoint: {path}")
    version = meta.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(f"checkpoint {path} has format version {version!r}; this tinylm reads "
                              f"version {FORMAT_VERSION} (upgrade tinylm to read newer files)")
    return meta


def load_checkpoint(path, with_optimizer=True):
    """Read a checkpoint: {'params', 'config', 'tokenizer', 'opt_state' (or None), 'meta'}.

    Raises CheckpointError with one clear line for a missing, truncated, damaged or foreign file.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path} (train one first with: python train.py)")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path is a directory, not a file: {path}")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"not a readable checkpoint (damaged, truncated or not a .npz file): {path}") from None
    with zf:
        members = {}
        for info in zf.infolist():
            if not info.filename.endswith(".npy") or info.filename[:-4] in members:
                raise CheckpointError(f"checkpoint {path} has an unexpected entry {info.filename!r}")
            members[info.filename[:-4]] = info
        meta = _read_meta(zf, members, path)
        config = GPTConfig.from_dict(meta.get("config"))
        tokenizer = tokenizer_from_dict(meta.get("tokenizer"))
        if tokenizer.vocab_size != config.vocab_size:
            raise CheckpointError(f"checkpoint {path}: tokenizer has {tokenizer.vocab_size} tokens "
                                  f"but the model expects {config.vocab_size}")
        dtype = FLOAT_DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"checkpoint {path}: unsupported dtype {meta.get('dtype')!r}")
        shapes = param_shapes(config)
        has_optimizer = "optim_t" in meta
        expected = set(shapes) | {META_KEY}
        if has_optimizer:
            expected |= {f"optim.{m}.{k}" for k in shapes for m in "mv"}
        missing, extra = expected - set(members), set(members) - expected
        if missing:
            raise CheckpointError(f"checkpoint {path} is missing array(s): {', '.join(sorted(missing)[:3])}")
        if extra:
            raise CheckpointError(f"checkpoint {path} has unexpected array(s): {', '.join(sorted(extra)[:3])}")
        try:
            params = {k: _read_npy(zf, members[k], dtype, s, path) for k, s in shapes.items()}
            opt_state = None
            if has_optimizer and with_optimizer:
                opt_state = {"t": int(meta["optim_t"]),
                             "m": {k: _read_npy(zf, members["optim.m." + k], dtype, s, path) for k, s in shapes.items()},
                             "v": {k: _read_npy(zf, members["optim.v." + k], dtype, s, path) for k, s in shapes.items()}}
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise CheckpointError(f"damaged checkpoint {path}: {e}") from None
    return {"params": params, "config": config, "tokenizer": tokenizer, "opt_state": opt_state, "meta": meta}

