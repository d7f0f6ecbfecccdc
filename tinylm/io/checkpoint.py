"""Checkpoints: one .npz file, written atomically, read without pickle.

Inside the zip: every weight under its nanoGPT name, the AdamW moments under
`optim.m.<name>` and `optim.v.<name>` (when saved; with Muon, its block matrices' momentum under
`optim.momentum.<name>` instead, and `"optimizer": "muon"` in the metadata), and `meta.json`, UTF-8 bytes
holding the format version, model config, tokenizer, step, best validation loss,
random states and training arguments. A compressed model (tinylm.compress) stores each factorized
linear layer as `<layer>.weight_A` (out, r) and `<layer>.weight_B` (r, in) in place of
`<layer>.weight` (see lowrank.py), and its metadata lists the ranks: `"lowrank": {"<layer>": r}`.
A run with adapters (LoRA/PiSSA) keeps its frozen weights
under the same names, its adapters as `<matrix>.lora_A` / `.lora_B`, their moments alone under
`optim.*`, and their rank, α, targets and init as `meta.json`'s "lora" entry: base + adapters in one file.

Writing goes through `atomic.atomic_write`: a crash at any moment leaves the old file or the
new one, never a mix (on Linux not even a temporary file). A failed write (a full disk) raises
CheckpointError; the previous checkpoint is untouched.

Reading: the reader does not trust the file. It accepts only stored (uncompressed) .npy
members, parses each array's .npy header itself, accepts only the names, dtypes and shapes
that the config in the same file implies, checks before reading that those arrays fit in the
file, and reads exactly that many bytes (the zip CRC is then checked). A hostile file is only
data: every failure is a CheckpointError, and no allocation exceeds the file's own size.
"""
import json
import math
import os
import struct
import zipfile
import zlib

import numpy as np

from tinylm.atomic import atomic_write
from tinylm.errors import TinyLMError, brief
from tinylm.files import open_regular
from tinylm.lowrank.factorized import factorized_shapes, ranks_of
from tinylm.core.arch import config_from_dict, model_of
from tinylm.text.char import tokenizer_from_dict
from tinylm.lowrank.adapters import AdapterError, adapter_shapes, check_lora_meta, merged_params

FORMAT_NAME = "tinylm-checkpoint"
FORMAT_VERSION = 1
META_KEY = "meta.json"
MAX_META_BYTES = 64 * 1024 * 1024
FLOAT_DTYPES = {"float32": np.float32, "float64": np.float64}


class CheckpointError(TinyLMError):
    """A checkpoint that cannot be read or does not hold what a tinylm checkpoint holds."""


def _write_npz(f, arrays):
    """The one place the bytes are written (tests replace it to simulate a full disk)."""
    np.savez(f, **arrays)


def save_checkpoint(path, params, config, tokenizer, opt_state=None, meta=None, adapters=None):
    """Write params (and optimizer moments, if given) with their metadata to path, atomically.

    With adapters (LoRA/PiSSA, see adapters.py; meta['lora'] names their rank, α, targets and init),
    params are the frozen weights, the adapters are stored beside them under their own names, and
    the optimizer moments are those of the adapters alone: base + adapters in one file.

    The data is written to an unnamed (or temporary) file in the same folder, flushed to disk
    and renamed over `path`, so a crash at any moment leaves either the old file or the new one.
    An OSError while writing (e.g. a full disk) becomes a CheckpointError; the old file stays.
    """
    meta = dict(meta or {})
    meta.update(format=FORMAT_NAME, version=FORMAT_VERSION, config=config.to_dict(),
                tokenizer=tokenizer.to_dict(), dtype=str(next(iter(params.values())).dtype))
    meta.pop("lowrank", None)
    if ranks_of(params):               # factorized layers (lowrank.py): their ranks imply the factors' shapes
        meta["lowrank"] = ranks_of(params)
    arrays = {**params, **(adapters or {})}
    if opt_state is not None:
        meta["optim_t"] = int(opt_state["t"])
        meta["optimizer"] = "muon" if "momentum" in opt_state else "adamw"
        for name in opt_state["m"]:          # the trained arrays: every parameter, or the adapters
            arrays["optim.m." + name] = opt_state["m"][name]
            arrays["optim.v." + name] = opt_state["v"][name]
        for name in opt_state.get("momentum", {}):      # Muon's block matrices
            arrays["optim.momentum." + name] = opt_state["momentum"][name]
    arrays[META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)

    try:
        atomic_write(path, lambda f: _write_npz(f, arrays))
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}; "
                              f"any previous checkpoint there is unchanged") from e
    return path


def _read_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version in ((2, 0), (3, 0)):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy version {version}")


