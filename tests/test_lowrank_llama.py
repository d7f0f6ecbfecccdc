"""Low rank on a Llama: factorized layers (python -m tinylm.compress) and adapters (LoRA, PiSSA) on any of its seven
block matrices. The fast Llama on factors or adapters equals core's dense Llama on the matrices they stand for
(float64, logits, loss, every gradient by the chain rule) and passes finite differences; compression's calibration
pass is core's forward, its whitening and refit do what they promise; and end to end, a trained Llama compresses,
samples, fine-tunes, takes LoRA and PiSSA adapters, resumes them bit for bit and merges them."""
import shutil

import numpy as np
import pytest

from conftest import llama_args, run_script
from test_distributed import assert_same_run, mpiexec, one_and_two_ranks  # noqa: F401 (a fixture)
from tinylm.cli import gradcheck
from tinylm.core import llama as core
from tinylm.core.muon import muon_init
from tinylm.fast import llama as fast
from tinylm.fast import llama_decode as LD
from tinylm.io.checkpoint import load_checkpoint, save_checkpoint
from tinylm.lowrank import adapters as AD
from tinylm.lowrank import compress as CP
from tinylm.lowrank.factorized import dense_params, factor_params, ranks_of
from tinylm.text.char import CharTokenizer
from tinylm.train.loop import train

TOL = 1e-10
SEVEN = AD.LLAMA_BLOCK_MATRICES
QUIET = lambda *a: None          # noqa: E731


def config_of(n_embd=32, block_size=8, vocab_size=11, tie=False):
    return core.LlamaConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                            n_embd=n_embd, ffn_hidden=48, tie_embeddings=tie)


def perturbed_params(config, seed=0, scale=0.1):
    rng = np.random.default_rng(seed)
    return {k: v + scale * rng.standard_normal(v.shape) for k, v in core.init_params(config, seed, np.float64).items()}


def batch(config, B=3, seed=1):
    rng = np.random.default_rng(seed)
    shape = (B, config.block_size)
    return rng.integers(0, config.vocab_size, size=shape), rng.integers(0, config.vocab_size, size=shape)


