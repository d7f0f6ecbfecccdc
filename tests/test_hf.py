"""GPT-2 folders in the Hugging Face layout: round trips, the original hub layout, bad folders, the export CLI,
and (when transformers is installed) a cross-check of logits and tokenizers against transformers itself."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SHAKESPEARE, TRICKY
from tinylm.text.bpe import train_bpe
from tinylm.io.checkpoint import save_checkpoint
from tinylm.errors import TinyLMError
from tinylm.io.hf import export_hf, import_hf, is_transposed, load_any
from tinylm.fast.model import forward
from tinylm.core.gpt2 import GPTConfig, init_params
from tinylm.io.safetensors import load_file, save_file
from tinylm.text.char import CharTokenizer



@pytest.fixture(scope="module")
def text():
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return f.read()[:20_000]


@pytest.fixture(scope="module")
def bpe(text):
    return train_bpe(text, 300)


def make_model(tokenizer, bias, seed=0, n_layer=2, n_head=2, n_embd=16, block_size=32):
    """A small model with every parameter random, biases and layer-norm gains included."""
    config = GPTConfig(block_size=block_size, vocab_size=tokenizer.vocab_size, n_layer=n_layer, n_head=n_head,
                       n_embd=n_embd, dropout=0.1, bias=bias)
    params = init_params(config, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for k in params:
        if ".ln_" in k or k.endswith(".bias"):
            params[k] = params[k] + rng.standard_normal(params[k].shape).astype(np.float32) * 0.1
    return {"params": params, "config": config, "tokenizer": tokenizer, "opt_state": None,
            "meta": {"step": 7, "best_val_loss": 1.5, "train_args": {"seed": 3}}}


def logits(ckpt, idx):
    return forward(ckpt["params"], ckpt["config"], idx)[0]


def assert_same_logits(a, b):
    """The weights come back bit-equal, but as transposed views of the (in, out) file layout; BLAS may sum a
    transposed operand in another order (it does on this Intel Xeon, not on the AMD EPYC), so the logits agree
    to float32 rounding, not bit for bit. A wrong transpose or a missing bias would be off by about 0.1."""
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def ids(config, seed=0, batch=2):
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, config.block_size))


def one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_round_trip_gives_identical_params_logits_and_tokenizer(tmp_path, bpe, text, bias, kind):
    tok = CharTokenizer.from_text(text) if kind == "char" else bpe
    model = make_model(tok, bias)
    path = tmp_path / "ckpt.npz"
    save_checkpoint(str(path), model["params"], model["config"], tok, meta=model["meta"])
    result = export_hf(str(path), str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "config.json").is_file()
    assert any("zero biases" in n for n in result["notes"]) == (not bias)
    for mmap in (True, False):
        back = import_hf(str(tmp_path / "hf"), mmap=mmap)
        assert set(back) == {"params", "config", "tokenizer", "opt_state", "meta"}
        assert back["config"] == model["config"]
        assert back["opt_state"] is None
        assert list(back["params"]) == list(model["params"])
        for k, v in model["params"].items():
            assert back["params"][k].dtype == np.float32
            assert np.array_equal(back["params"][k], v), k
        assert type(back["tokenizer"]) is type(tok) and back["tokenizer"].to_dict() == tok.to_dict()
        x = ids(model["config"])
        assert_same_logits(logits(back, x), logits(model, x))
        assert back["meta"]["step"] == 7 and back["meta"]["train_args"] == {"seed": 3}
    # GPT-2 has biases everywhere: a bias-free model is stored with zero ones
    tensors, metadata = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert metadata["format"] == "pt"
    assert ("transformer.h.0.attn.c_attn.bias" in tensors)
    assert np.any(tensors["transformer.h.0.attn.c_attn.bias"]) == bias
    assert tensors["transformer.h.0.mlp.c_fc.weight"].shape == (16, 64)       # Conv1D: (in, out)


def test_exported_layout_and_config(tmp_path, bpe):
    model = make_model(bpe, bias=True)
    export_hf(model, str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert (cfg["n_positions"], cfg["n_ctx"], cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["vocab_size"]) == \
        (32, 32, 16, 2, 2, 300)
    assert cfg["activation_function"] == "gelu_new" and cfg["layer_norm_epsilon"] == 1e-5
    assert cfg["n_inner"] is None and cfg["tie_word_embeddings"] is True
    assert cfg["resid_pdrop"] == cfg["attn_pdrop"] == cfg["embd_pdrop"] == 0.1
    assert cfg["eos_token_id"] == bpe.end_of_text_id
    tensors, _ = load_file(str(tmp_path / "model.safetensors"))
    for name, value in model["params"].items():
        expected = value.T if is_transposed(name) else value
        assert np.array_equal(tensors[name], expected), name
    assert set(tensors) == set(model["params"])          # no lm_head, no mask buffers
    assert sorted(os.listdir(tmp_path)) == ["config.json", "merges.txt", "model.safetensors",
                                            "tokenizer_config.json", "vocab.json"]


def test_import_views_the_memory_map_without_copies(tmp_path, bpe):
    model = make_model(bpe, bias=True)
    export_hf(model, str(tmp_path))
    back = import_hf(str(tmp_path))
    w = back["params"]["transformer.h.0.mlp.c_fc.weight"]
    assert w.shape == (64, 16) and not w.flags.owndata and not w.flags.writeable
    assert w.flags.f_contiguous                   # the transpose of the stored (in, out) block
    copy = import_hf(str(tmp_path), mmap=False)["params"]["transformer.h.0.mlp.c_fc.weight"]
    assert np.array_equal(copy, w) and copy.flags.writeable       # mmap=False: writable, e.g. to train on


def test_char_tokenizer_with_non_ascii_is_kept_in_tinylm_tokenizer_json(tmp_path):
    tok = CharTokenizer.from_text("héllo wörld\n")
    model = make_model(tok, bias=False)
    result = export_hf(model, str(tmp_path))
    assert any("non-ASCII" in n for n in result["notes"])
    assert not (tmp_path / "vocab.json").exists()
    back = import_hf(str(tmp_path))
    assert back["tokenizer"].to_dict() == tok.to_dict()
    assert_same_logits(logits(back, ids(model["config"])), logits(model, ids(model["config"])))


def test_float16_export_imports_as_float32(tmp_path, bpe):
    model = make_model(bpe, bias=True)
    export_hf(model, str(tmp_path), dtype=np.float16)
    tensors, _ = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["transformer.wte.weight"].dtype == np.float16
    back = import_hf(str(tmp_path))
    assert all(v.dtype == np.float32 for v in back["params"].values())
    assert back["meta"]["stored_dtype"] == "float16"
    x = ids(model["config"])
    np.testing.assert_allclose(logits(back, x), logits(model, x), atol=2e-2)
    back64 = import_hf(str(tmp_path), dtype=np.float64)
    assert back64["params"]["transformer.wte.weight"].dtype == np.float64


def hub_layout(tmp_path, model, lm_head=None):
    """The folder layout of OpenAI's GPT-2 on the hub: no transformer. prefix, mask buffers, maybe lm_head."""
    export_hf(model, str(tmp_path))
    tensors, _ = load_file(str(tmp_path / "model.safetensors"), mmap=False)
    T = model["config"].block_size
    plain = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for i in range(model["config"].n_layer):
        plain[f"h.{i}.attn.bias"] = np.tril(np.ones((T, T), np.float32))[None, None]
        plain[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    if lm_head is not None:
        plain["lm_head.weight"] = lm_head
    save_file(plain, str(tmp_path / "model.safetensors"), {"format": "pt"})
    return str(tmp_path)


def test_imports_the_original_hub_layout(tmp_path, bpe):
    model = make_model(bpe, bias=True)
    folder = hub_layout(tmp_path, model, lm_head=model["params"]["transformer.wte.weight"])
    back = import_hf(folder)
    assert back["meta"]["format"] == "hf-gpt2" and back["meta"]["train_args"] == {}
    assert back["config"] == dataclasses.replace(model["config"], bias=True)
    x = ids(model["config"])
    assert_same_logits(logits(back, x), logits(model, x))
    assert load_any(folder)["config"] == back["config"]
    assert load_any(os.path.join(folder, "config.json"))["config"] == back["config"]


def test_untied_head_is_refused(tmp_path, bpe):
    model = make_model(bpe, bias=True)
    folder = hub_layout(tmp_path, model, lm_head=model["params"]["transformer.wte.weight"] + 1)
    with pytest.raises(TinyLMError) as e:
        import_hf(folder)
    one_line(e, "lm_head.weight", "tied")


def test_load_any_reads_checkpoints_and_explains_folders(tmp_path, bpe):
    model = make_model(bpe, bias=False)
    path = tmp_path / "ckpt.npz"
    save_checkpoint(str(path), model["params"], model["config"], bpe, meta=model["meta"])
    assert load_any(str(path))["config"] == model["config"]
    with pytest.raises(TinyLMError) as e:
        load_any(str(tmp_path))
    one_line(e, "config.json", "ckpt.npz")
    with pytest.raises(TinyLMError):
        load_any(str(tmp_path / "nothing.npz"))


# ----------------------------------------------------------------------------- bad folders


@pytest.fixture
def good_folder(tmp_path, bpe):
    folder = tmp_path / "hf"
    export_hf(make_model(bpe, bias=True), str(folder))
    return folder


def edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, words", [
    ({"model_type": "llama"}, ["model_type", "llama"]),
    ({"architectures": ["LlamaForCausalLM"]}, ["architecture", "LlamaForCausalLM"]),
    ({"activation_function": "relu"}, ["activation_function", "relu"]),
    ({"layer_norm_epsilon": 1e-6}, ["layer_norm_epsilon"]),
    ({"n_inner": 48}, ["n_inner", "64"]),
    ({"tie_word_embeddings": False}, ["tie_word_embeddings", "untied"]),
    ({"n_layer": 3}, ["missing tensor", "transformer.h.2."]),
    ({"n_layer": 1}, ["unexpected tensor", "transformer.h.1."]),
    ({"n_embd": 32}, ["shape", "transformer.wte.weight"]),
    ({"n_positions": 64}, ["transformer.wpe.weight", "(32, 16)", "(64, 16)"]),
    ({"n_head": 3}, ["divisible"]),
    ({"vocab_size": "many"}, ["vocab_size", "positive integer"]),
])
def test_bad_config_gives_one_clear_line(good_folder, change, words):
    edit_config(good_folder, **change)
    with pytest.raises(TinyLMError) as e:
        import_hf(str(good_folder))
    one_line(e, *words)


