"""Llama folders in the Hugging Face layout (issue 28): tinylm's export read back, train.py and sample.py on a folder,
every config field tinylm does not compute refused by name, GPT-2 and Llama folders each read by their model_type;
and, when transformers is installed, logits and token ids against LlamaForCausalLM and AutoTokenizer both ways."""
import json
import os

import numpy as np
import pytest

from conftest import SHAKESPEARE, TRICKY
from test_hf import hf, torch_logits  # noqa: F401 (a fixture)
from test_reliability_strangers import bounded, copy_folder, edit_json, folder_size, one_line, with_config_entry
from tinylm.cli.export import main as export_main
from tinylm.cli.sample import sample_main
from tinylm.cli.train import train_main
from tinylm.core import gpt2, llama
from tinylm.errors import TinyLMError
from tinylm.io.checkpoint import load_checkpoint, save_checkpoint
from tinylm.io.hf import export_hf, import_hf, load_any
from tinylm.io.safetensors import load_file, save_file
from tinylm.text.bpe import train_bpe
from tinylm.text.char import CharTokenizer



@pytest.fixture(scope="module")
def text():
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return f.read()[:20_000]


@pytest.fixture(scope="module")
def bpe(text):
    return train_bpe(text[:5000], 300)


def make_llama(tok, tied, n_kv_head=2, seed=0, dropout=0.0):
    """A tiny Llama with every parameter moved off its start (RMSNorm gains of exactly 1 would hide a swap)."""
    config = llama.LlamaConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=n_kv_head,
                               n_embd=16, rope_theta=500.0, norm_eps=1e-5, tie_embeddings=tied, dropout=dropout)
    rng = np.random.default_rng(seed)
    params = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
              for k, v in llama.init_params(config, seed).items()}
    return {"params": params, "config": config, "tokenizer": tok, "opt_state": None,
            "meta": {"step": 7, "best_val_loss": 1.5, "train_args": {"seed": 3}}}


def logits(model, idx):
    return llama.forward(model["params"], model["config"], idx)[0]


def ids(config, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, (2, config.block_size))


@pytest.fixture(scope="module")
def char_folder(tmp_path_factory, text):
    """An untied character Llama with two K/V heads for four query heads, exported."""
    model = make_llama(CharTokenizer.from_text(text), tied=False)
    folder = str(tmp_path_factory.mktemp("llama") / "hf")
    export_hf(model, folder)
    return folder, model


# ----------------------------------------------------------------------------- tinylm out and back in


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("tied", [False, True])
def test_an_exported_llama_reads_back_bit_equal(tmp_path, text, bpe, kind, tied):
    tok = CharTokenizer.from_text(text) if kind == "char" else bpe
    model = make_llama(tok, tied, dropout=0.1)
    result = export_hf(model, str(tmp_path / "hf"))
    expected = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert result["files"] == sorted(expected + (["tinylm_tokenizer.json"] if kind == "char" else []))
    assert result["notes"] == []
    back = load_any(str(tmp_path / "hf"))
    assert back["config"] == model["config"]                       # dropout too, from tinylm's saved config
    assert set(back["params"]) == set(model["params"]) == set(llama.param_shapes(model["config"]))
    assert all(np.array_equal(back["params"][k], v) for k, v in model["params"].items())
    assert back["tokenizer"].to_dict() == tok.to_dict()
    assert back["meta"]["format"] == "tinylm-llama-folder" and back["meta"]["step"] == 7
    np.testing.assert_array_equal(logits(back, ids(model["config"])), logits(model, ids(model["config"])))
    export_hf(str(tmp_path / "hf"), str(tmp_path / "again"))          # a Llama folder re-exports as itself
    again = load_any(str(tmp_path / "again"))
    assert again["config"] == model["config"] and all(np.array_equal(again["params"][k], v) for k, v in
                                                      model["params"].items())


def test_config_json_names_every_field_of_the_llama(char_folder):
    folder, model = char_folder
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    c = model["config"]
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["max_position_embeddings"], cfg["vocab_size"]) == \
        (16, c.ffn_hidden, 2, 4, 2, 4, 16, c.vocab_size)
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 500.0 and cfg["rms_norm_eps"] == 1e-5
    assert cfg["tie_word_embeddings"] is False and cfg["attention_bias"] is False and cfg["mlp_bias"] is False
    assert cfg["hidden_act"] == "silu" and cfg["rope_scaling"] is None and cfg["torch_dtype"] == "float32"
    tensors, metadata = load_file(os.path.join(folder, "model.safetensors"), mmap=False)
    assert json.loads(metadata["tinylm.config"]) == c.to_dict() and metadata["tinylm.format"] == "tinylm-llama-folder"