def _read_exactly(f, nbytes, what, path):
    """nbytes from the member, then make sure nothing follows (which also makes zipfile check the CRC)."""
    data = f.read(nbytes)
    trailing = f.read(1)
    if len(data) != nbytes or trailing:
        raise CheckpointError(f"damaged checkpoint {path}: {what} does not match its header")
    return data


def _read_npy(zf, info, expected_dtype, expected_shape, path):
    """One array from the zip member, checked against the dtype and shape it must have."""
    name = info.filename[:-4]
    with zf.open(info) as f:
        try:
            shape, fortran, dtype = _read_header(f)
        except (ValueError, SyntaxError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"damaged checkpoint {path}: array {name!r} has a bad header ({e})") from None
        if dtype.hasobject or dtype != np.dtype(expected_dtype):
            raise CheckpointError(f"checkpoint {path}: array {name!r} has dtype {dtype}, expected {np.dtype(expected_dtype)}")
        if tuple(shape) != tuple(expected_shape):
            raise CheckpointError(f"checkpoint {path}: array {name!r} has shape {tuple(shape)}, "
                                  f"expected {tuple(expected_shape)} from the config")
        data = _read_exactly(f, math.prod(shape) * dtype.itemsize, f"array {name!r}", path)
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return np.array(array, order="C")      # writable, owns its memory


def _read_meta(zf, members, path, file_size):
    info = members.get(META_KEY)
    if info is None:
        raise CheckpointError(f"not a tinylm checkpoint (no {META_KEY}): {path}")
    if info.file_size > min(MAX_META_BYTES, file_size):
        raise CheckpointError(f"checkpoint {path}: metadata is implausibly large ({info.file_size} bytes)")
    with zf.open(info) as f:
        try:
            shape, _, dtype = _read_header(f)
        except (ValueError, SyntaxError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"damaged checkpoint {path}: bad metadata header ({e})") from None
        if dtype != np.uint8 or len(shape) != 1 or shape[0] > info.file_size:
            raise CheckpointError(f"checkpoint {path}: metadata has the wrong form")
        raw = _read_exactly(f, shape[0], "the metadata", path)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"damaged checkpoint {path}: metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"not a tinylm checkpoint: {path}")
    version = meta.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"checkpoint {path} has an invalid format version {brief(version, 20)}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {brief(version, 20)}; this tinylm reads "
                              f"version {FORMAT_VERSION} (upgrade tinylm to read newer files)")
    check_meta_fields(meta, path)
    return meta


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


# Saved training settings that analysis, compression and export read: (type, least value). The rest are
# read by training alone, which checks every one of them when it resumes (train.loop.check_saved_args).
READ_SETTINGS = {"seed": (int, 0), "batch_size": (int, 1), "warmup_iters": (int, 0), "lr_decay_iters": (int, 0),
                 "learning_rate": (float, None), "min_lr": (float, None), "beta1": (float, None),
                 "beta2": (float, None), "data": (str, None), "encoding_errors": (str, None)}


