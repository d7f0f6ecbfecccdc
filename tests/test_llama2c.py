"""llama2.c's model.bin and tokenizer.bin (tinylm/io/llama2c.py, tinylm/text/pieces.py).

The outside check is run.c itself, which CI cannot build; here a NumPy transcription of run.c's forward (its
interleaved rotary pairs, its head-to-K/V-head mapping, its ids) reads the exported arrays and must give tinylm's
logits. test_run_c_binary runs a real run.c binary when TINYLM_RUN_C names one.
"""
import os
import subprocess

import numpy as np
import pytest

from conftest import run_script
from tinylm.cli.export import main as export_main
from tinylm.core import layers as CL
from tinylm.core import llama
from tinylm.core.gpt2 import GPTConfig
from tinylm.core.gpt2 import init_params as gpt2_init
from tinylm.errors import TinyLMError
from tinylm.io.checkpoint import save_checkpoint
from tinylm.io.hf import load_any
from tinylm.io.llama2c import (SPECIALS, export_llama2c, interleave_permutation, load_llama2c, permute_heads,
                               read_model_bin, read_tokenizer_bin, write_model_bin, write_tokenizer_bin)
from tinylm.text.bpe import BPETokenizer, base_vocab
from tinylm.text.char import CharTokenizer
from tinylm.text.pieces import PieceTokenizer
from tinylm.train.args import TrainArgs
from tinylm.train.loop import train

CHARS = "\n !,.:?ARTabdeghilmnorstuw"


def make(tie=False, n_kv_head=2, chars=CHARS, **kw):
    config = llama.LlamaConfig(block_size=16, vocab_size=len(chars), n_layer=2, n_head=4, n_kv_head=n_kv_head,
                               n_embd=16, tie_embeddings=tie, **kw).validate()
    params = llama.init_params(config, seed=3)
    params = {k: v + np.float32(0.02) * np.random.default_rng(7).standard_normal(v.shape).astype(np.float32)
              for k, v in params.items()}            # norms away from 1, so a swapped norm would show
    return {"params": params, "config": config, "tokenizer": CharTokenizer(chars), "meta": {}}


def rope_interleaved(x, positions, theta=10000.0):
    """run.c's rotary: pair (2j, 2j+1) turned by positions·θ^(−2j/D).   x (T, D) -> (T, D)"""
    D = x.shape[-1]
    angles = np.outer(positions, theta ** (-np.arange(0, D, 2) / D))
    cos, sin = np.cos(angles), np.sin(angles)
    y = x.copy()
    y[:, 0::2] = x[:, 0::2] * cos - x[:, 1::2] * sin
    y[:, 1::2] = x[:, 0::2] * sin + x[:, 1::2] * cos
    return y