def test_bad_files_give_one_clear_line(good_folder, tmp_path):
    with pytest.raises(TinyLMError) as e:
        import_hf(str(tmp_path / "nowhere"))
    one_line(e, "not found")

    (good_folder / "config.json").write_text("{not json")
    with pytest.raises(TinyLMError) as e:
        import_hf(str(good_folder))
    one_line(e, "config.json", "not valid JSON")

    os.remove(good_folder / "config.json")
    with pytest.raises(TinyLMError) as e:
        import_hf(str(good_folder))
    one_line(e, "no config.json")


def test_missing_or_damaged_weights_and_tokenizer(good_folder):
    weights = good_folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 10])
    with pytest.raises(TinyLMError) as e:
        import_hf(str(good_folder))
    one_line(e, "model.safetensors")

    weights.write_bytes(b"\x00" * 4)
    with pytest.raises(TinyLMError) as e:
        import_hf(str(good_folder))
    one_line(e, "too short")

    os.remove(weights)
    with pytest.raises(TinyLMError) as e:
        import_hf(str(good_folder))
    one_line(e, "no model.safetensors")
    (good_folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(TinyLMError) as e:
        import_hf(str(good_folder))
    one_line(e, "pytorch_model.bin", "safetensors")


def test_missing_or_mismatched_tokenizer(good_folder, text):
    os.remove(good_folder / "merges.txt")
    with pytest.raises(TinyLMError) as e:
        import_hf(str(good_folder))
    one_line(e, "no tokenizer", "vocab.json")
    CharTokenizer.from_text(text)       # 300 BPE tokens vs the character set's size
    (good_folder / "tinylm_tokenizer.json").write_text(json.dumps(CharTokenizer.from_text(text).to_dict()))
    with pytest.raises(TinyLMError) as e:
        import_hf(str(good_folder))
    one_line(e, "tokenizer has", "vocab_size 300")


def test_float_tensors_only(good_folder):
    weights = str(good_folder / "model.safetensors")
    tensors, metadata = load_file(weights, mmap=False)
    tensors["transformer.ln_f.weight"] = tensors["transformer.ln_f.weight"].astype(np.int32)
    save_file(tensors, weights, metadata)
    with pytest.raises(TinyLMError) as e:
        import_hf(str(good_folder))
    one_line(e, "transformer.ln_f.weight", "int32")


# ----------------------------------------------------------------------------- the export command


def run_export(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "tinylm.export", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc, *words):
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_export_command(tmp_path, bpe, text):
    proc = run_export("--help")
    assert proc.returncode == 0 and "--force" in proc.stdout and "FOLDER" in proc.stdout

    char_model = make_model(CharTokenizer.from_text(text), bias=False)
    save_checkpoint(str(tmp_path / "char.npz"), char_model["params"], char_model["config"],
                    char_model["tokenizer"], meta=char_model["meta"])
    bpe_model = make_model(bpe, bias=True)
    save_checkpoint(str(tmp_path / "bpe.npz"), bpe_model["params"], bpe_model["config"], bpe, meta={})
    out = tmp_path / "out"
    proc = run_export(tmp_path / "char.npz", out)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "zero biases" in proc.stdout
    assert (out / "tinylm_tokenizer.json").is_file() and (out / "vocab.json").is_file()   # ASCII only

    assert_one_line_error(run_export(tmp_path / "bpe.npz", out), "not empty", "--force")
    proc = run_export(tmp_path / "bpe.npz", out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "tinylm_tokenizer.json").exists()        # the old char tokenizer would contradict
    back = import_hf(str(out))
    assert back["tokenizer"].to_dict() == bpe.to_dict() and back["config"] == bpe_model["config"]

    assert_one_line_error(run_export(tmp_path / "missing.npz", tmp_path / "x"), "not found")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    assert_one_line_error(run_export(tmp_path / "junk.npz", tmp_path / "y"), "junk.npz")
    assert_one_line_error(run_export(out, out), "same folder")
    proc = run_export(tmp_path / "bpe.npz")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_reexport_of_an_imported_folder_is_identical(tmp_path, bpe):
    model = make_model(bpe, bias=False)
    export_hf(model, str(tmp_path / "a"))
    export_hf(str(tmp_path / "a"), str(tmp_path / "b"))
    a, b = import_hf(str(tmp_path / "a")), import_hf(str(tmp_path / "b"))
    assert a["config"] == b["config"] == model["config"]
    assert all(np.array_equal(a["params"][k], b["params"][k]) for k in a["params"])


# ----------------------------------------------------------------------------- against transformers


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    transformers.logging.set_verbosity_error()
    return transformers, torch


def torch_logits(model, torch, x):
    with torch.no_grad():
        return model(torch.tensor(x)).logits.numpy()


def test_transformers_model_imports_with_the_same_logits(tmp_path, hf, bpe):
    transformers, torch = hf
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=300, n_positions=32,
                                     bos_token_id=299, eos_token_id=299)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():        # HF initializes biases and LN to 0/1: make them visible
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(tmp_path))
    bpe.save(str(tmp_path))
    ours = import_hf(str(tmp_path))
    assert ours["config"].bias and ours["config"].block_size == 32
    x = ids(ours["config"])
    np.testing.assert_allclose(logits(ours, x), torch_logits(model, torch, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_exported_folder_loads_in_transformers_with_the_same_logits(tmp_path, hf, bpe, bias):
    transformers, torch = hf
    model = make_model(bpe, bias)
    export_hf(model, str(tmp_path))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    x = ids(model["config"])
    np.testing.assert_allclose(torch_logits(theirs, torch, x), logits(model, x), atol=1e-5, rtol=0)


def test_exported_tokenizer_files_encode_the_same_in_transformers(tmp_path, hf, bpe, text):
    transformers, _ = hf
    export_hf(make_model(bpe, bias=True), str(tmp_path / "bpe"))
    char = CharTokenizer.from_text(text)
    assert all(ord(c) < 128 for c in char.chars)
    export_hf(make_model(char, bias=True), str(tmp_path / "char"))
    slow = transformers.GPT2Tokenizer.from_pretrained(str(tmp_path / "bpe"))
    fast = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path / "bpe"))
    for s in TRICKY + [text[:2000]]:
        expected = bpe.encode(s).tolist()
        assert slow.encode(s) == expected, s
        assert fast.encode(s) == expected, s
    char_slow = transformers.GPT2Tokenizer.from_pretrained(str(tmp_path / "char"))
    sample = text[:2000]
    assert char_slow.encode(sample) == char.encode(sample).tolist()


def test_sample_py_reads_an_exported_folder_like_the_checkpoint(trained_dir, tmp_path):
    """sample.py --init_from FOLDER gives, seed for seed, the text the checkpoint itself gives."""
    from conftest import run_script
    folder = tmp_path / "hf"
    export_hf(os.path.join(trained_dir["dir"], "ckpt.npz"), str(folder))
    args = ("--start", "ROMEO:", "--num_samples", 2, "--max_new_tokens", 40, "--seed", 7)
    from_folder = run_script("sample.py", "--init_from", folder, *args)
    from_ckpt = run_script("sample.py", "--out_dir", trained_dir["dir"], *args)
    assert from_folder.returncode == 0, from_folder.stderr
    assert from_folder.stdout == from_ckpt.stdout and from_folder.stdout.startswith("ROMEO:")
