"""End to end on real text: the loss falls, checkpoints round-trip, a resumed run continues the same trajectory."""
import json
import math
import os

import numpy as np
import pytest

from tinylm.fast import model as M
from tinylm.io.checkpoint import load_checkpoint
from tinylm.errors import TinyLMError
from tinylm.train.args import TrainArgs
from tinylm.train.loop import train


def test_short_run_lowers_the_loss_well_below_uniform(trained_dir):
    lines = [json.loads(l) for l in open(os.path.join(trained_dir["dir"], "metrics.jsonl"))]
    assert [r["step"] for r in lines] == [0, 100, 200, 300]
    vocab = load_checkpoint(os.path.join(trained_dir["dir"], "ckpt.npz"))["config"].vocab_size
    assert abs(lines[0]["val_loss"] - math.log(vocab)) < 0.3
    assert lines[-1]["val_loss"] < math.log(vocab) - 1.5     # ln 60 ≈ 4.1; a character model gets below 2.6
    assert trained_dir["summary"]["best_val_loss"] == min(r["val_loss"] for r in lines)


def test_checkpoint_round_trip_reproduces_logits_exactly(trained_dir, tmp_path):
    from tinylm.io.checkpoint import save_checkpoint
    ckpt = load_checkpoint(os.path.join(trained_dir["dir"], "ckpt.npz"))
    idx = np.random.default_rng(0).integers(0, ckpt["config"].vocab_size, size=(2, ckpt["config"].block_size))
    before, _, _ = M.forward(ckpt["params"], ckpt["config"], idx)
    path = str(tmp_path / "copy.npz")
    save_checkpoint(path, ckpt["params"], ckpt["config"], ckpt["tokenizer"], ckpt["opt_state"], {"step": 1})
    again = load_checkpoint(path)
    after, _, _ = M.forward(again["params"], again["config"], idx)
    assert np.array_equal(before, after)
    for k in ckpt["params"]:
        assert np.array_equal(ckpt["opt_state"]["m"][k], again["opt_state"]["m"][k])
        assert np.array_equal(ckpt["opt_state"]["v"][k], again["opt_state"]["v"][k])
    assert again["tokenizer"].to_dict() == ckpt["tokenizer"].to_dict()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]     # no temporary file left


def test_best_checkpoint_holds_the_best_weights_without_optimizer(trained_dir):
    best = load_checkpoint(os.path.join(trained_dir["dir"], "best.npz"))
    assert best["opt_state"] is None
    assert best["meta"]["best_val_loss"] == trained_dir["summary"]["best_val_loss"]


def _args(data, out, max_iters, **kw):
    base = dict(data=data, out_dir=str(out), n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4,
                max_iters=max_iters, lr_decay_iters=20, warmup_iters=3, eval_interval=5, eval_iters=2,
                dropout=0.1, sample_tokens=0, progress=False)
    base.update(kw)
    return TrainArgs(**base)


def test_resume_continues_the_same_trajectory_bit_for_bit(shakespeare_head, tmp_path):
    quiet = lambda *a: None
    train(_args(shakespeare_head, tmp_path / "one", 20), log=quiet)
    # the same run, stopped at step 12 (not an evaluation step) and resumed to 20
    train(_args(shakespeare_head, tmp_path / "two", 12), log=quiet)
    resumed = _args(shakespeare_head, tmp_path / "two", 20, init_from="resume")
    train(resumed, explicit=("max_iters", "init_from", "out_dir"), log=quiet)
    one = load_checkpoint(str(tmp_path / "one" / "ckpt.npz"))
    two = load_checkpoint(str(tmp_path / "two" / "ckpt.npz"))
    assert one["meta"]["step"] == two["meta"]["step"] == 20
    for k in one["params"]:
        assert np.array_equal(one["params"][k], two["params"][k]), k
        assert np.array_equal(one["opt_state"]["v"][k], two["opt_state"]["v"][k]), k
    assert one["meta"]["rng"] == two["meta"]["rng"]
    log_one = [json.loads(l) for l in open(tmp_path / "one" / "metrics.jsonl")]
    log_two = [json.loads(l) for l in open(tmp_path / "two" / "metrics.jsonl")]
    strip = lambda rows: [(r["step"], r["train_loss"], r["val_loss"]) for r in rows if r["step"] != 12]
    assert strip(log_one) == strip(log_two)          # step 12 is logged only where the first half ended


