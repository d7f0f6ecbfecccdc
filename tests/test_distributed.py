"""Data-parallel training over MPI (distributed.py): `mpiexec -n 2 python train.py` against one process.

The tests that launch ranks need mpi4py and an mpiexec (the [test] extra brings both, through the
mpich wheel). Where they are missing they are skipped, saying why; under CI (CI=true) they fail
instead, so the N = 2 equality test can never be skipped there unnoticed.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, run_script
from tinylm.train.distributed import find_mpiexec

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--batch_size", "8",
        "--eval_iters", "2", "--sample_tokens", "0", "--progress", "false", "--learning_rate", "3e-3",
        "--warmup_iters", "2", "--lr_decay_iters", "20"]


def mpi_missing():
    """Why ranks cannot be launched here, or None."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -e '.[test]' brings it and the mpich wheel)"
    if find_mpiexec() is None:
        return "no mpiexec beside this Python or on PATH (pip install -e '.[test]' brings the mpich wheel's)"
    return None


@pytest.fixture(scope="module")
def mpiexec():
    why = mpi_missing()
    if why and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the MPI tests, but {why}")
    if why:
        pytest.skip(why)
    return find_mpiexec()


def launch(mpiexec, n, *args, timeout=120):
    """`mpiexec -n n python train.py args...`, as a user would start it."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([mpiexec, "-n", str(n), sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint(out_dir):
    from tinylm.io.checkpoint import load_checkpoint
    return load_checkpoint(os.path.join(out_dir, "ckpt.npz"))


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- without MPI


def test_training_never_imports_mpi4py(shakespeare_head, tmp_path):
    """One process, no launcher: training runs and mpi4py is never imported (nor needed)."""
    code = ("import sys\n"
            "from tinylm.cli.train import train_main\n"
            f"rc = train_main({['--data', shakespeare_head, '--out_dir', str(tmp_path / 'out'), '--max_iters', '2'] + TINY!r})\n"
            "assert rc == 0, rc\n"
            "print('mpi4py' in sys.modules, 'mpi4py.MPI' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MV2_"))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(env, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False False"


def test_mpiexec_without_the_extra_is_one_line_and_writes_nothing(shakespeare_head, tmp_path):
    """Started by a launcher (its PMI variables), with mpi4py not importable: one line naming the extra."""
    blocker = tmp_path / "no_mpi4py" / "mpi4py"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named mpi4py')\n")
    out = tmp_path / "out"
    env = dict(os.environ, PMI_SIZE="2", PMI_RANK="0", PYTHONPATH=f"{blocker.parent}{os.pathsep}{ROOT}")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data", shakespeare_head, "--out_dir",
                           str(out), "--max_iters", "2", *TINY], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1
    assert error_lines(proc) == [
        "error: started by mpiexec as 2 processes, but mpi4py is not installed: pip install -e '.[mpi]' "
        "(or run without mpiexec)"]
    assert not out.exists()


def test_the_launchers_variables_give_size_and_rank():
    from tinylm.train.distributed import launched_rank, launched_size
    assert launched_size({}) == 1 and launched_rank({}) == 0
    assert launched_size({"PMI_SIZE": "4"}) == 4 and launched_rank({"PMI_RANK": "3"}) == 3
    assert launched_size({"OMPI_COMM_WORLD_SIZE": "2"}) == 2 and launched_rank({"OMPI_COMM_WORLD_RANK": "1"}) == 1


class _FakeMPI:
    """Just what Ranks takes from mpi4py's MPI module, for a communicator that is not MPI's."""
    IN_PLACE = SUM = None

    class Exception(Exception):
        pass


class _Request:
    def __init__(self, done):
        self.done = done

    def Test(self):
        return self.done


class _FakeComm:
    """Two ranks whose collectives complete at once while the peer answers, and never once it has hung."""

    def __init__(self, rank):
        self.rank, self.answering = rank, True

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return 2

    def Iallreduce(self, send, recv, op=None):
        return _Request(self.answering)

    Iallgather = Ibcast = lambda self, *a, **kw: _Request(self.answering)


def test_a_rank_that_gives_up_says_the_checkpoint_is_intact_only_when_the_run_has_one():
    from tinylm.core import gpt2 as G
    from tinylm.train.args import TrainArgs
    from tinylm.train.distributed import CollectiveTimeout, Ranks, timeout_message
    assert timeout_message(1, 2.4, "at a training step", False) == (
        "rank 1 waited 2 s for the other ranks at a training step: a rank or host was lost, or is far slower "
        "(allow longer with --mpi_timeout); nothing was saved")
    config = G.GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8)
    params = G.init_params(config, seed=0)
    x = np.random.default_rng(0).integers(0, 11, size=(4, 8))

    def gives_up(ranks, root_evaluated=None):
        """The line with which this rank gives up once its peer hangs: setting up, or at a step (root_evaluated)."""
        ranks.comm.answering = False
        with pytest.raises(CollectiveTimeout) as e:
            if root_evaluated is None:
                ranks.check_same_args(TrainArgs(), ())
            else:
                ranks.loss_and_grads(params, config, x, x, None, None, root_evaluated)
        ranks.comm.answering = True
        return str(e.value)

    intact = "the last checkpoint is intact, resume it with --init_from resume under any number of processes"
    for rank in (0, 1):
        new_run = Ranks(_FakeMPI, _FakeComm(rank), timeout=0.05)
        assert gives_up(new_run).endswith("; nothing was saved")               # setting up a new run
        assert gives_up(Ranks(_FakeMPI, _FakeComm(rank), timeout=0.05, saved=True)).endswith(intact)   # resumed
    # step 0 of a new run: rank 0 evaluated and saved before it; rank 1 cannot know whether it did
    assert gives_up(Ranks(_FakeMPI, _FakeComm(0), timeout=0.05), root_evaluated=True).endswith(intact)
    peer = Ranks(_FakeMPI, _FakeComm(1), timeout=0.05)
    assert gives_up(peer, root_evaluated=True).endswith(
        "; rank 0 was saving the run's first checkpoint: if OUT_DIR/ckpt.npz is there it is whole, resume it with "
        "--init_from resume; otherwise nothing was saved")
    # once rank 0 has come on to the step after an evaluation, its checkpoint is there
    peer = Ranks(_FakeMPI, _FakeComm(1), timeout=0.05)
    peer.loss_and_grads(params, config, x, x, None, None, True)
    assert gives_up(peer, root_evaluated=False).endswith(intact)


# ----------------------------------------------------------------------------- under mpiexec


@pytest.fixture(scope="module")
def runs(mpiexec, shakespeare_head, tmp_path_factory):
    """12 steps as one process and as two ranks, then each resumed to 20 steps under the other N."""
    d = tmp_path_factory.mktemp("mpi")
    common = ["--data", shakespeare_head, "--eval_interval", "4", *TINY]
    one, two = str(d / "one"), str(d / "two")
    single = run_script("train.py", "--out_dir", one, "--max_iters", "12", *common)
    assert single.returncode == 0, single.stderr
    double = launch(mpiexec, 2, "--out_dir", two, "--max_iters", "12", *common)
    assert double.returncode == 0, double.stderr + double.stdout
    at12 = {"one": (metrics(one), checkpoint(one)), "two": (metrics(two), checkpoint(two))}
    # resume each under the other N
    shutil.copytree(one, d / "one_then_two")
    shutil.copytree(two, d / "two_then_one")
    resumed2 = launch(mpiexec, 2, "--out_dir", d / "one_then_two", "--init_from", "resume", "--max_iters", "20")
    assert resumed2.returncode == 0, resumed2.stderr + resumed2.stdout
    resumed1 = run_script("train.py", "--out_dir", d / "two_then_one", "--init_from", "resume", "--max_iters", "20")
    assert resumed1.returncode == 0, resumed1.stderr
    at20 = {k: (metrics(d / k), checkpoint(d / k)) for k in ("one_then_two", "two_then_one")}
    return {"at12": at12, "at20": at20, "double": double}


# float32 sums in another order: each loss agrees to ~1e-7 relative; 12 AdamW steps keep the weights within
# ~1e-6 of each other (a broken sum, e.g. one rank's half only, differs by ~1e-2 in the loss and 1e-3 in weights)
LOSS_TOL = 2e-5
PARAM_TOL = 2e-5


def one_and_two_ranks(mpiexec, folder, *args):
    """train.py args as one process into folder/one and as two MPI ranks into folder/two -> ((metrics, ckpt), …)."""
    one, two = str(folder / "one"), str(folder / "two")
    single = run_script("train.py", "--out_dir", one, *args)
    assert single.returncode == 0, single.stderr
    double = launch(mpiexec, 2, "--out_dir", two, *args)
    assert double.returncode == 0, double.stderr + double.stdout
    return (metrics(one), checkpoint(one)), (metrics(two), checkpoint(two))


def assert_same_run(a, b):
    (metrics_a, ckpt_a), (metrics_b, ckpt_b) = a, b
    assert [r["step"] for r in metrics_a] == [r["step"] for r in metrics_b]
    for ra, rb in zip(metrics_a, metrics_b):
        assert abs(ra["train_loss"] - rb["train_loss"]) < LOSS_TOL, (ra, rb)
        assert abs(ra["val_loss"] - rb["val_loss"]) < LOSS_TOL, (ra, rb)
    for k, p in ckpt_a["params"].items():
        np.testing.assert_allclose(ckpt_b["params"][k], p, rtol=0, atol=PARAM_TOL, err_msg=k)
    for k, m in ckpt_a["opt_state"]["m"].items():
        np.testing.assert_allclose(ckpt_b["opt_state"]["m"][k], m, rtol=1e-3, atol=1e-7, err_msg=k)
    # the batches are drawn from one generator for the whole global batch, whatever N
    assert ckpt_a["meta"]["rng"]["batch"] == ckpt_b["meta"]["rng"]["batch"]
    assert ckpt_a["meta"]["step"] == ckpt_b["meta"]["step"]


def test_two_ranks_give_the_losses_and_weights_of_one_process_up_to_summation_order(runs):
    one, two = runs["at12"]["one"], runs["at12"]["two"]
    assert len(one[0]) == 4            # evaluations at steps 0, 4, 8, 12
    assert one[0][-1]["train_loss"] < one[0][0]["train_loss"] - 0.05      # it learned something
    assert_same_run(one, two)
    assert "parameters" in runs["double"].stdout and runs["double"].stdout.count("step 12:") == 1   # rank 0 logs


def test_a_run_resumes_under_any_number_of_ranks(runs):
    """12 steps under N = 1 then 8 under N = 2, against 12 under N = 2 then 8 under N = 1."""
    assert_same_run(runs["at20"]["one_then_two"], runs["at20"]["two_then_one"])
    assert runs["at20"]["two_then_one"][0][-1]["step"] == 20


def test_a_batch_that_does_not_divide_among_the_ranks_is_refused(mpiexec, shakespeare_head, tmp_path):
    out = tmp_path / "out"
    proc = launch(mpiexec, 2, "--data", shakespeare_head, "--out_dir", out, "--max_iters", "2", *TINY,
                  "--batch_size", "5")
    assert proc.returncode == 1
    assert error_lines(proc) == ["error: --batch_size 5 does not divide among 2 processes: give a multiple of 2 "
                                 "(each process takes batch_size / 2 sequences); nothing was written"]
    assert not out.exists()


def test_adapters_under_mpi_are_refused_and_full_fine_tuning_runs(mpiexec, shakespeare_head, tmp_path):
    base = tmp_path / "base"
    assert launch(mpiexec, 2, "--data", shakespeare_head, "--out_dir", base, "--max_iters", "2", *TINY).returncode == 0
    out = tmp_path / "lora"
    proc = launch(mpiexec, 2, "--data", shakespeare_head, "--out_dir", out, "--max_iters", "2", *TINY,
                  "--init_from", base / "ckpt.npz", "--lora_rank", "2")
    assert proc.returncode == 1
    assert len(error_lines(proc)) == 1 and "--lora_rank is not supported under mpiexec" in error_lines(proc)[0]
    assert not out.exists()
    full = tmp_path / "full"
    proc = launch(mpiexec, 2, "--data", shakespeare_head, "--out_dir", full, "--max_iters", "2", *TINY,
                  "--init_from", base / "ckpt.npz")
    assert proc.returncode == 0, proc.stderr
    assert (full / "ckpt.npz").is_file()


@pytest.mark.parametrize("flags, line", [
    (["--batch_size", "0"], "error: --batch_size must be a positive integer, got 0"),
    (["--data", "/nonexistent/text.txt"], "error: data file not found: /nonexistent/text.txt"),
    (["--init_from", "resume"], "error: checkpoint not found: {out}/ckpt.npz (train one first with: python train.py)")])
def test_an_error_every_rank_meets_is_printed_once(mpiexec, shakespeare_head, tmp_path, flags, line):
    out = tmp_path / "out"
    proc = launch(mpiexec, 2, "--data", shakespeare_head, "--out_dir", out, "--max_iters", "2", *TINY, *flags)
    assert proc.returncode == 1
    assert error_lines(proc) == [line.format(out=out)]
    assert not (out / "ckpt.npz").exists()


def test_ranks_started_with_other_flags_are_refused(mpiexec, shakespeare_head, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data", shakespeare_head, "--out_dir", str(out),
           "--max_iters", "2", *TINY]
    for mine, expected in ((["--seed", "2"], "--seed 2 (rank 0: 1)"), ([], "--seed 1337 (rank 0: 1), --seed given on rank 0 only")):
        proc = subprocess.run([mpiexec, "-n", "1", *cmd, "--seed", "1", ":", "-n", "1", *cmd, *mine], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
        assert proc.returncode == 1
        assert error_lines(proc) == [f"error: rank 1 was started with other settings than rank 0: {expected}; "
                                     f"start every rank with the same command line; nothing was written"]
        assert not out.exists()


# ----------------------------------------------------------------------------- faults


def rank_pids(out_dir):
    """{rank: pid} of the train.py processes writing to out_dir (from /proc: their command line and environment)."""
    pids = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            if b"train.py" not in b" ".join(cmd) or os.fsencode(out_dir) not in cmd:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"PMI_RANK" in env:
            pids[int(env[b"PMI_RANK"])] = int(pid)
    return pids


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the ranks' processes in /proc (Linux)")


def start_long_run(mpiexec, shakespeare_head, out, *extra, launcher_flags=()):
    """A run of many steps under 2 ranks; returns (process, {rank: pid}) once it has saved two checkpoints."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([mpiexec, *launcher_flags, "-n", "2", sys.executable, os.path.join(ROOT, "train.py"), "--data",
                             shakespeare_head, "--out_dir", str(out), *TINY, "--max_iters", "100000",
                             "--lr_decay_iters", "100000", "--eval_interval", "20", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(metrics(out)) >= 2 and len(rank_pids(str(out))) == 2:
            return proc, rank_pids(str(out))
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the run did not get going: {proc.communicate()}")


