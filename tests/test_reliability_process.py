"""Never lose a run, shown on the real entry point: SIGKILL at random moments, Ctrl-C, divergence.

Each test runs train.py as a subprocess with a tiny model, as a user would, and then checks what
is on disk. TINYLM_TEST_SLOW_SAVE (see tinylm/io/checkpoint.py) makes every save announce itself on
stderr and pause between writing the data and renaming it into place, so that a kill can be aimed
at "while a checkpoint is being written".
"""
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np

from conftest import ROOT, run_script
from tinylm.io.checkpoint import load_checkpoint

ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def flags(data, out, max_iters, **kw):
    base = dict(data=data, out_dir=out, n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4,
                max_iters=max_iters, lr_decay_iters=40, warmup_iters=3, eval_interval=3, eval_iters=6,
                dropout=0.1, sample_tokens=0, progress="false")
    base.update(kw)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


def start(args, slow_save=None):
    env = dict(os.environ, PYTHONPATH=ROOT, **ENV)
    if slow_save:
        env["TINYLM_TEST_SLOW_SAVE"] = str(slow_save)
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc, needle, count=1, timeout=60):
    """Read stderr until `needle` has appeared `count` times; True if it did before the process ended."""
    seen, t0 = 0, time.monotonic()
    for line in proc.stderr:
        if needle in line:
            seen += 1
            if seen == count:
                return True
        assert time.monotonic() - t0 < timeout
    return False


def temp_files(out):
    return [f for f in os.listdir(out) if f.endswith(".tmp")]


def same_state(a, b):
    assert a["meta"]["step"] == b["meta"]["step"]
    for k in a["params"]:
        assert np.array_equal(a["params"][k], b["params"][k]), k
    assert a["opt_state"].keys() == b["opt_state"].keys()
    for part in a["opt_state"]:        # AdamW's m and v (and Muon's momentum, when it is Muon's run)
        if part != "t":
            assert a["opt_state"][part].keys() == b["opt_state"][part].keys(), part
            for k in a["opt_state"][part]:
                assert np.array_equal(a["opt_state"][part][k], b["opt_state"][part][k]), (part, k)
    assert a["opt_state"]["t"] == b["opt_state"]["t"]
    assert a["meta"]["rng"] == b["meta"]["rng"]


def metrics(out):
    import json
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))]