def rel_error(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def assert_fast_equals_core(fast_params, config, dense, expected_grads):
    idx, targets = batch(config)
    logits, loss, cache = fast.forward(fast_params, config, idx, targets)
    grads = fast.backward(fast_params, config, cache)
    core_logits, core_loss, _ = core.forward(dense, config, idx, targets)
    assert rel_error(logits, core_logits) < TOL and abs(loss - core_loss) < TOL * abs(core_loss)
    assert set(grads) == set(expected_grads)
    for k in expected_grads:
        assert rel_error(grads[k], expected_grads[k]) < TOL, k


def core_grads(params, config):
    idx, targets = batch(config)
    return core.backward(params, config, core.forward(params, config, idx, targets)[2])


# The groups run apart or stacked: all of layer 0's q, k, v factorized, only gate_proj of layer 1's gate and up
# (so its up_proj, dense, runs beside it, not stacked); o_proj and down_proj alone.
FACTORED = ["model.layers.0." + n for n in SEVEN] + ["model.layers.1.mlp.gate_proj", "model.layers.1.self_attn.k_proj"]


def test_fast_factorized_llama_equals_core_on_the_product():
    """name.weight_A A (out, r), name.weight_B B (r, in): core runs on W = A B, and the chain rule through W gives
    dA = dW Bᵀ, dB = Aᵀ dW; every other gradient is core's."""
    config = config_of()
    rng = np.random.default_rng(4)
    dense = perturbed_params(config, seed=4)
    factored = dict(dense)
    for name in FACTORED:
        out, inp = dense[name + ".weight"].shape
        A, B = 0.3 * rng.standard_normal((out, 3)), 0.3 * rng.standard_normal((3, inp))
        factored = factor_params(factored, name, A, B)
        dense[name + ".weight"] = A @ B
    grads = core_grads(dense, config)
    expected = {k: v for k, v in grads.items() if k[:-len(".weight")] not in FACTORED}
    for name in FACTORED:
        dW = grads[name + ".weight"]
        expected[name + ".weight_A"] = dW @ factored[name + ".weight_B"].T
        expected[name + ".weight_B"] = factored[name + ".weight_A"].T @ dW
    assert_fast_equals_core(factored, config, dense, expected)
    assert ranks_of(factored) == {n: 3 for n in FACTORED}


@pytest.mark.parametrize("tie", [False, True])
def test_fast_lora_llama_equals_core_on_the_merged_weight(tie):
    """adapter_params (frozen W, lora_A = A, lora_B = s·B) on all seven matrices of layer 0 and two of layer 1:
    core on W + s·B A; d lora_A = (s·B)ᵀ dW, d lora_B = dW Aᵀ; the frozen W gets no gradient."""
    config = config_of(tie=tie)
    shapes = core.param_shapes(config)
    targets = AD.resolve_targets("model.layers.0.self_attn.q_proj.weight,layers.0.self_attn.k_proj,"
                                 "model.layers.0.self_attn.v_proj,up_proj,o_proj", shapes)
    targets = sorted(set(targets) | {"model.layers.0." + n + ".weight" for n in SEVEN}, key=list(shapes).index)
    lora = {"rank": 2, "alpha": 3.0, "targets": targets, "init": "lora"}
    frozen, adapters = AD.init_adapters(perturbed_params(config, seed=6), lora, seed=6)
    rng = np.random.default_rng(6)
    for k in adapters:
        if k.endswith(".lora_B"):                       # B = 0 at init would hide every error on B's side
            adapters[k] = 0.3 * rng.standard_normal(adapters[k].shape)
    merged = AD.merged_params(frozen, adapters, lora)
    grads = core_grads(merged, config)
    s = AD.scale_of(lora)
    expected = {k: v for k, v in grads.items() if k not in targets}
    for name in targets:
        a, b = AD.adapter_names(name)
        expected[a] = (s * adapters[b]).T @ grads[name]
        expected[b] = grads[name] @ adapters[a].T
    assert_fast_equals_core(AD.adapter_params(frozen, adapters, lora), config, merged, expected)


def test_factorized_and_adapted_llama_gradients_pass_finite_differences():
    """The whole fast Llama's gradient against central differences (the package's own checker, cli/gradcheck.py):
    factors of rank 3 in all seven of layer 0 and three of layer 1; then LoRA and PiSSA adapters on all 14."""
    config = core.LlamaConfig(block_size=4, vocab_size=7, n_layer=2, n_head=4, n_kv_head=2, n_embd=8, ffn_hidden=12)
    ranks = {f"model.layers.0.{n}": 3 for n in SEVEN}
    ranks.update({f"model.layers.1.{n}": 2 for n in ("self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")})
    results = gradcheck.model_check(config, seed=1, ranks=ranks, max_entries=12)
    names = [name for name, _ in results]
    assert "model.layers.0.self_attn.q_proj.weight_A" in names and "model.layers.1.mlp.up_proj.weight_B" in names
    assert max(err for _, err in results) < 1e-6, results
    for init in ("lora", "pissa"):
        results = gradcheck.adapter_check(config, init, seed=2, max_entries=12)
        assert len(results) == 2 * 7 * 2 and max(err for _, err in results) < 1e-6, results


def test_lora_targets_name_the_llamas_seven_matrices():
    shapes = core.param_shapes(config_of())
    everything = AD.resolve_targets("all", shapes)
    assert everything == [f"model.layers.{i}.{n}.weight" for i in range(2) for n in SEVEN]
    assert AD.resolve_targets("q_proj", shapes) == ["model.layers.0.self_attn.q_proj.weight",
                                                    "model.layers.1.self_attn.q_proj.weight"]
    assert AD.resolve_targets("mlp.down_proj, model.layers.1.self_attn.v_proj.weight", shapes) == [
        "model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(AD.AdapterError) as e:
        AD.resolve_targets("c_attn", shapes)            # GPT-2's names name nothing in a Llama
    assert "q_proj" in str(e.value) and "gate_proj" in str(e.value) and "c_fc" not in str(e.value)


def test_pissa_starts_at_the_base_model():
    """PiSSA's frozen residual W − s·B A plus its adapters is W again: the same logits to float precision."""
    config = config_of()
    params = {k: v.astype(np.float32) for k, v in perturbed_params(config, seed=8).items()}
    lora = {"rank": 4, "alpha": 2.0, "targets": AD.resolve_targets("all", core.param_shapes(config)), "init": "pissa"}
    frozen, adapters = AD.init_adapters(params, lora, seed=0)
    for name in lora["targets"]:                         # the adapters hold the top singular directions
        a, b = AD.adapter_names(name)
        assert np.linalg.norm(adapters[b] @ adapters[a]) > 0.5 * np.linalg.norm(frozen[name])
    idx = batch(config)[0]
    base = fast.forward(params, config, idx)[0]
    adapted = fast.forward(AD.adapter_params(frozen, adapters, lora), config, idx)[0]
    assert rel_error(adapted, base) < 1e-5


# ----------------------------------------------------------------------------- compression


def calibration(config, n=6, seed=3):
    return np.random.default_rng(seed).integers(0, config.vocab_size, size=(n, config.block_size))


def test_calibration_inputs_are_core_forwards_inputs_to_each_matrix():
    """layer_inputs on a Llama hands each of the seven matrices what core's forward feeds it (its linear cache's x)."""
    config = config_of()
    params = perturbed_params(config, seed=2)
    idx = calibration(config)
    _, _, cache = core.forward(params, config, idx)
    seen = list(CP.layer_inputs(params, config, idx))
    assert [name for name, _ in seen] == CP.layer_names(config)
    assert len(seen) == 14
    for name, x in seen:
        i, short = int(name.split(".")[2]), name.split(".", 3)[3]
        expected = cache["blocks"][i][short][0]
        assert np.allclose(x, expected.reshape(x.shape), rtol=0, atol=1e-12), name


def test_compression_at_full_rank_is_the_model_and_whitening_beats_plain_svd_on_the_data():
    config = config_of(n_embd=32, block_size=16)
    params = perturbed_params(config, seed=5)
    idx = calibration(config, n=8)
    full = CP.ranks_for(config, ("fraction", 1.0))
    assert set(full) == set(CP.layer_names(config)) and full["model.layers.0.self_attn.k_proj"] == 16
    new, _ = CP.compress_model(params, config, full, "svd")
    assert rel_error(fast.forward(new, config, idx)[0], core.forward(params, config, idx)[0]) < 1e-9
    ranks = CP.ranks_for(config, params_fraction=0.5)
    assert max(r * sum(core.param_shapes(config)[n + ".weight"]) for n, r in ranks.items()) > 0
    errors = {}
    for method in ("svd", "whitened"):
        new, info = CP.compress_model(params, config, ranks, method, calib=idx)
        assert set(ranks_of(new)) == set(ranks) and info["kept"] <= 0.5 * info["dense"]
        grams = CP.collect_grams(params, config, idx)
        errors[method] = {n: float(np.sum(((params[n + ".weight"] - new[n + ".weight_A"] @ new[n + ".weight_B"])
                                           @ grams[n]) * (params[n + ".weight"] - new[n + ".weight_A"]
                                                          @ new[n + ".weight_B"]))) for n in ranks}
    # layer 0's inputs do not depend on the other layers' compression: whitened is the best rank r on them
    for n in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        assert errors["whitened"][n] < errors["svd"][n]
    new, info = CP.compress_model(params, config, ranks, "whitened", calib=idx, refit_factors=True)
    assert set(info["refit"]) == set(ranks)
    assert all(after <= before + 1e-9 for before, after in info["refit"].values())


def test_a_compressed_llama_saves_loads_muon_steps_its_factors_and_samples_with_and_without_the_cache(tmp_path):
    config = config_of(vocab_size=5, block_size=8)
    params = {k: v.astype(np.float32) for k, v in perturbed_params(config, seed=9).items()}
    new, _ = CP.compress_model(params, config, CP.ranks_for(config, ("rank", 3)), "svd")
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, new, config, CharTokenizer("abcde"), None, {"step": 0})
    back = load_checkpoint(path)
    assert back["config"] == config and back["meta"]["lowrank"] == {n: 3 for n in CP.layer_names(config)}
    assert all(np.array_equal(back["params"][k], new[k]) for k in new)
    state = muon_init(new, core.is_block_matrix)         # Muon takes the factors, AdamW the rest
    assert len(state["momentum"]) == 2 * 7 * 2 and all(k.endswith(("weight_A", "weight_B")) for k in state["momentum"])
    tokens = {}
    for use_cache in (True, False):
        tokens[use_cache] = list(LD.generate(new, config, [1, 2], 6, lambda z: int(np.argmax(z)), use_cache))
    dense = dense_params(new)
    expected = list(core.generate(dense, config, [1, 2], 6, lambda z: int(np.argmax(z))))
    assert tokens[True] == tokens[False] == expected
    qkv, o, gate_up, down = LD.decoding_weights(new, config)["layers"][0]   # the thin products, not A B
    assert type(qkv) is list and [M[0].shape[1] for M in qkv] == [3, 3, 3] and type(o) is tuple


def test_cached_steps_of_a_partly_factorized_llama_are_cores_forward_on_the_products():
    """FACTORED leaves layer 1's up_proj dense beside a factorized gate_proj, and its q_proj, v_proj beside a
    factorized k_proj: each cached step's logits equal core's forward over the tokens so far, in float64."""
    config = config_of()
    rng = np.random.default_rng(12)
    params = perturbed_params(config, seed=12)
    for name in FACTORED:
        out, inp = params[name + ".weight"].shape
        params = factor_params(params, name, 0.3 * rng.standard_normal((out, 3)), 0.3 * rng.standard_normal((3, inp)))
    trace = []
    list(LD.generate(params, config, [3, 1], 6, lambda z: int(np.argmax(z)), True, trace))
    dense = dense_params(params)
    for context, logits in trace:
        assert rel_error(logits, core.forward(dense, config, np.array([context]))[0][0, -1]) < 1e-9


# ----------------------------------------------------------------------------- end to end



@pytest.fixture(scope="module")
def base_llama(shakespeare_head, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama_base")
    train(llama_args(shakespeare_head, out, 60, batch_size=8, eval_interval=30), log=QUIET)
    return str(out / "ckpt.npz")


def test_compress_cli_on_a_llama_then_sample_and_fine_tune_its_factors(base_llama, shakespeare_head, tmp_path):
    for method in ("svd", "whitened"):
        out = tmp_path / f"{method}.npz"
        proc = run_script("tinylm/compress.py", base_llama, out, "--params", "0.5", "--method", method,
                          "--calib", shakespeare_head, "--calib_tokens", "2048", "--eval_tokens", "2048",
                          "--no_progress")
        assert proc.returncode == 0, proc.stderr
        assert "validation loss on" in proc.stdout and ("refit model.layers.1.mlp.down_proj" in proc.stdout) == (
            method == "whitened"), proc.stdout
        ckpt = load_checkpoint(str(out))
        assert set(ckpt["meta"]["lowrank"]) == {f"model.layers.{i}.{n}" for i in range(2) for n in SEVEN}
    proc = run_script("sample.py", "--init_from", out, "--max_new_tokens", "20", "--num_samples", "2")
    assert proc.returncode == 0 and len(proc.stdout) > 20, proc.stderr
    folder = tmp_path / "tune"
    folder.mkdir()
    shutil.copy(out, folder / "ckpt.npz")
    proc = run_script("train.py", "--out_dir", folder, "--init_from", "resume", "--max_iters", "64",
                      "--eval_interval", "2", "--eval_iters", "1", "--progress", "false", "--sample_tokens", "0")
    assert proc.returncode == 0, proc.stderr
    tuned = load_checkpoint(str(folder / "ckpt.npz"))
    name = "model.layers.0.self_attn.q_proj.weight_A"
    assert tuned["meta"]["step"] == 64 and name in tuned["params"]    # the base's 60 steps, then 4
    assert not np.array_equal(tuned["params"][name], ckpt["params"][name])      # the factors trained


def test_sample_py_rank_compresses_a_llama_on_the_fly(base_llama):
    proc = run_script("sample.py", "--init_from", base_llama, "--rank", "0.5", "--max_new_tokens", "20",
                      "--num_samples", "1", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "compressed on the fly by truncated SVD: rank 8, 16" in proc.stderr
    plain = run_script("sample.py", "--init_from", base_llama, "--rank", "1.0", "--max_new_tokens", "20",
                       "--num_samples", "1", "--temperature", "0")
    same = run_script("sample.py", "--init_from", base_llama, "--max_new_tokens", "20", "--num_samples", "1",
                      "--temperature", "0")
    assert plain.stdout == same.stdout                   # full rank: the model itself


def test_pissa_on_a_llama_resumes_bit_for_bit_and_merges(base_llama, shakespeare_head, tmp_path):
    """--lora_targets q_proj,down_proj --lora_init pissa: only the adapters train; 6 steps in one go equal 3, then
    a resume to 6 (adapters, their moments); --merge writes a plain Llama whose W moved by s·B A."""
    common = dict(init_from=base_llama, lora_rank=2, lora_targets="q_proj,down_proj", lora_init="pissa",
                  dropout=0.1, eval_interval=3, lr_decay_iters=6)
    train(llama_args(shakespeare_head, tmp_path / "one", 6, **common), log=QUIET)
    train(llama_args(shakespeare_head, tmp_path / "two", 3, **common), log=QUIET)
    train(llama_args(shakespeare_head, tmp_path / "two", 6, init_from="resume", merge=True),
          explicit=("init_from", "out_dir", "max_iters", "merge"), log=QUIET)     # the rest from the checkpoint
    a = load_checkpoint(str(tmp_path / "one" / "ckpt.npz"), merge_adapters=False)
    b = load_checkpoint(str(tmp_path / "two" / "ckpt.npz"), merge_adapters=False)
    assert a["meta"]["lora"]["targets"] == [f"model.layers.{i}.{n}.weight" for i in range(2)
                                            for n in ("self_attn.q_proj", "mlp.down_proj")]
    assert set(a["adapters"]) == {AD.adapter_names(t)[j] for t in a["meta"]["lora"]["targets"] for j in (0, 1)}
    for k in a["adapters"]:
        assert np.array_equal(a["adapters"][k], b["adapters"][k]), k
    for k in a["opt_state"]["m"]:
        assert np.array_equal(a["opt_state"]["m"][k], b["opt_state"]["m"][k]), k
    base = load_checkpoint(base_llama)["params"]
    merged = load_checkpoint(str(tmp_path / "two" / "merged.npz"))
    assert "lora" not in merged["meta"] and set(merged["params"]) == set(base)
    moved = [k for k in base if not np.array_equal(merged["params"][k], base[k])]
    assert sorted(moved) == sorted(a["meta"]["lora"]["targets"])
    best = load_checkpoint(str(tmp_path / "two" / "best.npz"), merge_adapters=False)
    s = AD.scale_of(best["meta"]["lora"])
    name = "model.layers.1.mlp.down_proj.weight"
    A, B = (best["adapters"][n] for n in AD.adapter_names(name))
    assert np.allclose(merged["params"][name], best["params"][name] + s * B @ A, atol=1e-6)


def test_two_mpi_ranks_fine_tune_a_compressed_llama_with_muon_as_one_process_does(mpiexec, base_llama, shakespeare_head,
                                                                                   tmp_path):
    """Full fine-tuning of a compressed Llama (its factors by Muon, the rest by AdamW) under mpiexec -n 2: one
    process's losses and weights, up to float32 summation order (tests/test_distributed.py's rule)."""
    small = tmp_path / "small.npz"
    proc = run_script("tinylm/compress.py", base_llama, small, "--rank", "0.25", "--method", "svd",
                      "--eval_tokens", "0", "--no_progress")
    assert proc.returncode == 0, proc.stderr
    common = ["--init_from", small, "--data", shakespeare_head, "--max_iters", "6", "--eval_interval", "3", "--eval_iters", "2",
              "--batch_size", "8", "--optimizer", "muon", "--progress", "false", "--sample_tokens", "0"]
    a, b = one_and_two_ranks(mpiexec, tmp_path, *common)
    assert set(b[1]["opt_state"]["momentum"]) == {f"model.layers.{i}.{n}.weight_{f}" for i in range(2)
                                                  for n in SEVEN for f in "AB"}
    assert_same_run(a, b)