def finish(proc, limit_s):
    """The launch's (exit status, stdout + stderr, stderr's non-empty lines, seconds it took to end)."""
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the other rank did not exit within {limit_s} s: {out}\n{err}")
    return proc.returncode, out + err, [line for line in err.splitlines() if line.strip()], time.monotonic() - t0


def assert_checkpoint_intact_and_resumable(out):
    """The last checkpoint loads, is at an evaluation's step, and one process carries it on."""
    ckpt = checkpoint(str(out))
    step = ckpt["meta"]["step"]
    assert step > 0 and step % 20 == 0
    for p in ckpt["params"].values():
        assert np.isfinite(p).all()
    proc = run_script("train.py", "--out_dir", out, "--init_from", "resume", "--max_iters", step + 2)
    assert proc.returncode == 0, proc.stderr
    assert checkpoint(str(out))["meta"]["step"] == step + 2


@needs_proc
def test_a_killed_rank_ends_the_run_within_seconds_and_the_checkpoint_survives(mpiexec, shakespeare_head, tmp_path):
    """SIGKILL on rank 1 mid-run: MPI's launcher ends rank 0 at once and says which rank died and how."""
    out = tmp_path / "out"
    proc, pids = start_long_run(mpiexec, shakespeare_head, out)
    os.kill(pids[1], signal.SIGKILL)
    rc, output, _, took = finish(proc, 15)
    assert rc != 0 and took < 10
    assert "Killed (signal 9)" in output                  # the launcher's line (MPICH's Hydra)
    assert not rank_pids(str(out))                        # no rank left behind
    assert_checkpoint_intact_and_resumable(out)