def test_float16_export_stores_float16_and_reads_back_as_float32(tmp_path, bpe):
    model = make_llama(bpe, tied=True)
    export_hf(model, str(tmp_path), dtype=np.float16)
    tensors, _ = load_file(str(tmp_path / "model.safetensors"), mmap=False)
    assert {str(t.dtype) for t in tensors.values()} == {"float16"}
    back = import_hf(str(tmp_path))
    for k, v in model["params"].items():
        assert back["params"][k].dtype == np.float32
        np.testing.assert_array_equal(back["params"][k], v.astype(np.float16).astype(np.float32))


def test_a_transformers_4_config_reads_as_a_transformers_5_one(char_folder, tmp_path):
    """transformers 4 writes rope_theta (+ rope_scaling null), 5 writes rope_parameters: either alone gives θ."""
    folder, model = char_folder
    for drop in ("rope_parameters", "rope_theta"):
        copy = copy_folder(folder, str(tmp_path / drop))
        edit_json(os.path.join(copy, "config.json"), lambda c: c.pop(drop))
        assert import_hf(copy)["config"].rope_theta == 500.0


def test_the_export_command_writes_a_llama_and_says_what_it_wrote(tmp_path, text, capsys):
    model = make_llama(CharTokenizer.from_text(text), tied=True)
    ckpt = str(tmp_path / "ckpt.npz")
    save_checkpoint(ckpt, model["params"], model["config"], model["tokenizer"], meta={"step": 3})
    assert export_main([ckpt, str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert out == (f"wrote {tmp_path / 'out'}: config.json, model.safetensors, tinylm_tokenizer.json, tokenizer.json, "
                   "tokenizer_config.json\n") and err == ""
    back = load_any(str(tmp_path / "out"))
    assert back["config"] == model["config"] and back["meta"]["step"] == 3
    assert export_main([ckpt, str(tmp_path / "out")]) == 1                  # not empty: --force, as for GPT-2
    one_line(capsys, "not empty", "--force")


def test_iter_param_shapes_of_a_llama_is_param_shapes_one_at_a_time():
    for tied in (False, True):
        for n_layer in (1, 3):
            config = llama.LlamaConfig(n_layer=n_layer, n_head=2, n_embd=8, tie_embeddings=tied)
            assert list(llama.iter_param_shapes(config)) == list(llama.param_shapes(config).items())
            assert llama.count_tensors(config) == len(llama.param_shapes(config))
    huge = llama.LlamaConfig(n_layer=10 ** 8, n_head=2, n_embd=8)
    assert next(llama.iter_param_shapes(huge))[0] == "model.embed_tokens.weight"


# ----------------------------------------------------------------------------- train.py and sample.py on a folder


def test_sample_py_reads_a_llama_folder_as_its_checkpoint(char_folder, tmp_path, capsys):
    folder, model = char_folder
    ckpt = str(tmp_path / "ckpt.npz")
    save_checkpoint(ckpt, model["params"], model["config"], model["tokenizer"], meta={})
    args = ["--start", "ROMEO:", "--num_samples", "2", "--max_new_tokens", "20", "--seed", "7"]
    assert sample_main(["--init_from", folder, *args]) == 0
    from_folder = capsys.readouterr().out
    assert sample_main(["--init_from", ckpt, *args]) == 0
    assert from_folder == capsys.readouterr().out and from_folder.startswith("ROMEO:")


def test_train_py_fine_tunes_a_llama_folder(char_folder, tmp_path, text, capsys):
    folder, model = char_folder
    data = tmp_path / "t.txt"
    data.write_text(text[:5000], encoding="utf-8")
    out = tmp_path / "run"
    code = train_main(["--init_from", folder, "--data", str(data), "--out_dir", str(out), "--batch_size", "2",
                       "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1", "--sample_tokens", "0",
                       "--progress", "false"])
    assert code == 0, capsys.readouterr().err
    tuned = load_checkpoint(str(out / "ckpt.npz"))
    assert tuned["config"] == model["config"] and tuned["tokenizer"].to_dict() == model["tokenizer"].to_dict()
    moved = {k: np.abs(tuned["params"][k] - v).max() for k, v in model["params"].items()}
    assert max(moved.values()) > 0                   # it trained ...
    assert max(moved.values()) < 1e-3                # ... from the folder's weights (each sits ~0.1 off an init)


# ----------------------------------------------------------------------------- GPT-2 or Llama, by model_type


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, text):
    tok = CharTokenizer.from_text(text)
    config = gpt2.GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=16)
    folder = str(tmp_path_factory.mktemp("gpt2") / "hf")
    export_hf({"params": gpt2.init_params(config, seed=0), "config": config, "tokenizer": tok, "meta": {}}, folder)
    return folder, config