def run_c_logits(path, tokens):
    """run.c's forward, one token at a time with its cache, in float64 from model.bin's arrays: (T, V) logits."""
    a, h, shared = read_model_bin(path)
    a = {k: v.astype(np.float64) for k, v in a.items()}
    C, L, H, Hkv = h["dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"]
    D, kv_mul = C // H, H // Hkv
    rms = lambda x, w: w * x / np.sqrt(np.mean(x * x) + 1e-5)
    keys, values, out = [[] for _ in range(L)], [[] for _ in range(L)], []
    for pos, token in enumerate(tokens):
        x = a["token_embedding"][token].copy()
        for l in range(L):
            xb = rms(x, a["rms_att"][l])
            q = rope_interleaved((a["wq"][l] @ xb).reshape(H, D), [pos] * H)
            keys[l].append(rope_interleaved((a["wk"][l] @ xb).reshape(Hkv, D), [pos] * Hkv))
            values[l].append((a["wv"][l] @ xb).reshape(Hkv, D))
            K, V = np.stack(keys[l]), np.stack(values[l])                  # (pos+1, Hkv, D)
            heads = []
            for i in range(H):
                s = K[:, i // kv_mul] @ q[i] / np.sqrt(D)
                p = np.exp(s - s.max())
                heads.append(p / p.sum() @ V[:, i // kv_mul])
            x = x + a["wo"][l] @ np.concatenate(heads)
            xb = rms(x, a["rms_ffn"][l])
            gate = a["w1"][l] @ xb
            x = x + a["w2"][l] @ (gate / (1 + np.exp(-gate)) * (a["w3"][l] @ xb))
        out.append((a["token_embedding"] if shared else a["wcls"]) @ rms(x, a["rms_final"]))
    return np.array(out)


def tinylm_logits(params, config, ids):
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    return llama.forward(p64, config, np.asarray(ids)[None])[0][0]


# ----------------------------------------------------------------------------- the basis change


def test_the_permutation_is_orthogonal_and_turns_half_split_pairs_into_interleaved_ones():
    D = 8
    perm = interleave_permutation(D)
    assert perm.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    P = np.eye(D)[perm]                                   # P[r, perm[r]] = 1
    assert np.array_equal(P @ P.T, np.eye(D)) and np.array_equal(P.T @ P, np.eye(D))
    # P R_half Pᵀ = R_interleaved at every position: the same rotation in another basis
    for pos in (0, 1, 5):
        R_half = CL.rope_forward(np.eye(D), np.full(D, pos))[0].T      # column c: e_c turned
        R_inter = rope_interleaved(np.eye(D), np.full(D, pos)).T
        assert np.allclose(P @ R_half @ P.T, R_inter, atol=1e-14)


def test_permuted_weights_under_interleaved_rope_give_the_original_scores():
    rng = np.random.default_rng(0)
    H, D, C, T = 2, 8, 12, 6
    Wq, Wk, x = rng.standard_normal((H * D, C)), rng.standard_normal((H * D, C)), rng.standard_normal((T, C))
    perm = interleave_permutation(D)
    Wq2, Wk2 = permute_heads(Wq, H, perm), permute_heads(Wk, H, perm)
    assert not np.allclose(Wq2, Wq)
    for h in range(H):
        rows = slice(h * D, (h + 1) * D)
        q, k = CL.rope_forward(x @ Wq[rows].T, np.arange(T))[0], CL.rope_forward(x @ Wk[rows].T, np.arange(T))[0]
        q2, k2 = rope_interleaved(x @ Wq2[rows].T, np.arange(T)), rope_interleaved(x @ Wk2[rows].T, np.arange(T))
        assert np.allclose(q2 @ k2.T, q @ k.T, rtol=0, atol=1e-12)
        assert not np.allclose(rope_interleaved(x @ Wq[rows].T, np.arange(T)) @
                               rope_interleaved(x @ Wk[rows].T, np.arange(T)).T, q @ k.T)   # without P: wrong
    back = np.argsort(perm)
    assert np.array_equal(permute_heads(Wq2, H, back), Wq)             # import ∘ export = identity


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("tie,n_kv_head", [(False, 2), (True, 4), (True, 1)])
def test_round_trip_keeps_every_array_and_run_c_computes_tinylms_logits(tmp_path, tie, n_kv_head):
    model = make(tie=tie, n_kv_head=n_kv_head)
    result = export_llama2c(model, str(tmp_path / "out"))
    assert result["files"] == ["model.bin", "tokenizer.bin"]
    path = str(tmp_path / "out" / "model.bin")
    back = load_llama2c(path)
    assert back["config"] == model["config"] and back["tokenizer"].chars == CHARS
    assert set(back["params"]) == set(model["params"])
    for k, v in model["params"].items():
        assert back["params"][k].dtype == np.float32 and np.array_equal(back["params"][k], v), k
    ids = model["tokenizer"].encode("To be, or not to be")[:16]
    ours = tinylm_logits(model["params"], model["config"], ids)
    assert np.allclose(tinylm_logits(back["params"], back["config"], ids), ours, rtol=0, atol=1e-12)
    theirs = run_c_logits(path, ids.astype(np.int64) + 3)              # run.c's ids: the characters from 3
    assert np.allclose(theirs[:, 3:], ours, rtol=0, atol=1e-10)
    # <unk>, <s>, </s> get the mean logit: below the largest, so never run.c's greedy pick
    assert np.allclose(theirs[:, :3], ours.mean(axis=1, keepdims=True), atol=1e-10)
    assert np.all(theirs[:, :3].max(axis=1) < ours.max(axis=1))


def test_the_file_layout_is_run_cs(tmp_path):
    model = make(tie=False)
    config = model["config"]
    export_llama2c(model, str(tmp_path / "out"))
    raw = (tmp_path / "out" / "model.bin").read_bytes()
    V, C, F, L, T, D = len(CHARS) + 3, 16, config.ffn_hidden, 2, 16, 4
    assert np.frombuffer(raw[:28], "<i4").tolist() == [C, F, L, 4, 2, -V, T]      # untied: negative vocab
    floats = V * C + L * C + L * C * C + 2 * L * C * (2 * D) + L * C * C + L * C + 3 * L * C * F + C + T * D + V * C
    assert len(raw) == 28 + 4 * floats
    a, _, _ = read_model_bin(str(tmp_path / "out" / "model.bin"))
    angles = np.outer(np.arange(T), 10000.0 ** (-np.arange(0, D, 2) / D))    # the tables older run.c's read
    assert np.allclose(a["freq_cis"], np.concatenate([np.cos(angles), np.sin(angles)]).ravel(), atol=1e-6)
    emb = np.frombuffer(raw, "<f4", V * C, 28).reshape(V, C)
    start = model["params"]["model.embed_tokens.weight"][CHARS.index("\n")]
    assert np.array_equal(emb[1], start) and np.array_equal(emb[3:], model["params"]["model.embed_tokens.weight"])
    pieces, scores = read_tokenizer_bin(str(tmp_path / "out" / "tokenizer.bin"), V)
    assert tuple(pieces[:3]) == SPECIALS and pieces[3:] == [c.encode() for c in CHARS] and not scores.any()
    assert np.frombuffer((tmp_path / "out" / "tokenizer.bin").read_bytes()[:4], "<i4")[0] == len(b"\n</s>\n")


# ----------------------------------------------------------------------------- refusals


def write_bin(path, header, n_floats):
    with open(path, "wb") as f:
        f.write(np.asarray(header, "<i4").tobytes() + np.zeros(n_floats, "<f4").tobytes())


def size_of(header):
    C, F, L, Hq, Hkv, V, T = header
    D = C // Hq
    return abs(V) * C * (1 if V > 0 else 2) + 2 * L * C + 2 * L * C * C + 2 * L * C * Hkv * D + 3 * L * C * F + C + T * D


@pytest.mark.parametrize("header,extra,words", [
    ((16, 32, 1, 4, 2, 10, 8), 1, ("header describes", "bytes")),
    ((16, 32, 1, 4, 2, 10, 8), -1, ("header describes",)),
    ((16, 32, 1, 4, 2, -10, 8), -160, ("header describes",)),          # untied, written without its classifier
    ((2 ** 30, 2 ** 30, 1000, 2 ** 10, 2 ** 10, 32000, 2 ** 20), 0, ("header describes",)),   # no 10¹⁶-byte read
    ((0, 32, 1, 4, 2, 10, 8), 0, ("dim is 0",)),
    ((16, -32, 1, 4, 2, 10, 8), 0, ("hidden_dim is -32",)),
    ((16, 32, 1, 4, 3, 10, 8), 0, ("not divisible by n_kv_heads",)),
    ((12, 32, 1, 4, 2, 10, 8), 0, ("odd",)),
    ((16, 32, 1, 3, 1, 10, 8), 0, ("not divisible by n_heads",)),
])
def test_a_bad_model_bin_is_one_line(tmp_path, header, extra, words):
    path = tmp_path / "model.bin"
    big = max(header) >= 2 ** 20
    write_bin(path, header, 0 if big or min(header) <= 0 and header[5] > 0 else size_of(header) + extra)
    with pytest.raises(TinyLMError) as e:
        read_model_bin(str(path))
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_a_bad_tokenizer_bin_is_one_line(tmp_path):
    model = make()
    export_llama2c(model, str(tmp_path / "out"))
    tokenizer = tmp_path / "out" / "tokenizer.bin"
    good = tokenizer.read_bytes()
    V = len(CHARS) + 3
    for cut in (2, len(good) - 1, len(good) - 8):
        tokenizer.write_bytes(good[:cut])
        with pytest.raises(TinyLMError, match="truncated"):
            read_tokenizer_bin(str(tokenizer), V)
    tokenizer.write_bytes(good + np.float32(0).tobytes() + np.int32(1).tobytes() + b"#")
    with pytest.raises(TinyLMError, match=f"{V + 1} tokens, but the model's vocab_size is {V}"):
        load_llama2c(str(tmp_path / "out" / "model.bin"))
    with open(tokenizer, "wb") as f:
        write_tokenizer_bin(f, list(SPECIALS) + [c.encode() for c in CHARS[:-1]], np.zeros(V - 1))
    with pytest.raises(TinyLMError, match=f"{V - 1} tokens, but the model's vocab_size is {V}"):
        load_llama2c(str(tmp_path / "out" / "model.bin"))
    with open(tokenizer, "wb") as f:
        write_tokenizer_bin(f, list(SPECIALS) + [b"\xff"] + [c.encode() for c in CHARS[1:]], np.zeros(V))
    with pytest.raises(TinyLMError, match="not UTF-8 text; tinylm cannot represent"):
        load_llama2c(str(tmp_path / "out" / "model.bin"))
    os.remove(tokenizer)
    with pytest.raises(TinyLMError, match="--tokenizer_bin"):
        load_llama2c(str(tmp_path / "out" / "model.bin"))
    os.mkfifo(tmp_path / "fifo.bin")
    with pytest.raises(TinyLMError, match="not a regular file|FIFO|fifo"):
        read_model_bin(str(tmp_path / "fifo.bin"))


@pytest.mark.parametrize("change,words", [
    (dict(rope_theta=500000.0), ("--rope_theta", "10000")),
    (dict(norm_eps=1e-6), ("norm_eps", "1e-05")),
    (dict(chars="\nabc"), ("no ' '",)),
    (dict(chars="\0 ab"), ("NUL",)),
])
def test_what_run_c_cannot_run_is_refused_and_nothing_is_written(tmp_path, change, words):
    model = make(**change)
    with pytest.raises(TinyLMError) as e:
        export_llama2c(model, str(tmp_path / "out"))
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_bpe_and_gpt2_models_are_refused(tmp_path):
    model = make(chars="".join(chr(i) for i in range(256)))
    model["tokenizer"] = BPETokenizer(base_vocab(), [])
    with pytest.raises(TinyLMError, match="BPE"):
        export_llama2c(model, str(tmp_path / "a"))
    config = GPTConfig(block_size=8, vocab_size=len(CHARS), n_layer=1, n_head=2, n_embd=8)
    with pytest.raises(TinyLMError, match="Llamas only.*GPT-2"):
        export_llama2c({"params": gpt2_init(config), "config": config, "tokenizer": CharTokenizer(CHARS)},
                       str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- sentencepiece-style pieces


def run_c_encode(pieces, scores, text):
    """run.c's encode, transcribed (rescans the whole sequence at every merge)."""
    ids = {p: i for i, p in reversed(list(enumerate(pieces)))}
    tokens = [1] + ([ids[b" "]] if text else [])
    for ch in text:
        b = ch.encode()
        tokens += [ids[b]] if b in ids else [x + 3 for x in b]
    while True:
        best, at = -1e10, -1
        for i in range(len(tokens) - 1):
            m = ids.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if m is not None and scores[m] > best:
                best, at, merged = scores[m], i, m
        if at < 0:
            return tokens
        tokens[at:at + 2] = [merged]


def piece_vocabulary():
    """<unk>, <s>, </s>, the 256 byte tokens, a few letters and merges with scores (ties among them)."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    words = [b" ", b"a", b"b", b"c", b"\xc3\xa9", b"ab", b"bc", b"abc", b" a", b" ab", b"ca", b"aa", b"aaa", b"cab"]
    scores = [0.0] * 259 + [-1, -2, -2, -3, -4, -1.5, -1.5, -0.5, -2.5, -0.7, -1.5, -1, -1, -0.6]
    return pieces + words, np.array(scores, dtype=np.float32)


def test_piece_tokenizer_encodes_as_run_c_and_decodes_back():
    pieces, scores = piece_vocabulary()
    tok = PieceTokenizer(pieces, scores)
    rng = np.random.default_rng(1)
    alphabet = ["a", "b", "c", " ", "é", "z", "\n", "😀"]
    for n in [0, 1, 2, 3, 5, 8, 13, 40] * 4:
        text = "".join(rng.choice(alphabet, size=n))
        ids = tok.encode(text)
        assert ids.tolist() == run_c_encode(pieces, scores, text), text
        assert tok.decode(ids) == text                  # the dummy prefix after <s> is dropped, as run.c prints
        assert tok.decode(ids[1:]) == (" " + text if text else "")
    assert tok.encode("z").tolist() == [1, 259, ord("z") + 3] and tok.decode([ord("z") + 3]) == "z"
    back = PieceTokenizer.from_dict(tok.to_dict())
    assert back.pieces == tok.pieces and np.array_equal(back.scores, tok.scores)


LLAMA2C_TOKENIZER = os.environ.get("TINYLM_LLAMA2C_TOKENIZER")   # llama2.c's own tokenizer.bin


@pytest.mark.skipif(not LLAMA2C_TOKENIZER, reason="TINYLM_LLAMA2C_TOKENIZER does not name llama2.c's tokenizer.bin")
def test_llama2cs_own_tokenizer_encodes_its_test_prompts():
    """The ids llama2.c's test.c expects for two of Llama 2's example prompts."""
    tok = PieceTokenizer(*read_tokenizer_bin(LLAMA2C_TOKENIZER, 32000))
    assert tok.encode("I believe the meaning of life is").tolist() == [1, 306, 4658, 278, 6593, 310, 2834, 338]
    assert tok.encode("Simply put, the theory of relativity states that ").tolist() == [
        1, 3439, 17632, 1925, 29892, 278, 6368, 310, 14215, 537, 5922, 393, 29871]


def piece_model(tmp_path):
    """A tiny Llama over piece_vocabulary, written as model.bin + tokenizer.bin (as a TinyStories model is)."""
    pieces, scores = piece_vocabulary()
    config = llama.LlamaConfig(block_size=16, vocab_size=len(pieces), n_layer=1, n_head=2, n_embd=8,
                               tie_embeddings=True).validate()
    params = llama.init_params(config, seed=5)
    folder = tmp_path / "stories"
    folder.mkdir()
    with open(folder / "model.bin", "wb") as f:
        write_model_bin(f, params, config)
    with open(folder / "tok.bin", "wb") as f:
        write_tokenizer_bin(f, pieces, scores)
    return folder, params, config


def test_a_piece_model_reads_back_with_its_tokenizer(tmp_path):
    folder, params, config = piece_model(tmp_path)
    back = load_any(str(folder / "model.bin"), tokenizer_bin=str(folder / "tok.bin"))
    assert isinstance(back["tokenizer"], PieceTokenizer) and back["config"] == config
    assert all(np.array_equal(back["params"][k], v) for k, v in params.items()) and set(back["params"]) == set(params)
    export_llama2c(back, str(tmp_path / "again"))                       # written back as it came
    assert (tmp_path / "again" / "model.bin").read_bytes() == (folder / "model.bin").read_bytes()
    assert (tmp_path / "again" / "tokenizer.bin").read_bytes() == (folder / "tok.bin").read_bytes()


# ----------------------------------------------------------------------------- command lines


def test_export_command_writes_both_files_and_refuses_gpt2(tmp_path, capsys):
    model = make()
    save_checkpoint(str(tmp_path / "l.npz"), model["params"], model["config"], model["tokenizer"])
    assert export_main([str(tmp_path / "l.npz"), str(tmp_path / "out"), "--format", "llama2c"]) == 0
    out = capsys.readouterr().out
    assert "model.bin, tokenizer.bin" in out and "-z" in out
    assert np.array_equal(load_llama2c(str(tmp_path / "out" / "model.bin"))["params"]["model.norm.weight"],
                          model["params"]["model.norm.weight"])
    config = GPTConfig(block_size=8, vocab_size=len(CHARS), n_layer=1, n_head=2, n_embd=8)
    save_checkpoint(str(tmp_path / "g.npz"), gpt2_init(config), config, CharTokenizer(CHARS))
    assert export_main([str(tmp_path / "g.npz"), str(tmp_path / "g"), "--format", "llama2c"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--format hf" in err[0] and not (tmp_path / "g").exists()
    assert export_main([str(tmp_path / "l.npz"), str(tmp_path / "h"), "--format", "llama2c", "--dtype", "float16"]) == 1
    assert "float32" in capsys.readouterr().err and not (tmp_path / "h").exists()


def test_sample_and_finetune_from_a_model_bin(trained_llama, tmp_path):
    ckpt, folder = trained_llama
    args = ("--start", "To be", "--num_samples", 1, "--max_new_tokens", 30, "--temperature", 0)
    from_bin = run_script("sample.py", "--init_from", folder / "model.bin", *args)
    from_ckpt = run_script("sample.py", "--init_from", ckpt, *args)
    assert from_bin.returncode == 0, from_bin.stderr
    assert from_bin.stdout == from_ckpt.stdout and from_bin.stdout.startswith("To be")
    data = tmp_path / "d.txt"
    data.write_text("To be, or not to be: that is the matter.\n" * 20)
    train(TrainArgs(init_from=str(folder / "model.bin"), data=str(data), out_dir=str(tmp_path / "ft"),
                    batch_size=2, max_iters=2, eval_interval=2, eval_iters=1, sample_tokens=0, progress=False),
          explicit=("init_from", "data", "out_dir"), log=lambda *a: None)
    tuned = load_any(str(tmp_path / "ft" / "ckpt.npz"))
    assert tuned["tokenizer"].chars == CHARS and tuned["config"].n_kv_head == 2
    with pytest.raises(TinyLMError, match="--tokenizer_bin goes with --init_from a llama2.c model.bin"):
        train(TrainArgs(init_from=str(ckpt), tokenizer_bin=str(folder / "tokenizer.bin"), data=str(data),
                        out_dir=str(tmp_path / "ft2")), explicit=("init_from", "tokenizer_bin"), log=lambda *a: None)
    assert not (tmp_path / "ft2").exists()


def test_sample_prints_text_from_a_piece_model(tmp_path):
    folder, _, _ = piece_model(tmp_path)
    proc = run_script("sample.py", "--init_from", folder / "model.bin", "--tokenizer_bin", folder / "tok.bin",
                      "--start", "ab", "--num_samples", 1, "--max_new_tokens", 12, "--temperature", 0)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ab") and len(proc.stdout) > len("ab")
    proc = run_script("sample.py", "--init_from", folder / "model.bin")
    assert proc.returncode == 1 and "--tokenizer_bin" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_finetuning_a_piece_model_keeps_its_tokenizer(tmp_path):
    folder, _, config = piece_model(tmp_path)
    data = tmp_path / "d.txt"
    data.write_text("abc cab aa bc é\n" * 40)
    train(TrainArgs(init_from=str(folder / "model.bin"), tokenizer_bin=str(folder / "tok.bin"), data=str(data),
                    out_dir=str(tmp_path / "ft"), batch_size=2, max_iters=2, eval_interval=2, eval_iters=1,
                    sample_tokens=0, progress=False), explicit=("init_from", "data", "out_dir"), log=lambda *a: None)
    tuned = load_any(str(tmp_path / "ft" / "ckpt.npz"))
    assert isinstance(tuned["tokenizer"], PieceTokenizer) and tuned["config"] == config
    assert tuned["tokenizer"].pieces == piece_vocabulary()[0]


@pytest.fixture
def trained_llama(tmp_path):
    model = make()
    path = tmp_path / "l.npz"
    save_checkpoint(str(path), model["params"], model["config"], model["tokenizer"])
    export_llama2c(model, str(tmp_path / "bin"))
    return path, tmp_path / "bin"


RUN_C = os.environ.get("TINYLM_RUN_C")


@pytest.mark.skipif(not RUN_C, reason="TINYLM_RUN_C does not name a built llama2.c run binary")
def test_run_c_binary_greedy_text_is_tinylms(trained_llama):
    """run.c feeds <s> (read as '\\n') then ' ' then the prompt; tinylm is given '\\n ' + the prompt. Of run.c's 16
    positions, 6 read the 7 prompt tokens (their text printed, the space after <s> dropped), 10 draw new ones."""
    ckpt, folder = trained_llama
    ours = run_script("sample.py", "--init_from", ckpt, "--start", "\n To be", "--num_samples", 1,
                      "--max_new_tokens", 10, "--temperature", 0)
    theirs = subprocess.run([RUN_C, str(folder / "model.bin"), "-z", str(folder / "tokenizer.bin"), "-t", "0",
                             "-n", "16", "-i", "To be"], capture_output=True, text=True, timeout=60)
    assert theirs.returncode == 0, theirs.stderr
    assert theirs.stdout[:-1] == ours.stdout.split("\n---------------\n")[0][2:]