@needs_proc
def test_a_hung_rank_times_out_with_one_line(mpiexec, shakespeare_head, tmp_path):
    """SIGSTOP on rank 1 (a hung process, or a host that stopped answering): rank 0 gives up after
    --mpi_timeout with one line, and the launcher then ends the stopped rank."""
    out = tmp_path / "out"
    proc, pids = start_long_run(mpiexec, shakespeare_head, out, "--mpi_timeout", "2")
    try:
        os.kill(pids[1], signal.SIGSTOP)
        rc, _, lines, took = finish(proc, 30)
    finally:
        if pids[1] in rank_pids(str(out)).values():
            os.kill(pids[1], signal.SIGKILL)
    assert rc == 1 and took < 15
    # 2 s, stretched by ten times rank 0's own step (a slow step on a busy machine is not a lost rank)
    assert len(lines) == 1 and re.match(r"error: rank 0 waited \d+ s for the other ranks at a training step: a rank "
                                        r"or host was lost", lines[0]), lines
    assert_checkpoint_intact_and_resumable(out)


@needs_proc
def test_a_rank_that_fails_stops_the_others_at_once_through_the_abort_flag(mpiexec, shakespeare_head, tmp_path):
    """Rank 0 fails alone (its out_dir removed under it): it posts the abort flag into the Allreduce rank 1
    waits in, so rank 1 exits at once by itself (the launcher is told not to clean up, so it does not help)."""
    if "HYDRA" not in subprocess.run([mpiexec, "--version"], capture_output=True, text=True).stdout:
        pytest.skip("-disable-auto-cleanup is an option of MPICH's mpiexec (Hydra)")
    out = tmp_path / "out"
    proc, _ = start_long_run(mpiexec, shakespeare_head, out, "--mpi_timeout", "30",
                             launcher_flags=["-disable-auto-cleanup"])
    # A rename takes out_dir away in one step; rmtree could race rank 0 writing a file into it.
    out.rename(tmp_path / "taken_away")
    rc, output, lines, took = finish(proc, 60)
    assert rc == 1 and took < 10, (took, output)       # not the 30 s of the timeout
    assert len(lines) == 1 and lines[0].startswith("error: ") and "No such file or directory" in lines[0], lines


