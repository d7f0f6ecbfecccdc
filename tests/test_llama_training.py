"""train.py --arch llama end to end: the loss falls, the checkpoint holds a LlamaConfig under Hugging Face's names
and loads back by its arch field, a run killed with SIGKILL resumes bit for bit (dropout, AdamW and Muon), Muon
steps the seven block matrices of each layer, and every bad setting is one line naming its flag, with nothing
written."""
import json
import math
import os
import signal

import numpy as np
import pytest

from conftest import llama_args, run_script
from test_distributed import TINY, assert_same_run, mpiexec, one_and_two_ranks  # noqa: F401 (a fixture)
from test_reliability_process import flags, same_state, start, wait_for_line
from tinylm.core import llama
from tinylm.core.muon import muon_init, muon_names
from tinylm.fast import llama as fast
from tinylm.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinylm.text.char import CharTokenizer
from tinylm.train.args import TrainArgs
from tinylm.train.loop import train

QUIET = lambda *a: None          # noqa: E731



@pytest.fixture(scope="module")
def llama_run(shakespeare_head, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama")
    summary = train(llama_args(shakespeare_head, out, 150, batch_size=8, eval_interval=50, sample_tokens=40), log=QUIET)
    return {"dir": str(out), "summary": summary}


def test_a_llama_learns_and_its_checkpoint_is_a_llama(llama_run):
    lines = [json.loads(l) for l in open(os.path.join(llama_run["dir"], "metrics.jsonl"))]
    ckpt = load_checkpoint(os.path.join(llama_run["dir"], "ckpt.npz"))
    config = ckpt["config"]
    assert isinstance(config, llama.LlamaConfig) and config.arch == "llama"
    assert (config.n_kv_head, config.ffn_hidden, config.rope_theta, config.tie_embeddings) == (2, 96, 10000.0, False)
    assert list(ckpt["params"]) == list(llama.param_shapes(config))
    assert "lm_head.weight" in ckpt["params"] and "model.layers.1.self_attn.k_proj.weight" in ckpt["params"]
    assert ckpt["meta"]["config"]["arch"] == "llama" and ckpt["meta"]["train_args"]["arch"] == "llama"
    assert abs(lines[0]["val_loss"] - math.log(config.vocab_size)) < 0.3
    assert lines[-1]["val_loss"] < lines[0]["val_loss"] - 1.0
    assert isinstance(llama_run["summary"]["sample"], str) and llama_run["summary"]["sample"]


def test_the_checkpoint_round_trips_to_the_same_logits(llama_run, tmp_path):
    ckpt = load_checkpoint(os.path.join(llama_run["dir"], "ckpt.npz"))
    idx = np.random.default_rng(0).integers(0, ckpt["config"].vocab_size, size=(2, 16))
    before = fast.forward(ckpt["params"], ckpt["config"], idx)[0]
    path = str(tmp_path / "copy.npz")
    save_checkpoint(path, ckpt["params"], ckpt["config"], ckpt["tokenizer"], ckpt["opt_state"], {"step": 1})
    again = load_checkpoint(path)
    assert again["config"] == ckpt["config"]
    assert np.array_equal(before, fast.forward(again["params"], again["config"], idx)[0])


def test_a_tied_llama_stores_its_head_once(shakespeare_head, tmp_path):
    train(llama_args(shakespeare_head, tmp_path, 4, tie_embeddings=True), log=QUIET)
    ckpt = load_checkpoint(str(tmp_path / "ckpt.npz"))
    assert ckpt["config"].tie_embeddings and "lm_head.weight" not in ckpt["params"]


def test_muon_steps_the_seven_matrices_of_each_layer_and_adamw_the_rest():
    config = llama.LlamaConfig(block_size=8, vocab_size=11, n_layer=2, n_head=4, n_kv_head=2, n_embd=16)
    params = llama.init_params(config)
    state = muon_init(params, llama.is_block_matrix)
    stepped = {k.split(".", 3)[3] for k in state["momentum"]}
    assert stepped == {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                       "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                       "mlp.down_proj.weight"}
    assert len(state["momentum"]) == 7 * config.n_layer == len(muon_names(params, llama.is_block_matrix))
    assert set(state["m"]) == {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    with pytest.raises(ValueError):            # GPT-2's rule finds no block matrix in a Llama: never silently AdamW
        muon_init(params)


def cli_flags(data, out, max_iters, **kw):
    return flags(data, out, max_iters, arch="llama", n_head=4, n_kv_head=2, **kw)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_sigkill_then_resume_is_bit_exact(shakespeare_head, tmp_path, optimizer):
    """Kill -9 while a checkpoint is written; the resumed run (dropout on) ends bit for bit where an
    uninterrupted one does: weights, moments (and Muon's momentum), random states."""
    n = 12
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    reference = start(cli_flags(shakespeare_head, ref, n, optimizer=optimizer))
    proc = start(cli_flags(shakespeare_head, out, n, optimizer=optimizer), slow_save=0.15)
    assert wait_for_line(proc, "saving ckpt.npz", 2)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    first = load_checkpoint(os.path.join(out, "ckpt.npz"))
    assert first["config"].arch == "llama" and first["meta"]["step"] in (0, 3)
    proc = start(["--out_dir", out, "--init_from", "resume", "--progress", "false"])    # all from the file
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert reference.wait(timeout=120) == 0, reference.stderr.read()
    a, b = load_checkpoint(os.path.join(out, "ckpt.npz")), load_checkpoint(os.path.join(ref, "ckpt.npz"))
    assert a["meta"]["step"] == n and a["meta"]["optimizer"] == optimizer
    assert ("momentum" in a["opt_state"]) == (optimizer == "muon")
    same_state(a, b)


def one_line_refusal(proc, words):
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


@pytest.mark.parametrize("bad, words", [
    (["--n_kv_head", "3"], ["--n_head (4) must be divisible by --n_kv_head (3)"]),
    (["--n_kv_head", "0"], ["--n_kv_head must be a positive integer"]),
    (["--n_embd", "12", "--n_head", "4", "--n_kv_head", "4"], ["--n_embd / --n_head", "even"]),
    (["--rope_theta", "0"], ["--rope_theta must be a positive finite number"]),
    (["--rope_theta", "-5"], ["--rope_theta"]),
    (["--rope_theta", "nan"], ["--rope_theta"]),
    (["--rope_theta", "inf"], ["--rope_theta"]),
    (["--ffn_hidden", "0"], ["--ffn_hidden must be a positive integer"]),
    (["--ffn_hidden", "-3"], ["--ffn_hidden"]),
    (["--bias", "true"], ["--bias", "no biases"]),
    (["--arch", "mamba"], ["--arch must be one of gpt2, llama"]),
])
def test_bad_settings_are_one_line_naming_the_flag_and_write_nothing(shakespeare_head, tmp_path, bad, words):
    out = tmp_path / "never"
    proc = run_script("train.py", *cli_flags(shakespeare_head, out, 3), *bad)
    one_line_refusal(proc, words)
    assert not out.exists()


def test_resuming_with_the_other_arch_is_refused_and_changes_nothing(shakespeare_head, tmp_path):
    gpt, lla = tmp_path / "gpt2", tmp_path / "llama"
    assert run_script("train.py", *flags(shakespeare_head, gpt, 3)).returncode == 0
    assert run_script("train.py", *cli_flags(shakespeare_head, lla, 3)).returncode == 0
    for out, other, saved in ((gpt, "llama", "gpt2"), (lla, "gpt2", "llama")):
        before = {f: open(out / f, "rb").read() for f in os.listdir(out)}
        proc = run_script("train.py", "--out_dir", out, "--init_from", "resume", "--arch", other)
        one_line_refusal(proc, [f"--arch {other} differs from the resumed checkpoint's {saved}"])
        assert {f: open(out / f, "rb").read() for f in os.listdir(out)} == before
    proc = run_script("train.py", "--out_dir", lla, "--init_from", "resume", "--n_kv_head", "4")
    one_line_refusal(proc, ["--n_kv_head 4 differs from the resumed checkpoint's 2"])


def test_flags_the_arch_does_not_use_are_named(shakespeare_head, tmp_path):
    notes = []
    train(TrainArgs(data=shakespeare_head, out_dir=str(tmp_path / "g"), n_layer=1, n_head=2, n_embd=16,
                    block_size=16, batch_size=2, max_iters=1, eval_iters=1, sample_tokens=0, progress=False,
                    rope_theta=500.0), explicit=("rope_theta",), log=notes.append)
    assert "note: --rope_theta only applies with --arch llama; this run is gpt2" in notes
    notes = []
    train(llama_args(shakespeare_head, tmp_path / "l", 1, bias=False), explicit=("arch", "bias"), log=notes.append)
    assert "note: --bias only applies with --arch gpt2; a Llama has no biases" in notes


def test_fine_tuning_a_llama_keeps_its_arch(llama_run, shakespeare_head, tmp_path):
    source = os.path.join(llama_run["dir"], "ckpt.npz")
    summary = train(TrainArgs(data=shakespeare_head, out_dir=str(tmp_path / "ft"), init_from=source, max_iters=3,
                              eval_iters=2, batch_size=4, sample_tokens=5, progress=False),
                    explicit=("init_from",), log=QUIET)
    ckpt = load_checkpoint(summary["checkpoint"])
    assert ckpt["config"] == load_checkpoint(source)["config"] and ckpt["meta"]["train_args"]["arch"] == "llama"
    proc = run_script("train.py", "--init_from", source, "--data", shakespeare_head, "--out_dir", tmp_path / "x",
                      "--arch", "gpt2", "--max_iters", "1")
    one_line_refusal(proc, ["--arch gpt2 differs from --init_from's llama"])
    proc = run_script("train.py", "--init_from", source, "--data", shakespeare_head, "--out_dir", tmp_path / "y",
                      "--lora_rank", "2", "--lora_targets", "v_proj", "--max_iters", "1")
    assert proc.returncode == 0, proc.stderr                 # adapters on a Llama: tests/test_lowrank_llama.py
    assert load_checkpoint(str(tmp_path / "y" / "ckpt.npz"), merge_adapters=False)["meta"]["lora"]["targets"] == [
        "model.layers.0.self_attn.v_proj.weight", "model.layers.1.self_attn.v_proj.weight"]


def test_a_checkpoint_without_an_arch_field_is_gpt2(tmp_path):
    from tinylm.core import gpt2
    config = gpt2.GPTConfig(block_size=8, vocab_size=3, n_layer=1, n_head=2, n_embd=8)
    path = str(tmp_path / "g.npz")
    save_checkpoint(path, gpt2.init_params(config), config, CharTokenizer("abc"), None, {})
    ckpt = load_checkpoint(path)
    assert "arch" not in ckpt["meta"]["config"] and ckpt["config"] == config


def test_sample_py_samples_a_llama_with_and_without_the_cache_and_side_by_side(llama_run):
    """Within the first block the cache changes nothing: greedy text with and without it is the same."""
    texts = {}
    for extra in ([], ["--no_cache"]):
        for n in ("1", "3"):
            proc = run_script("sample.py", "--out_dir", llama_run["dir"], "--max_new_tokens", "12", "--num_samples", n,
                              "--temperature", "0", "--start", "ab", *extra)
            assert proc.returncode == 0, proc.stderr
            samples = proc.stdout.split("\n---------------\n")[:-1]
            assert len(samples) == int(n) and all(s.startswith("ab") and len(s) > 2 for s in samples)
            texts[tuple(extra), n] = samples
    assert len({s for group in texts.values() for s in group}) == 1          # greedy: one text, every way
    proc = run_script("sample.py", "--init_from", os.path.join(llama_run["dir"], "best.npz"), "--max_new_tokens", "40")
    assert proc.returncode == 0, proc.stderr


def test_what_reads_only_gpt2_says_so_in_one_line(llama_run, tmp_path):
    ckpt = os.path.join(llama_run["dir"], "ckpt.npz")
    proc = run_script("tinylm/export.py", ckpt, tmp_path / "hf")       # the export writes a Llama folder (issue 28)
    assert proc.returncode == 0 and "tokenizer.json" in proc.stdout, proc.stderr


def test_a_llama_checkpoint_claiming_more_layers_than_it_holds_is_one_line(llama_run, tmp_path):
    for tie in (False, True):
        for n_layer in (1, 3):
            config = llama.LlamaConfig(n_layer=n_layer, tie_embeddings=tie)
            assert llama.count_tensors(config) == len(llama.param_shapes(config))
    with np.load(os.path.join(llama_run["dir"], "ckpt.npz"), allow_pickle=False) as f:
        arrays = dict(f)
    meta = json.loads(arrays["meta.json"].tobytes())
    meta["config"]["n_layer"] = 10 ** 8
    arrays["meta.json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = str(tmp_path / "claims.npz")
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "implies" in str(e.value) and "100,000,000" in str(e.value)


def test_two_mpi_ranks_train_a_llama_as_one_process_does(mpiexec, shakespeare_head, tmp_path):
    """mpiexec -n 2 python train.py --arch llama: the ranks build the Llama from rank 0's config (by its arch) and
    give one process's losses and weights, up to float32 summation order (as tests/test_distributed.py holds
    for GPT-2), with Muon."""
    common = ["--data", shakespeare_head, "--eval_interval", "4", "--max_iters", "8", *TINY, "--arch", "llama",
              "--n_kv_head", "1", "--optimizer", "muon"]
    a, b = one_and_two_ranks(mpiexec, tmp_path, *common)
    assert b[1]["config"].arch == "llama" and "momentum" in b[1]["opt_state"]
    assert_same_run(a, b)