def test_a_new_run_in_an_old_folder_is_refused_unless_overwrite_and_then_starts_its_logs_afresh(
        shakespeare_head, tmp_path):
    notes = []
    train(_args(shakespeare_head, tmp_path, 10), log=notes.append)
    before = open(tmp_path / "ckpt.npz", "rb").read()
    with pytest.raises(TinyLMError, match="holds an earlier run; continue it with --init_from resume, replace it "
                                          "with --overwrite"):
        train(_args(shakespeare_head, tmp_path, 5), log=notes.append)
    assert open(tmp_path / "ckpt.npz", "rb").read() == before          # not a byte changed
    assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [0, 5, 10]
    train(_args(shakespeare_head, tmp_path, 5, overwrite=True), log=notes.append)
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 5]
    assert any("from an earlier run will be replaced" in n for n in notes)


def test_fine_tuning_into_a_folder_with_a_checkpoint_is_refused_too(shakespeare_head, tmp_path):
    train(_args(shakespeare_head, tmp_path / "a", 5), log=lambda *a: None)
    train(_args(shakespeare_head, tmp_path / "b", 5), log=lambda *a: None)
    with pytest.raises(TinyLMError, match="holds an earlier run"):
        train(_args(shakespeare_head, tmp_path / "b", 5, init_from=str(tmp_path / "a" / "ckpt.npz")),
              log=lambda *a: None)