@needs_proc
def test_sigterm_to_one_rank_stops_every_rank_after_saving(mpiexec, shakespeare_head, tmp_path):
    """The stop flag travels in the summed buffer: all ranks stop before the same step, rank 0 saves it."""
    out = tmp_path / "out"
    proc, pids = start_long_run(mpiexec, shakespeare_head, out)
    os.kill(pids[1], signal.SIGTERM)
    rc, output, lines, took = finish(proc, 30)
    assert rc == 128 + signal.SIGTERM, output
    assert len(lines) == 1 and lines[0].startswith("interrupted at step "), lines
    step = int(lines[0].split()[3].rstrip(";"))
    assert checkpoint(str(out))["meta"]["step"] == step


def test_quick_mpi_bench_prints_both_sides_and_the_allreduce_share(mpiexec):
    """`python -m benchmarks.bench_mpi --quick` runs; its speed is never checked."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_mpi", "--quick", "--runs", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    threaded = re.search(r"^threaded, one process .*?\s([\d.]+)\s+[\d. ]+$", out, re.M)
    ranks = re.search(r"^mpiexec -n 2 .*?\s([\d.]+)\s+[\d. ]+$", out, re.M)
    assert threaded and ranks, out
    ratio = float(re.search(r"^mpi / threaded: ([\d.]+)", out, re.M)[1])
    assert abs(ratio - float(ranks[1]) / float(threaded[1])) < 0.01 + 0.02 * ratio
    share = re.search(r"^allreduce of ([\d,]+) float32 at a step: ([\d.]+) ms, ([\d.]+)% of the step", out, re.M)
    assert share and int(share[1].replace(",", "")) > 0 and 0 <= float(share[3]) <= 100, out