def test_gpt2_and_llama_folders_each_load_by_their_model_type_and_not_by_the_other(char_folder, gpt2_folder,
                                                                                   tmp_path, capsys):
    llama_dir, model = char_folder
    gpt2_dir, gpt2_config = gpt2_folder
    assert load_any(llama_dir)["config"] == model["config"] and load_any(gpt2_dir)["config"] == gpt2_config
    # a Llama's config.json over GPT-2's tensors, and the reverse: the tensor sets are refused by name
    for config_from, weights_from, words in [(llama_dir, gpt2_dir, ["missing tensor", "model.embed_tokens.weight",
                                                                     "for a Llama"]),
                                             (gpt2_dir, llama_dir, ["missing tensor", "transformer.wte.weight",
                                                                    "for a GPT-2"])]:
        mixed = copy_folder(weights_from, str(tmp_path / f"mixed_{len(os.listdir(tmp_path))}"))
        with open(os.path.join(config_from, "config.json"), "rb") as f, \
                open(os.path.join(mixed, "config.json"), "wb") as g:
            g.write(f.read())
        assert sample_main(["--init_from", mixed, "--max_new_tokens", "5"]) == 1
        one_line(capsys, *words)


def test_train_py_with_arch_gpt2_refuses_a_llama_folder(char_folder, tmp_path, capsys):
    folder, _ = char_folder
    out = tmp_path / "run"
    assert train_main(["--init_from", folder, "--arch", "gpt2", "--out_dir", str(out), "--max_iters", "1"]) == 1
    one_line(capsys, "--arch gpt2", "llama")
    assert not os.path.exists(out / "ckpt.npz")


# ----------------------------------------------------------------------------- what tinylm does not compute


REFUSED = [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, ["rope_scaling"]),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}}, ["rope_parameters.'factor'"]),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 500.0}}, ["rope_type", "yarn"]),
    ({"rope_parameters": "default"}, ["rope_parameters", "object"]),
    ({"rope_theta": 10000.0}, ["rope_theta", "differ"]),
    ({"rope_theta": "500"}, ["rope_theta", "positive finite number"]),
    ({"attention_bias": True}, ["attention_bias", "false"]),
    ({"mlp_bias": True}, ["mlp_bias", "false"]),
    ({"attention_bias": 0}, ["attention_bias"]),
    ({"sliding_window": 4096}, ["sliding_window", "null"]),
    ({"head_dim": 8}, ["head_dim", "hidden_size / num_attention_heads = 4"]),
    ({"head_dim": "4"}, ["head_dim", "positive integer"]),
    ({"hidden_act": "gelu"}, ["hidden_act", "gelu", "silu"]),
    ({"pretraining_tp": 2}, ["pretraining_tp"]),
    ({"pretraining_tp": True}, ["pretraining_tp"]),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, ["quantization_config"]),
    ({"model_type": "mistral"}, ["model_type", "mistral", "'llama'"]),
    ({"architectures": ["LlamaModel"]}, ["architecture", "LlamaForCausalLM"]),
    ({"architectures": "LlamaForCausalLM"}, ["architectures must be a list of names", "got the string"]),
    ({"num_key_value_heads": 3}, ["n_head", "divisible", "n_kv_head"]),
    ({"num_key_value_heads": 2.0}, ["num_key_value_heads", "positive integer"]),
    ({"num_attention_heads": 16, "head_dim": None}, ["head width", "even"]),
    ({"tie_word_embeddings": "no"}, ["tie_word_embeddings", "true or false"]),
    ({"tie_word_embeddings": True}, ["lm_head.weight differs", "tie_word_embeddings is true"]),
    ({"attention_dropout": 1.5}, ["attention_dropout"]),
    ({"max_position_embeddings": 0}, ["max_position_embeddings", "positive integer"]),
    ({"num_hidden_layers": 3}, ["missing tensor", "model.layers.2.", "for a Llama"]),
    ({"num_hidden_layers": 1}, ["unexpected tensor", "model.layers.1."]),
    ({"intermediate_size": 32}, ["shape", "gate_proj", "(32, 16)"]),
    ({"vocab_size": 66}, ["shape", "model.embed_tokens.weight"]),
]