def test_a_second_trainer_on_the_same_folder_refuses_while_the_first_runs(shakespeare_head, tmp_path):
    import subprocess
    import sys
    import time
    from conftest import ROOT
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data", shakespeare_head, "--out_dir", str(out),
           "--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--block_size", "16", "--batch_size", "4",
           "--eval_interval", "10", "--eval_iters", "2", "--sample_tokens", "0", "--progress", "false"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    first = subprocess.Popen(cmd + ["--max_iters", "100000"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        while not (out / "ckpt.npz").exists():
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.05)
        for extra in ([], ["--init_from", "resume"], ["--overwrite", "true"]):     # every way in is refused
            second = subprocess.run(cmd + ["--max_iters", "20"] + extra, env=env, capture_output=True, text=True,
                                    timeout=120)
            assert second.returncode == 1, second.stderr
            assert f"another trainer is using --out_dir {out}; wait for it" in second.stderr, second.stderr
            assert second.stderr.strip().count("\n") == 0
    finally:
        first.terminate()
        first.communicate(timeout=60)
    assert first.returncode == 143                    # it saved and stopped cleanly, untouched by the second
    # the lock went with the process: the folder is free again
    again = subprocess.run(cmd + ["--max_iters", "20", "--init_from", "resume"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr


def test_resuming_a_finished_run_says_there_is_nothing_to_do(shakespeare_head, tmp_path):
    train(_args(shakespeare_head, tmp_path, 5), log=lambda *a: None)
    before = open(tmp_path / "ckpt.npz", "rb").read()
    notes = []
    summary = train(_args(shakespeare_head, tmp_path, 5, init_from="resume"), explicit=("init_from",), log=notes.append)
    assert summary["step"] == 5 and any(n.startswith("nothing to do") and "--max_iters" in n for n in notes)
    assert open(tmp_path / "ckpt.npz", "rb").read() == before


def test_track_spectra_without_a_tracker_is_refused_with_one_line_before_anything_is_written(shakespeare_head, tmp_path):
    """The loop does not import the analysis: --track_spectra needs its logger handed in (train.py hands it)."""
    with pytest.raises(TinyLMError, match=r"^--track_spectra needs a spectrum logger.*tracker=tinylm\.analysis\."
                                          r"tracking\.log_spectra") as e:
        train(_args(shakespeare_head, tmp_path / "run", 5, track_spectra=True), log=lambda *a: None)
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()
    # a resumed run tracks by its checkpoint's settings: without the logger it is refused too, the run untouched
    from tinylm.analysis.tracking import log_spectra
    train(_args(shakespeare_head, tmp_path / "run", 5, track_spectra=True), log=lambda *a: None, tracker=log_spectra)
    before = open(tmp_path / "run" / "ckpt.npz", "rb").read()
    with pytest.raises(TinyLMError, match="^--track_spectra needs a spectrum logger"):
        train(_args(shakespeare_head, tmp_path / "run", 10, init_from="resume"), explicit=("init_from", "max_iters"),
              log=lambda *a: None)
    assert open(tmp_path / "run" / "ckpt.npz", "rb").read() == before


def test_the_command_line_resumes_a_tracked_run_still_tracking(shakespeare_head, tmp_path):
    from tinylm.cli.train import train_main
    small = ["--data", shakespeare_head, "--out_dir", str(tmp_path), "--n_layer", "1", "--n_head", "2", "--n_embd", "16",
             "--block_size", "16", "--batch_size", "4", "--eval_interval", "5", "--eval_iters", "2",
             "--sample_tokens", "0", "--progress", "false"]
    assert train_main(small + ["--max_iters", "5", "--track_spectra", "true"]) == 0
    assert train_main(["--out_dir", str(tmp_path), "--init_from", "resume", "--max_iters", "10"]) == 0   # no flag
    rows = [json.loads(l) for l in open(tmp_path / "spectra.jsonl")]
    assert [r["step"] for r in rows] == [0, 5, 10] and "updates" in rows[-1]


def estimate_loss_on_one_thread(params, config, splits, a, step):
    """estimate_loss as it was before the threads: batch by batch in one loop (the reference for the test below)."""
    from tinylm.fast.arch import fast_model
    from tinylm.text.data import get_batch
    out = {}
    for name, ids in splits.items():
        rng = np.random.default_rng([a.seed, step, len(name)])
        losses = []
        for _ in range(a.eval_iters):
            x, y = get_batch(ids, config.block_size, a.batch_size, rng)
            losses.append(fast_model(config).forward(params, config, x, y, for_backward=False)[1])
        out[name] = float(np.mean(losses))
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_evaluation_on_threads_gives_the_one_thread_losses_bit_for_bit(arch, monkeypatch):
    """The evaluation's batches run on a thread per core (forced to 3 here, whatever this machine has) and the
    losses are exactly the one-thread loop's: the same batches, the same per-batch losses, the same mean; and
    the forward really ran on several threads."""
    import threading
    from tinylm.core.gpt2 import GPTConfig
    from tinylm.core.llama import LlamaConfig
    from tinylm.core.arch import model_of
    from tinylm.fast import parallel
    from tinylm.fast.arch import fast_model
    from tinylm.train import loop
    config = (GPTConfig(block_size=16, vocab_size=23, n_layer=2, n_head=2, n_embd=16, dropout=0.2, bias=True)
              if arch == "gpt2" else
              LlamaConfig(block_size=16, vocab_size=23, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, dropout=0.2))
    params = model_of(config).init_params(config, seed=3)
    ids = np.random.default_rng(0).integers(0, 23, 2000).astype(np.uint8)
    splits = {"train": ids[:1800], "val": ids[1800:]}
    a = TrainArgs(seed=7, eval_iters=9, batch_size=5)
    expected = estimate_loss_on_one_thread(params, config, splits, a, step=40)
    threads = set()
    real = fast_model(config)

    class Recording:
        def forward(self, *args, **kw):
            threads.add(threading.get_ident())
            return real.forward(*args, **kw)

    monkeypatch.setattr(parallel, "usable_cores", lambda: 3)
    monkeypatch.setattr(loop, "fast_model", lambda config: Recording())
    got = loop.estimate_loss(params, config, splits, a, step=40)
    assert got == expected                          # floats compared exactly
    assert len(threads) > 1


def test_threads_of_the_evaluation_keep_the_callers_numpy_error_state():
    """A caller's np.errstate holds on map_threads' threads (a pool thread starts from NumPy's default state):
    the loop's over="ignore" keeps a diverged model's evaluation to its one-line error, with no RuntimeWarning."""
    from tinylm.fast.parallel import map_threads
    big = np.full(4, 1e30, dtype=np.float32)
    with np.errstate(over="raise"):
        with pytest.raises(FloatingPointError):
            map_threads(lambda k: big * big, range(4), workers=2)
    with np.errstate(over="ignore"):
        assert all(np.isinf(v).all() for v in map_threads(lambda k: big * big, range(4), workers=2))