def check_meta_fields(meta, path):
    """The fields training and sampling rely on, when present, have the types they need."""
    def bad(field, why):
        raise CheckpointError(f"checkpoint {path}: metadata field {field!r} {why}")
    for field in ("step", "optim_t"):
        if field in meta and not (_is_int(meta[field]) and 0 <= meta[field] < 2 ** 62):
            bad(field, "is not a non-negative integer")
    if meta.get("best_val_loss") is not None and (isinstance(meta["best_val_loss"], bool)
                                                  or not isinstance(meta["best_val_loss"], (int, float))):
        bad("best_val_loss", "is not a number")
    if "elapsed_s" in meta and (isinstance(meta["elapsed_s"], bool) or not isinstance(meta["elapsed_s"], (int, float))):
        bad("elapsed_s", "is not a number")
    if "train_args" in meta and not isinstance(meta["train_args"], dict):
        bad("train_args", "is not an object")
    for key, (kind, low) in READ_SETTINGS.items():        # training checks every setting again when it resumes
        value = (meta.get("train_args") or {}).get(key)
        if value is None:
            continue
        ok = (isinstance(value, str) if kind is str else _is_int(value) if kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
        if not ok or (low is not None and value < low):
            raise CheckpointError(f"checkpoint {path}: saved setting {key!r} is {brief(value)}, not "
                                  + ({int: "an integer", float: "a finite number", str: "a string"}[kind] if not ok
                                     else f"at least {low}"))
    if "rng" in meta:
        rng = meta["rng"]
        if not isinstance(rng, dict) or set(rng) != {"batch", "dropout"}:
            bad("rng", "does not hold the batch and dropout random states")
        for key, state in rng.items():
            try:
                np.random.default_rng().bit_generator.state = state
            except (TypeError, ValueError, KeyError, OverflowError, AttributeError):
                bad("rng", f"holds an invalid {key} random state")


def check_finite(arrays, where):
    """CheckpointError naming the first array (in order) that holds NaN or inf: such a model computes nothing.

    Training never saves one (it stops at the first non-finite loss); a stranger's file may hold one.
    Checked about a million numbers at a time, in slices of rows (views, also of a transposed or
    memory-mapped array), so the check copies nothing.
    """
    for name, array in arrays.items():
        a = np.asarray(array)
        a = a.reshape(1) if a.ndim == 0 else a
        rows = max(1, (1 << 20) // max(1, a[0].size)) if len(a) else 1
        for start in range(0, len(a), rows):
            if np.isfinite(a[start:start + rows]).all():
                continue
            bad = ~np.isfinite(a)
            what = "NaN" if np.isnan(a[bad]).any() else "inf"
            raise CheckpointError(f"{where}: weight {name!r} holds {what} ({int(bad.sum()):,} of {a.size:,} values "
                                  "are not finite); a model with non-finite weights computes nothing")


def _members(zf, path, file_size):
    """{array name: ZipInfo} for a zip of stored, unencrypted .npy members that lie inside the file."""
    members = {}
    for info in zf.infolist():
        name = info.filename
        if not name.endswith(".npy") or name[:-4] in members:
            raise CheckpointError(f"checkpoint {path} has an unexpected entry {brief(name)}")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise CheckpointError(f"checkpoint {path}: entry {brief(name)} is compressed or encrypted; "
                                  f"tinylm writes and reads only stored arrays")
        if info.compress_size != info.file_size or info.header_offset + info.file_size > file_size:
            raise CheckpointError(f"damaged checkpoint {path}: entry {brief(name)} claims {info.file_size} bytes "
                                  f"that the file does not hold")
        members[name[:-4]] = info
    return members


def load_checkpoint(path, with_optimizer=True, merge_adapters=True):
    """Read a checkpoint: {'params', 'config', 'tokenizer', 'opt_state' (or None), 'meta', 'adapters'}.

    A checkpoint with adapters is returned merged (params = frozen + s·B A, adapters and opt_state
    None), so sampling and analysis see a plain model; merge_adapters=False returns the frozen
    params, the adapters and their optimizer state as stored (to resume training).

    Raises CheckpointError with one clear line for a missing, truncated, damaged or foreign file.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path} (train one first with: python train.py)")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path is a directory, not a file: {path}")
    try:
        ckpt = _load(path, with_optimizer)
        check_finite({**ckpt["params"], **(ckpt["adapters"] or {})}, f"checkpoint {path}")
        if merge_adapters and ckpt["adapters"] is not None:
            meta = dict(ckpt["meta"])
            meta.pop("lora_base_sha256", None)
            meta["merged_adapters"] = meta.pop("lora")      # a plain model now: re-saved, it is a plain file
            ckpt.update(params=merged_params(ckpt["params"], ckpt["adapters"], meta["merged_adapters"]),
                        adapters=None, opt_state=None, meta=meta)
        return ckpt
    except CheckpointError:
        raise
    except TinyLMError as e:            # a config or tokenizer that cannot work
        raise CheckpointError(f"checkpoint {path}: {e}") from e
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, zlib.error, struct.error, ValueError,
            NotImplementedError, RuntimeError, OverflowError, UnicodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"not a readable checkpoint (damaged, truncated or not a .npz file): {path} "
                              f"({type(e).__name__}: {e})") from e


def load_meta(path):
    """The metadata of a checkpoint alone (config, tokenizer, step, training settings), checked as load_checkpoint
    checks it, without reading any array. CheckpointError for a file that is not a readable tinylm checkpoint."""
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path is a directory, not a file: {path}")
    try:
        with open_regular(path, "checkpoint", CheckpointError) as raw:
            file_size = os.fstat(raw.fileno()).st_size
            with zipfile.ZipFile(raw) as zf:
                return _read_meta(zf, _members(zf, path, file_size), path, file_size)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, zlib.error, struct.error, ValueError,
            NotImplementedError, RuntimeError, OverflowError, UnicodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"not a readable checkpoint (damaged, truncated or not a .npz file): {path} "
                              f"({type(e).__name__}: {e})") from e


def _load(path, with_optimizer):
    with open_regular(path, "checkpoint", CheckpointError) as raw:       # not a FIFO or /dev/zero: they would hang or never end
        file_size = os.fstat(raw.fileno()).st_size
        try:
            zf = zipfile.ZipFile(raw)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as e:
            raise CheckpointError(f"not a readable checkpoint (damaged, truncated or not a .npz file): {path}") from e
        with zf:
            return _load_from_zip(zf, path, file_size, with_optimizer)


def _load_from_zip(zf, path, file_size, with_optimizer):
    members = _members(zf, path, file_size)
    meta = _read_meta(zf, members, path, file_size)
    config = config_from_dict(meta.get("config"))        # GPT-2's or Llama's, by its "arch" field
    model = model_of(config)
    # Compare the claim with the file before building anything that grows with it (param_shapes loops n_layer).
    if model.count_tensors(config) > len(members) - 1:
        raise CheckpointError(f"checkpoint {path}: its config (n_layer={config.n_layer:,}) implies "
                              f"{model.count_tensors(config):,} arrays, but the file holds {len(members) - 1:,}")
    try:
        tokenizer = tokenizer_from_dict(meta.get("tokenizer"))
    except ImportError as e:
        raise CheckpointError(f"checkpoint {path} needs a tokenizer this tinylm does not have ({e})") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"checkpoint {path}: tokenizer has {tokenizer.vocab_size} tokens "
                              f"but the model expects {config.vocab_size}")
    dtype = FLOAT_DTYPES.get(meta.get("dtype"))
    if dtype is None:
        raise CheckpointError(f"checkpoint {path}: unsupported dtype {brief(meta.get('dtype'))}")
    ranks = meta.get("lowrank", {})
    if not isinstance(ranks, dict):
        raise CheckpointError(f"checkpoint {path}: metadata field 'lowrank' is not an object")
    shapes = factorized_shapes(model.param_shapes(config), ranks)
    lora_shapes = {}
    if "lora" in meta:
        try:
            meta["lora"] = check_lora_meta(meta["lora"], shapes, f"checkpoint {path}")
        except AdapterError as e:
            raise CheckpointError(str(e)) from None
        lora_shapes = adapter_shapes(meta["lora"]["targets"], meta["lora"]["rank"], shapes)
    trained = lora_shapes or shapes          # the arrays with optimizer moments
    has_optimizer = "optim_t" in meta
    optimizer = meta.get("optimizer", "adamw")
    if optimizer not in ("adamw", "muon"):   # the two layouts of optimizer state this format holds
        raise CheckpointError(f"checkpoint {path}: unknown optimizer {brief(optimizer)} in its metadata")
    # the optimizer's arrays for each trained one: Muon keeps one momentum per block matrix, AdamW two moments
    state_names = {k: ("momentum",) if optimizer == "muon" and model.is_block_matrix(k, s) else ("m", "v")
                   for k, s in trained.items()}
    expected = set(shapes) | set(lora_shapes) | {META_KEY}
    if has_optimizer:
        expected |= {f"optim.{m}.{k}" for k in trained for m in state_names[k]}
    missing, extra = expected - set(members), set(members) - expected
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing array(s): {', '.join(sorted(missing)[:3])}")
    if extra:
        raise CheckpointError(f"checkpoint {path} has unexpected array(s): {', '.join(brief(n) for n in sorted(extra)[:3])}")
    # Bound every allocation before making it: the arrays the config implies must fit in the file.
    itemsize = np.dtype(dtype).itemsize
    implied = (sum(math.prod(s) for s in shapes.values()) + sum(math.prod(s) for s in lora_shapes.values())
               + (sum(len(state_names[k]) * math.prod(s) for k, s in trained.items()) if has_optimizer else 0)
               ) * itemsize
    if implied > file_size:
        raise CheckpointError(f"checkpoint {path}: its config implies {implied:,} bytes of arrays, "
                              f"but the file has only {file_size:,} bytes")
    for k, s in {**shapes, **lora_shapes}.items():
        for name in [k] + ([f"optim.{m}.{k}" for m in state_names[k]] if has_optimizer and k in trained else []):
            if members[name].file_size < math.prod(s) * itemsize:
                raise CheckpointError(f"damaged checkpoint {path}: entry {name!r} is too small for shape {s}")
    params = {k: _read_npy(zf, members[k], dtype, s, path) for k, s in shapes.items()}
    adapters = {k: _read_npy(zf, members[k], dtype, s, path) for k, s in lora_shapes.items()} or None
    opt_state = None
    if has_optimizer and with_optimizer:
        read = lambda m: {k: _read_npy(zf, members[f"optim.{m}.{k}"], dtype, s, path)
                          for k, s in trained.items() if m in state_names[k]}
        opt_state = {"t": int(meta["optim_t"]), "m": read("m"), "v": read("v")}
        if optimizer == "muon":
            opt_state["momentum"] = read("momentum")
    return {"params": params, "config": config, "tokenizer": tokenizer, "opt_state": opt_state, "meta": meta,
            "adapters": adapters}