@pytest.mark.parametrize("change, words", REFUSED, ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else "")
def test_every_field_tinylm_does_not_compute_is_refused_by_name(char_folder, tmp_path, change, words):
    folder = copy_folder(char_folder[0], str(tmp_path / "f"))
    edit_json(os.path.join(folder, "config.json"), lambda c: c.update(change))
    with pytest.raises(TinyLMError) as e:
        import_hf(folder)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("raw, words", [
    ('"rms_norm_eps": NaN', ["rms_norm_eps", "nan"]),
    ('"rope_theta": Infinity', ["rope_theta"]),
    ('"rope_theta": 1' + "0" * 400, ["rope_theta", "characters"]),
    ('"num_hidden_layers": 2.0', ["num_hidden_layers", "positive integer"]),
    ('"model_type": "' + "x" * 5000 + '"', ["model_type", "5,002 characters"]),
])
def test_json_values_that_are_not_numbers_are_refused_in_a_short_line(char_folder, tmp_path, raw, words):
    folder = with_config_entry(copy_folder(char_folder[0], str(tmp_path / "f")), raw)
    result, _, _ = bounded(lambda: import_hf(folder))
    assert isinstance(result, TinyLMError), result
    assert "\n" not in str(result) and len(str(result)) < 400, str(result)
    for w in words:
        assert w in str(result), (w, str(result))


def test_a_llama_claiming_a_hundred_million_layers_is_refused_in_its_own_time_and_memory(char_folder, tmp_path):
    folder = copy_folder(char_folder[0], str(tmp_path / "f"))
    edit_json(os.path.join(folder, "config.json"), lambda c: c.update(num_hidden_layers=10 ** 8))
    result, peak, seconds = bounded(lambda: import_hf(folder))
    assert isinstance(result, TinyLMError), result
    for w in ("missing tensor", "model.layers.2.", "n_layer=100,000,000", "900,000,003 tensors", "the file holds 21"):
        assert w in str(result), (w, str(result))
    assert peak < 4 * folder_size(folder) + (2 << 20) and seconds < 2.0, (peak, seconds)


def edit_tensors(folder, change):
    path = os.path.join(folder, "model.safetensors")
    tensors, metadata = load_file(path, mmap=False)
    change(tensors)
    save_file(tensors, path, metadata)


@pytest.mark.parametrize("change, words", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), ["missing tensor", "model.layers.1.mlp.up_proj.weight"]),
    (lambda t: t.pop("lm_head.weight"), ["missing tensor", "lm_head.weight"]),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(16, np.float32)}),
     ["unexpected tensor", "q_proj.bias"]),
    (lambda t: t.update({"model.layers.0.mlp.gate_proj.weight": t["model.layers.0.mlp.gate_proj.weight"].T.copy()}),
     ["gate_proj", "shape", "expected (64, 16)"]),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 16), np.float32)}),
     ["k_proj", "shape", "expected (8, 16)"]),
    (lambda t: t.update({"model.norm.weight": np.ones(16, np.int32)}), ["model.norm.weight", "floating point"]),
    (lambda t: t.update({"model.norm.weight": np.full(16, np.nan, np.float32)}), ["model.norm.weight"]),
])
def test_missing_extra_misshapen_or_non_finite_tensors_are_one_line(char_folder, tmp_path, capsys, change, words):
    folder = copy_folder(char_folder[0], str(tmp_path / "f"))
    edit_tensors(folder, change)
    with pytest.raises(TinyLMError) as e:
        import_hf(folder)
    for w in words:
        assert w in str(e.value) and "\n" not in str(e.value), (w, str(e.value))
    out = tmp_path / "run"                          # the command lines: one line, exit 1, nothing written
    assert sample_main(["--init_from", folder, "--max_new_tokens", "5"]) == 1
    one_line(capsys, words[0])
    assert train_main(["--init_from", folder, "--out_dir", str(out), "--max_iters", "1"]) == 1
    one_line(capsys, words[0])
    assert not os.path.exists(out / "ckpt.npz")