def test_sigkill_at_any_moment_loses_nothing_saved(shakespeare_head, tmp_path):
    """Kill -9 while a checkpoint is being written and at random moments (steps, evaluations, saves,
    start-up); each time the checkpoint on disk loads, no temporary file is left, and resuming
    carries on. After the last resume the run ends bit for bit where an uninterrupted run ends."""
    n = 24
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    reference = start(flags(shakespeare_head, ref, n))
    rnd = random.Random(1234)
    # (how to aim the kill, argument): the 2nd ckpt save, the 1st best save, then random times
    plan = [("line", ("saving ckpt.npz", 2)), ("time", rnd.uniform(0.2, 1.2)), ("line", ("saving best.npz", 1)),
            ("time", rnd.uniform(0.2, 1.2)), ("line", ("saving ckpt.npz", 1)), ("time", rnd.uniform(0.2, 1.2))]
    steps = []
    for i, (how, arg) in enumerate(plan):
        proc = start(flags(shakespeare_head, out, n) + (["--init_from", "resume"] if i else []), slow_save=0.15)
        if how == "line":
            assert wait_for_line(proc, *arg), f"run {i} ended before {arg}"
            time.sleep(0.02)                       # well inside the 0.15 s between writing and renaming
        else:
            time.sleep(arg)
        proc.kill()
        proc.wait()
        assert proc.returncode in (-signal.SIGKILL, 0), proc.returncode
        assert temp_files(out) == [], temp_files(out)          # no half-written file left to fill the disk
        ckpt = load_checkpoint(os.path.join(out, "ckpt.npz"))  # what is on disk always loads
        assert ckpt["opt_state"] is not None and 0 <= ckpt["meta"]["step"] <= n
        steps.append(ckpt["meta"]["step"])
    proc = start(flags(shakespeare_head, out, n, init_from="resume"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert reference.wait(timeout=120) == 0, reference.stderr.read()
    same_state(load_checkpoint(os.path.join(out, "ckpt.npz")), load_checkpoint(os.path.join(ref, "ckpt.npz")))
    assert metrics(out) == metrics(ref)               # rows logged past the checkpoint by a killed run are dropped
    assert steps[0] == 0 and steps[-1] <= n
    assert temp_files(out) == []


def _interrupt(shakespeare_head, out, sig):
    proc = start(flags(shakespeare_head, out, 100000, eval_interval=25))
    while not os.path.exists(os.path.join(out, "ckpt.npz")):     # step 0 saved: training is under way
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_ctrl_c_saves_the_current_state_says_where_and_exits_130(shakespeare_head, tmp_path):
    out = str(tmp_path / "run")
    code, err = _interrupt(shakespeare_head, out, signal.SIGINT)
    assert code == 130, err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("interrupted at step ")
    step = int(last.split()[3].rstrip(";"))
    assert os.path.join(out, "ckpt.npz") in last and "--init_from resume" in last
    ckpt = load_checkpoint(os.path.join(out, "ckpt.npz"))
    assert ckpt["meta"]["step"] == step > 0                 # the current state, not the last evaluation's
    # and resuming from it lands exactly where an uninterrupted run of the same length lands
    ref = str(tmp_path / "ref")
    proc = run_script("train.py", *flags(shakespeare_head, ref, step + 4, eval_interval=25), env=ENV)
    assert proc.returncode == 0, proc.stderr
    proc = run_script("train.py", *flags(shakespeare_head, out, step + 4, eval_interval=25), "--init_from", "resume",
                      env=ENV)
    assert proc.returncode == 0, proc.stderr
    same_state(load_checkpoint(os.path.join(out, "ckpt.npz")), load_checkpoint(os.path.join(ref, "ckpt.npz")))


def test_sigterm_also_saves_and_exits_143(shakespeare_head, tmp_path):
    out = str(tmp_path / "run")
    code, err = _interrupt(shakespeare_head, out, signal.SIGTERM)
    assert code == 143 and err.strip().splitlines()[-1].startswith("interrupted at step "), err
    assert load_checkpoint(os.path.join(out, "ckpt.npz"))["meta"]["step"] > 0


def test_huge_learning_rate_stops_with_the_step_and_keeps_the_last_good_checkpoint(shakespeare_head, tmp_path):
    out = str(tmp_path / "nan")
    proc = run_script("train.py", *flags(shakespeare_head, out, 200, learning_rate=1e6, dropout=0.0), env=ENV)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr                  # no RuntimeWarnings, no traceback: one line
    assert lines[0].startswith("error: training diverged at step ") and "--learning_rate" in lines[0]
    failed = int(lines[0].split("step ")[1].split(":")[0])
    ckpt = load_checkpoint(os.path.join(out, "ckpt.npz"))
    good = ckpt["meta"]["step"]
    assert good < failed and good % 3 == 0
    assert all(np.isfinite(p).all() for p in ckpt["params"].values())
    # the file holds exactly the state of step `good`: the same run stopped there saves the same bits
    again = str(tmp_path / "again")
    proc = run_script("train.py", *flags(shakespeare_head, again, good, learning_rate=1e6, dropout=0.0), env=ENV)
    assert proc.returncode == 0, proc.stderr
    same_state(ckpt, load_checkpoint(os.path.join(again, "ckpt.npz")))


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    """Belt and braces behind the loss checks: if a weight became inf while the losses stayed finite,
    the save refuses it and the previous checkpoint stays."""
    import pytest
    from tinylm.train import loop as training
    from tinylm.train.args import TrainArgs
    from tinylm.errors import TinyLMError
    data = tmp_path / "t.txt"
    data.write_text("abcdefgh ijklmnop\n" * 300)
    real_step = training.adamw_step

    def poisoned_step(params, grads, state, *args, **kw):
        real_step(params, grads, state, *args, **kw)
        if state["t"] == 4:       # the update that leads to step 4, an evaluation (and save) step
            params["transformer.wpe.weight"][-1, 0] = np.inf

    monkeypatch.setattr(training, "adamw_step", poisoned_step)
    monkeypatch.setattr(training, "estimate_loss", lambda *a: {"train": 1.0, "val": 1.0})
    args = TrainArgs(data=str(data), out_dir=str(tmp_path / "o"), n_layer=1, n_head=2, n_embd=8,
                              block_size=8, batch_size=2, max_iters=10, eval_interval=2, eval_iters=1,
                              sample_tokens=0, progress=False)
    with pytest.raises(TinyLMError, match="diverged before step 4: transformer.wpe.weight is not finite"):
        training.train(args, log=lambda *a: None)
    ckpt = load_checkpoint(str(tmp_path / "o" / "ckpt.npz"))
    assert ckpt["meta"]["step"] == 2 and all(np.isfinite(p).all() for p in ckpt["params"].values())


def test_a_run_that_diverges_before_its_first_checkpoint_says_nothing_was_saved(tmp_path, monkeypatch):
    """'keeps the last good state' only when there is one: written by this run, or the one it resumed."""
    import pytest
    from tinylm.errors import TinyLMError
    from tinylm.fast import model as M
    from tinylm.train import loop as training
    from tinylm.train.args import TrainArgs
    data = tmp_path / "t.txt"
    data.write_text("abcdefgh ijklmnop\n" * 300)
    out = tmp_path / "o"
    args = lambda **kw: TrainArgs(**{**dict(data=str(data), out_dir=str(out), n_layer=1, n_head=2, n_embd=8,
                                            block_size=8, batch_size=2, max_iters=4, eval_interval=2, eval_iters=1,
                                            sample_tokens=0, progress=False), **kw})
    quiet = lambda *a: None
    real_estimate, real_grads = training.estimate_loss, M.loss_and_grads_parallel
    nan_eval = lambda *a: {"train": float("nan"), "val": float("nan")}
    monkeypatch.setattr(training, "estimate_loss", nan_eval)            # the step-0 evaluation fails
    with pytest.raises(TinyLMError) as e:
        training.train(args(), log=quiet)
    assert str(e.value) == ("training diverged at step 0: evaluation loss nan (train), nan (val); nothing was saved; "
                            "try a lower --learning_rate")
    assert not (out / "ckpt.npz").exists() and not (out / "best.npz").exists()
    # a new run over an earlier one (--overwrite) that fails as early: the earlier checkpoint is left, not its own
    monkeypatch.setattr(training, "estimate_loss", real_estimate)
    training.train(args(), log=quiet)
    earlier = (out / "ckpt.npz").read_bytes()
    monkeypatch.setattr(training, "estimate_loss", nan_eval)
    with pytest.raises(TinyLMError, match="; nothing was saved; "):
        training.train(args(overwrite=True), log=quiet)
    assert (out / "ckpt.npz").read_bytes() == earlier
    # a loss that is not finite at the first training step comes after the step-0 checkpoint: that one is kept
    monkeypatch.setattr(training, "estimate_loss", real_estimate)
    monkeypatch.setattr(M, "loss_and_grads_parallel", lambda *a, **kw: (float("nan"), real_grads(*a, **kw)[1]))
    with pytest.raises(TinyLMError, match=rf"^training diverged at step 0: loss nan, gradient norm [\d.]+; "
                                          rf"{re.escape(str(out / 'ckpt.npz'))} keeps the last good state; "):
        training.train(args(overwrite=True), log=quiet)
    assert load_checkpoint(str(out / "ckpt.npz"))["meta"]["step"] == 0
    # a resumed run has its checkpoint from the start, even when it fails at its first evaluation
    monkeypatch.setattr(M, "loss_and_grads_parallel", real_grads)
    monkeypatch.setattr(training, "estimate_loss", nan_eval)
    with pytest.raises(TinyLMError, match=rf"^training diverged at step 2: evaluation loss nan \(train\), nan \(val\); "
                                          rf"{re.escape(str(out / 'ckpt.npz'))} keeps the last good state; "):
        training.train(args(init_from="resume"), explicit=("init_from",), log=quiet)
