"""`python -m benchmarks.bench --quick` runs and prints sane numbers. Its speed is never checked."""
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_paired_mfu_compares_each_round_with_the_machine_of_its_time():
    from benchmarks.bench import paired_mfu
    # 4 GFLOP a step; round 1 at 40 ms against readings of 200 and 180 GFLOP/s: 100 GFLOP/s ÷ 200 = 50%;
    # round 2 on a host slowed to half (80 ms, readings 180 then 100): 50 ÷ 180 = 27.8%, and the same
    # slowdown on both sides (readings 100 and 100) would give 50% again
    assert paired_mfu(4e9, [40.0, 80.0], [200.0, 180.0, 100.0]) == [0.5, 50 / 180]
    assert paired_mfu(4e9, [40.0, 80.0], [200.0, 100.0, 100.0]) == [0.5, 0.5]
    assert paired_mfu(4e9, [40.0], [180.0, 200.0]) == [0.5]          # the reading after, when it is the higher


def test_quick_bench_prints_a_sane_table():
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--quick"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "load average" in out and "MFU" in out and "peak RSS MiB" in out
    for name in ("cpu", "baby"):
        row = re.search(rf"^{name}\s+L\d.*$", out, re.M)
        assert row, out
        nums = [float(v.replace(",", "").rstrip("%")) for v in row.group(0).split()[7:]]
        params, gflop, ms, tok_s, gflops, peak, mfu, mfu_vs_best, mm_ms, rss, load = nums
        assert params > 0 and gflop > 0 and ms > 0 and tok_s > 0 and gflops > 0 and peak > 0
        assert 0 < mfu < 100 * 1.5 and 0 < mfu_vs_best < 100 * 1.5 and mm_ms > 0 and 20 < rss < 4000
        assert abs(mfu_vs_best - 100 * gflops / peak) < 0.1 + 0.01 * mfu_vs_best
        assert peak >= 0.9 * gflop / (mm_ms / 1e3)      # the peak is never below what the step's products reached
        rounds = re.search(rf"^  {name}: MFU = median over (\d+) rounds \(([\d.]+)–([\d.]+)%\)", out, re.M)
        assert rounds and float(rounds[2]) - 0.05 <= mfu <= float(rounds[3]) + 0.05, out
        readings = re.search(r"read before each round, after the last and at the end: ([\d. /]+);",
                             out.split(f"  {name}: MFU")[1], re.M)
        values = [float(v) for v in readings[1].split(" / ")]
        assert len(values) == int(rounds[1]) + 2 and all(0 < v <= peak + 0.05 for v in values), out
    # the breakdown covers the step: its percentages add up to 100
    lines = out.split("where one single-threaded step's time goes")[1].splitlines()[2:12]
    cpu_total = sum(float(line.split()[-4]) + float(line.split()[-3]) for line in lines)
    assert abs(cpu_total - 100) < 1.0, lines
    assert re.search(r"^\s+64\s+[\d,]+\s+[\d,]+\s+[\d.]+x$", out, re.M), out
    assert re.search(r"^\s+256\s+[\d,]+\s+[\d,]+\s+[\d.]+x$", out, re.M), out
    assert time.perf_counter() - t0 < 60


def test_eval_quick_alternates_the_one_thread_and_the_threaded_evaluation_with_equal_losses():
    """`--eval` times train.py's evaluation before and after its threads, both models, and checks their losses equal."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--eval", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    rows = re.findall(r"^  (GPT-2|Llama) .*one thread \(before\):\s+([\d,]+) tok/s.*now\):\s+([\d,]+) tok/s\s+"
                      r"ratio ([\d.]+)x; losses equal bit for bit: (\w+)$", proc.stdout, re.M)
    assert [r[0] for r in rows] == ["GPT-2", "Llama"], proc.stdout
    for _, before, now, ratio, equal in rows:
        assert equal == "True" and float(before.replace(",", "")) > 0 and float(now.replace(",", "")) > 0
    assert "load before" in proc.stdout


def test_time_to_loss_quick_runs_both_optimizers_and_reports_steps_to_the_target():
    """The time-to-quality bench (benchmarks/bench_train.py) drives its workers to the target and prints a row each."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--time-to-loss", "3.9", "--quick", "--no-torch",
                           "--optimizer-share"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for label in ("AdamW", "Muon, eigh", "Muon, svd", "Muon, newton_schulz (5 steps)", "Muon, newton_schulz (3 steps)"):
        row = re.search(rf"^{re.escape(label)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%$", out, re.M)
        assert row, (label, out)
        ms, opt_ms, share = map(float, row.groups())
        assert 0 < opt_ms < ms and abs(share - 100 * opt_ms / ms) < 1.5
    for name in ("tinylm AdamW", "tinylm Muon"):
        row = re.search(rf"^{name}\s+(\d+)\s+(\d+|-)\s+([\d.]+)\s", out, re.M)
        assert row, (name, out)
        schedule, steps, loss = row.groups()
        assert steps != "-" and int(steps) <= int(schedule) and float(loss) <= 3.9    # reached, and says where
    assert "PyTorch AdamW" not in out.split("time to validation loss")[1]          # --no-torch


def test_time_to_loss_quick_also_trains_a_llama_with_both_optimizers():
    """--also-llama adds a Llama of the recipe's sizes (fast/llama.py), AdamW and Muon, each reaching the target;
    --no-gpt2 leaves tinylm's GPT-2 runs out; the second table gives each run's whole process to the target."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--time-to-loss", "3.9", "--quick", "--no-torch",
                           "--also-llama", "--n-kv-head", "1", "--no-gpt2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Llama (n_kv_head 1)" in out
    table, process = out.split("time to validation loss")[1].split("whole process to the target")
    for name in ("Llama AdamW", "Llama Muon"):
        row = re.search(rf"^{name}\s+(\d+)\s+(\d+|-)\s+([\d.]+)\s", table, re.M)
        assert row, (name, out)
        schedule, steps, loss = row.groups()
        assert steps != "-" and int(steps) <= int(schedule) and float(loss) <= 3.9
        assert re.search(rf"^{name}\s+[\d.]+", process, re.M), (name, out)
    assert "tinylm AdamW" not in out and "tinylm Muon" not in out                      # --no-gpt2


def test_whole_process_quick_times_tinylms_run_and_evaluates_it_on_the_fixed_set():
    """`python -m benchmarks.whole_process --quick`: train.py run as a process, timed, its own and the fixed set's
    losses in the table; without --nanogpt it says tinylm's side runs alone."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.whole_process", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "load average" in out and "tinylm's side alone" in out, out
    rows = re.findall(r"^(1|med)\s+tinylm 4 steps\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert [r[0] for r in rows] == ["1", "med"], out
    for _, seconds, own, fixed, load in rows:
        assert 0 < float(seconds) < 120 and 0 < float(own) < 5 and 0 < float(fixed) < 5, out   # finite, near ln 65
    assert "nanoGPT" not in out.split("B:", 1)[1].split("\n", 1)[1]