def test_max_position_embeddings_beyond_2_to_the_20_is_refused_by_name(char_folder, tmp_path, capsys):
    # nothing in a Llama folder bounds it; 10¹⁸ read fine and crashed sample.py allocating the KV cache
    folder = copy_folder(char_folder[0], str(tmp_path / "f"))
    edit_json(os.path.join(folder, "config.json"), lambda c: c.update(max_position_embeddings=10 ** 18))
    with pytest.raises(TinyLMError, match="max_position_embeddings is 1000000000000000000; .* at most 2\\^20"):
        import_hf(folder)
    assert sample_main(["--init_from", folder, "--max_new_tokens", "5"]) == 1
    one_line(capsys, "max_position_embeddings")
    edit_json(os.path.join(folder, "config.json"), lambda c: c.update(max_position_embeddings=2 ** 20))
    assert import_hf(folder)["config"].block_size == 2 ** 20
    assert sample_main(["--init_from", folder, "--max_new_tokens", "5", "--num_samples", "2"]) == 0


def test_a_llama_whose_tinylm_metadata_says_bias_false_reads_as_the_llama(char_folder, tmp_path):
    # the metadata's bias field is GPT-2's; on a Llama it crashed the reader (LlamaConfig has no bias)
    folder = copy_folder(char_folder[0], str(tmp_path / "f"))
    path = os.path.join(folder, "model.safetensors")
    tensors, metadata = load_file(path, mmap=False)
    metadata["tinylm.config"] = json.dumps({**json.loads(metadata["tinylm.config"]), "bias": False})
    save_file(tensors, path, metadata)
    back = import_hf(folder)
    assert back["config"] == char_folder[1]["config"]
    assert all(np.array_equal(back["params"][k], v) for k, v in char_folder[1]["params"].items())


def test_a_sentencepiece_style_tokenizer_json_is_refused_not_misread(char_folder, tmp_path, bpe):
    folder = copy_folder(char_folder[0], str(tmp_path / "f"))
    os.remove(os.path.join(folder, "tinylm_tokenizer.json"))   # the character model's tokenizer.json is not byte-level
    with pytest.raises(TinyLMError) as e:
        import_hf(folder)
    assert "not GPT-2's byte-level" in str(e.value)
    model = make_llama(bpe, tied=True)
    folder = str(tmp_path / "bpe")
    export_hf(model, folder)
    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    for edit in (lambda t: t.update(pre_tokenizer=metaspace), lambda t: t["model"].update(byte_fallback=True),
                 lambda t: t.update(normalizer={"type": "NFC"})):
        edit_json(os.path.join(folder, "tokenizer.json"), edit)
        with pytest.raises(TinyLMError) as e:
            import_hf(folder)
        assert "not GPT-2's byte-level" in str(e.value) and "\n" not in str(e.value)
        export_hf(model, folder)
    assert import_hf(folder)["tokenizer"].to_dict() == bpe.to_dict()
    # read before, with other ids than the tokenizers library gives: a space put first, tokens matched whole
    eot = {"id": bpe.end_of_text_id, "content": "<|endoftext|>", "special": True}
    for edit, words in ((lambda t: t["pre_tokenizer"].update(add_prefix_space=True), "add_prefix_space is true"),
                        (lambda t: t["added_tokens"].append({**eot, "id": 5, "content": "the"}),
                         "added token 'the' (id 5)"),
                        (lambda t: t.update(post_processor={"type": "TemplateProcessing", "single": [
                            {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]}),
                         "post_processor 'TemplateProcessing' adds tokens"),
                        (lambda t: t["added_tokens"].__setitem__(0, {**eot, "id": 7}),
                         f"<|endoftext|> has id 7, but the vocabulary gives it {bpe.end_of_text_id}")):
        edit_json(os.path.join(folder, "tokenizer.json"), edit)
        with pytest.raises(TinyLMError) as e:
            import_hf(folder)
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
        export_hf(model, folder)
    os.remove(os.path.join(folder, "tokenizer.json"))        # save_pretrained of a model alone writes no tokenizer
    with pytest.raises(TinyLMError) as e:
        import_hf(folder)
    assert "no tokenizer" in str(e.value) and "tokenizer.json" in str(e.value)


# ----------------------------------------------------------------------------- against transformers


SHAPES = [dict(tied=False, n_kv_head=2), dict(tied=True, n_kv_head=2), dict(tied=False, n_kv_head=4),
          dict(tied=True, n_kv_head=1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"tied={s['tied']}-kv={s['n_kv_head']}")
def test_an_exported_llama_loads_in_transformers_with_the_same_logits(tmp_path, hf, bpe, shape):
    transformers, torch = hf
    model = make_llama(bpe, **shape)
    export_hf(model, str(tmp_path))
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert theirs.config.num_key_value_heads == shape["n_kv_head"]
    assert (theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()) == shape["tied"]
    x = ids(model["config"])
    np.testing.assert_allclose(torch_logits(theirs, torch, x), logits(model, x), atol=2e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"tied={s['tied']}-kv={s['n_kv_head']}")
def test_a_transformers_llama_loads_in_tinylm_with_the_same_logits(tmp_path, hf, bpe, shape):
    """save_pretrained's folder (transformers' own config.json and tensors) and a tokenizer saved by transformers."""
    transformers, torch = hf
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=shape["n_kv_head"],
                                      vocab_size=bpe.vocab_size, max_position_embeddings=16, rms_norm_eps=1e-5,
                                      rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                                      tie_word_embeddings=shape["tied"])
    theirs = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():         # RMSNorm gains start at 1: move them
        for p in theirs.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(str(tmp_path))
    export_hf(make_llama(bpe, tied=True), str(tmp_path / "tok"))
    transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok")).save_pretrained(str(tmp_path))
    ours = load_any(str(tmp_path))
    c = ours["config"]
    assert (c.n_kv_head, c.ffn_hidden, c.rope_theta, c.norm_eps, c.tie_embeddings) == \
        (shape["n_kv_head"], 40, 500.0, 1e-5, shape["tied"]) and ours["meta"]["format"] == "hf-llama"
    assert ours["tokenizer"].to_dict() == bpe.to_dict()
    x = ids(c)
    np.testing.assert_allclose(logits(ours, x), torch_logits(theirs, torch, x), atol=2e-5, rtol=0)


@pytest.mark.parametrize("kind", ["char", "char non-ASCII", "bpe"])
def test_auto_tokenizer_gives_tinylm_ids_and_text(tmp_path, hf, bpe, text, kind):
    transformers, _ = hf
    if kind == "bpe":
        tok, samples = bpe, TRICKY + [text[:2000]]
    else:
        extra = "naïve café, 東京 🙂" if kind == "char non-ASCII" else ""
        tok = CharTokenizer.from_text(text + extra)
        samples = [text[:2000], "  two  spaces\n\nand lines", "To be, or not"] + ([extra] if extra else [])
    export_hf(make_llama(tok, tied=True), str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for s in samples:
        expected = tok.encode(s).tolist()
        assert theirs.encode(s) == expected, s
        assert theirs.decode(expected) == s, s


def test_a_bfloat16_transformers_llama_reads_as_float32_with_the_same_logits(tmp_path, hf, bpe):
    """Llamas on the hub are mostly stored in bfloat16: each value is widened to float32 exactly."""
    transformers, torch = hf
    torch.manual_seed(1)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=bpe.vocab_size, max_position_embeddings=16,
                                      tie_word_embeddings=False)
    theirs = transformers.LlamaForCausalLM(config).eval().to(torch.bfloat16)
    theirs.save_pretrained(str(tmp_path))
    export_hf(make_llama(bpe, tied=True), str(tmp_path / "tok"))
    transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok")).save_pretrained(str(tmp_path))
    ours = load_any(str(tmp_path))
    with open(tmp_path / "model.safetensors", "rb") as f:
        header = f.read(int.from_bytes(f.read(8), "little"))
    assert b'"BF16"' in header and b'"F32"' not in header and ours["config"].norm_eps == 1e-6
    for name, value in theirs.state_dict().items():
        if name in ours["params"]:
            np.testing.assert_array_equal(ours["params"][name], value.float().numpy())
    x = ids(ours["config"])
    np.testing.assert_allclose(logits(ours, x), torch_logits(theirs.float(), torch, x), atol=2e-5, rtol=0)
