"""The exercises grade: every solution passes its check, every starter and every deliberately wrong
answer fails (with the right check named), and a file that cannot be graded gives one line and exit 2."""
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT, check_markdown_links
from tinylm.exercises.grader import EXERCISES, main

SOLUTIONS = os.path.join(ROOT, "tinylm", "exercises", "solutions")
STARTERS = os.path.join(ROOT, "tinylm", "exercises", "starters")
DOC = os.path.join(ROOT, "tinylm", "exercises", "README.md")


def solution(n):
    return os.path.join(SOLUTIONS, f"ex{n}.py")


def check(n, path, capsys, *extra):
    code = main(["check", str(n), "--file", str(path), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def lines(out, verdict):
    return [l for l in out.splitlines() if l.startswith(verdict + "  ")]


def wrong(tmp_path, n, old, new, name="wrong"):
    """The solution of exercise n with one piece of text replaced (which must be there)."""
    with open(solution(n), encoding="utf-8") as f:
        text = f.read()
    assert old in text, old
    path = tmp_path / f"{name}{n}.py"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


@pytest.mark.parametrize("n", sorted(EXERCISES))
def test_every_solution_passes(n, capsys):
    code, out, err = check(n, solution(n), capsys)
    assert code == 0, out + err
    assert len(lines(out, "PASS")) >= 3 and not lines(out, "FAIL")
    assert f"exercise {n}: all" in out


@pytest.mark.parametrize("n", sorted(EXERCISES))
def test_every_starter_fails_in_one_line(n, capsys):
    code, out, err = check(n, os.path.join(STARTERS, f"ex{n}.py"), capsys)
    assert code in (1, 2)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "NotImplementedError" in err and re.search(r"line \d+, in \w+", err)


def test_softmax_on_the_wrong_axis_fails(tmp_path, capsys):
    path = wrong(tmp_path, 1, "axis=-1, keepdims=True))\n    return e / e.sum(axis=-1",
                 "axis=0, keepdims=True))\n    return e / e.sum(axis=0")
    code, out, _ = check(1, path, capsys)
    assert code == 1
    assert any(l.startswith("FAIL  softmax(z) =") for l in out.splitlines())


def test_softmax_without_the_max_is_right_until_it_overflows(tmp_path, capsys):
    path = wrong(tmp_path, 1, "np.exp(z - z.max(axis=-1, keepdims=True))", "np.exp(z)")
    code, out, _ = check(1, path, capsys)
    assert code == 1
    assert [l.split(":")[0] for l in lines(out, "FAIL")] == ["FAIL  softmax(1000 z + 500)"]
    assert any(l.startswith("PASS  softmax(z) =") for l in out.splitlines())
    assert "note: softmax warned: RuntimeWarning" in out


def test_layernorm_backward_missing_a_term_fails_the_gradient_check(tmp_path, capsys):
    path = wrong(tmp_path, 2, " - xhat * (g * xhat).mean(-1, keepdims=True)", "")
    code, out, _ = check(2, path, capsys)
    assert code == 1
    failed = lines(out, "FAIL")
    assert any("dx against central differences" in l for l in failed)
    assert not any(l.startswith(("FAIL  dw", "FAIL  db")) for l in failed)   # only dx is wrong


def test_attention_without_the_scale_fails(tmp_path, capsys):
    path = wrong(tmp_path, 3, " / np.sqrt(D)", "")
    code, out, _ = check(3, path, capsys)
    assert code == 1 and any("attention_weights =" in l for l in lines(out, "FAIL"))
    assert any("later token" in l for l in lines(out, "PASS"))      # still causal


def test_a_wrong_overlap_formula_is_caught_by_the_monte_carlo(tmp_path, capsys):
    path = wrong(tmp_path, 4, "return k * m / d", "return k / d")
    code, out, _ = check(4, path, capsys)
    assert code == 1
    assert sum("Monte Carlo" in l or "mean overlap of" in l for l in lines(out, "FAIL")) == 2


def test_a_subspace_that_is_not_uniformly_random_is_caught(tmp_path, capsys):
    # uniform [0, 1) entries: every column leans towards (1, …, 1), so the subspace is not rotation invariant
    path = wrong(tmp_path, 4, "rng.standard_normal((d, k))", "rng.random((d, k))")
    code, out, _ = check(4, path, capsys)
    assert code == 1
    assert [l for l in lines(out, "FAIL") if "(1, …, 1)" in l]


def test_keeping_the_smallest_singular_values_fails(tmp_path, capsys):
    path = wrong(tmp_path, 5, "return U[:, :r] * s[:r], Vt[:r]",
                 "return U[:, len(s) - r:] * s[len(s) - r:], Vt[len(s) - r:]")
    code, out, _ = check(5, path, capsys)
    assert code == 1 and any("rank  1" in l for l in lines(out, "FAIL"))
    assert any("rank 16" in l for l in lines(out, "PASS"))        # at full rank nothing is discarded


def test_a_probe_without_the_ridge_fails(tmp_path, capsys):
    path = wrong(tmp_path, 6, "X.T @ X + lam * np.eye(X.shape[1])", "X.T @ X")
    code, out, _ = check(6, path, capsys)
    assert code == 1
    failed = lines(out, "FAIL")
    assert any("ridge_probe" in l for l in failed) and not any("cholesky" in l for l in failed)


def test_an_orthonormal_basis_that_is_not_the_polar_factor_fails(tmp_path, capsys):
    path = wrong(tmp_path, 7, "U, _, Vt = np.linalg.svd(M, full_matrices=False)\n    return U @ Vt",
                 "return np.linalg.qr(M)[0]")
    code, out, _ = check(7, path, capsys)
    assert code == 1
    assert any(l.startswith("PASS  polar_svd: QᵀQ = I") for l in out.splitlines())
    assert any(l.startswith("FAIL  polar_svd: Q equals U Vᵀ") for l in out.splitlines())


def test_ablating_rows_instead_of_columns_fails(tmp_path, capsys):
    path = wrong(tmp_path, 8, "W[:, head * D:(head + 1) * D] = 0.0", "W[head * D:(head + 1) * D] = 0.0")
    code, out, _ = check(8, path, capsys)
    assert code == 1 and any(l.startswith("FAIL  ablate_head: the loss") for l in out.splitlines())


def test_ablating_in_place_fails(tmp_path, capsys):
    path = wrong(tmp_path, 8, "W = P[name].copy()", "W = P[name]")
    code, out, _ = check(8, path, capsys)
    assert code == 1 and any("unchanged" in l for l in lines(out, "FAIL"))


# ----------------------------------------------------------------------------- what cannot be graded


def one_line_exit_2(code, err):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err


def test_missing_file_and_unknown_exercise(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["check", "3"])
    _, err = capsys.readouterr()
    one_line_exit_2(code, err)
    assert "exercises/ex3.py" in err and "start 3" in err
    code, _, err = check(3, tmp_path / "nowhere.py", capsys)
    one_line_exit_2(code, err)
    for n in ("9", "0"):
        code = main(["check", n, "--file", solution(1)])
        one_line_exit_2(code, capsys.readouterr()[1])
    code = main(["check", "3", "--file", solution(3), "--ckpt", "out/ckpt.npz"])   # only 5 and 8 read a model
    one_line_exit_2(code, capsys.readouterr()[1])
    code = main(["check", "8", "--file", solution(8), "--ckpt", str(tmp_path / "none.npz")])
    err = capsys.readouterr()[1]
    assert code != 0 and len(err.strip().splitlines()) == 1 and "none.npz" in err
    with pytest.raises(SystemExit) as exit_:            # argparse's usage error, one line too
        main(["check", "x"])
    one_line_exit_2(exit_.value.code, capsys.readouterr()[1])


def test_missing_function(tmp_path, capsys):
    path = tmp_path / "ex1.py"
    path.write_text("def softmax(z):\n    return z\n")
    code, _, err = check(1, path, capsys)
    one_line_exit_2(code, err)
    assert "no function softmax_backward" in err


def test_an_exception_names_itself_and_the_line(tmp_path, capsys):
    path = tmp_path / "ex5.py"
    path.write_text("import numpy as np\n\n\ndef truncated_svd(W, r):\n    U, s, Vt = np.linalg.svd(W)\n"
                    "    return U[:, :r] @ np.diag(s[:r]) @ Vt[:r, :5].T.T @ W\n\n\n"
                    "def eckart_young_error(s, r):\n    return 0.0\n")
    code, _, err = check(5, path, capsys)
    one_line_exit_2(code, err)
    assert "line 6, in truncated_svd" in err and "ValueError" in err


def test_a_syntax_error_and_a_wrong_number_of_results(tmp_path, capsys):
    path = tmp_path / "ex2.py"
    path.write_text("def layernorm_forward(x, w, b, eps=1e-5):\n    return x +\n")
    code, _, err = check(2, path, capsys)
    one_line_exit_2(code, err)
    assert "SyntaxError" in err and "line 2" in err
    path = wrong(tmp_path, 2, "return dx, dw, db", "return dx, dw")
    code, _, err = check(2, path, capsys)
    one_line_exit_2(code, err)
    assert "returned 2 values" in err


def test_start_copies_the_starter_and_never_overwrites(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["start", "2"]) == 0
    mine = tmp_path / "exercises" / "ex2.py"
    with open(os.path.join(STARTERS, "ex2.py"), encoding="utf-8") as f:
        assert mine.read_text(encoding="utf-8") == f.read()
    mine.write_text("# my work\n")
    capsys.readouterr()
    code = main(["start", "2"])
    one_line_exit_2(code, capsys.readouterr()[1])
    assert mine.read_text() == "# my work\n"
    assert main(["check", "2"]) == 2            # graded from the default place: no functions yet
    assert "no function layernorm_forward" in capsys.readouterr()[1]


def test_list_names_every_exercise(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for n, ex in EXERCISES.items():
        assert re.search(rf"^\s+{n}\s+{re.escape(ex['title'])}", out, re.M)


def test_the_command_line_as_a_learner_runs_it(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = lambda *a: subprocess.run([sys.executable, "-m", "tinylm.exercises", *a], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=120)
    r = run("check", "7", "--file", solution(7))
    assert r.returncode == 0 and "FAIL" not in r.stdout, r.stdout + r.stderr
    r = run("check", "7")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    r = run("check", "--help")
    words = " ".join(r.stdout.split())                  # argparse wraps its lines
    assert r.returncode == 0 and "exercises/exN.py" in words and "relative to the current directory" in words


def test_with_a_trained_checkpoint(trained_dir, capsys):
    ckpt = os.path.join(trained_dir["dir"], "ckpt.npz")
    code, out, err = check(8, solution(8), capsys, "--ckpt", ckpt)
    assert code == 0, out + err
    assert "the head that matters most: L" in out and ckpt in out
    code, out, err = check(5, solution(5), capsys, "--ckpt", ckpt)
    assert code == 0, out + err
    assert len(re.findall(r"rank × [\d.]+ *: val loss \d", out)) == 4


# ----------------------------------------------------------------------------- the page


def test_the_page_has_every_exercise_its_command_and_its_functions():
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    check_markdown_links(text, os.path.dirname(DOC))
    for n, ex in EXERCISES.items():
        assert re.search(rf"^## {n}\. ", text, re.M), n
        assert f"python -m tinylm.exercises check {n}" in text
        for name in ex["functions"]:
            assert f"{name}(" in text, name
        assert f"solutions/ex{n}.py" in text and f"starters/ex{n}.py" in text


# ----------------------------------------------------------------------------- code that does not return


SOFTMAX = ("import numpy as np\n\n\ndef softmax(z):\n    e = np.exp(z - z.max(axis=-1, keepdims=True))\n"
           "    return e / e.sum(axis=-1, keepdims=True)\n\n\n")


def test_code_that_never_returns_is_stopped_after_the_time_limit(tmp_path, capsys):
    path = tmp_path / "ex1.py"
    path.write_text(SOFTMAX + "def softmax_backward(dy, y):\n    while True:\n        pass\n")
    t0 = time.monotonic()
    code, out, err = check(1, path, capsys, "--timeout", "2")
    assert time.monotonic() - t0 < 30
    one_line_exit_2(code, err)
    assert "more than 2 s" in err and "--timeout" in err
    assert len(lines(out, "PASS")) == 3          # the checks before it had their verdicts


@pytest.mark.parametrize("body, words", [
    ("    import os\n    os._exit(0)\n", ["exit status 0", "3 did", "without a verdict fails"]),
    ("    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n", ["signal SIGKILL"]),
    ("    print('PASS  every check: error 0.00e+00, tolerance 1e-12')\n    import os\n    os._exit(0)\n",
     ["exit status 0"]),
])
def test_code_that_ends_the_process_gets_no_success(tmp_path, capsys, body, words):
    """Without a verdict for every check, check never exits 0, whatever the learner's code prints."""
    path = tmp_path / "ex1.py"
    path.write_text(SOFTMAX + "def softmax_backward(dy, y):\n" + body)
    code, out, err = check(1, path, capsys)
    one_line_exit_2(code, err)
    for w in words:
        assert w in err, (w, err)
    assert "all 5 checks pass" not in out


def test_code_that_exits_while_loading_gets_no_success(tmp_path, capsys):
    path = tmp_path / "ex1.py"
    path.write_text("import os\nos._exit(0)\n")
    code, _, err = check(1, path, capsys)
    one_line_exit_2(code, err)
    assert "0 did" in err


def test_any_file_name_is_graded_and_what_the_code_prints_is_shown(tmp_path, capsys):
    with open(solution(1), encoding="utf-8") as f:
        source = f.read()
    path = tmp_path / "good.txt"
    path.write_text(source + "\nprint('hello from the learner')\n", encoding="utf-8")
    code, out, err = check(1, path, capsys)
    assert code == 0 and "all 5 checks pass" in out and not err, out + err
    assert "hello from the learner" in out
    fifo = tmp_path / "ex1.fifo"
    os.mkfifo(fifo)
    code, _, err = check(1, fifo, capsys)
    one_line_exit_2(code, err)
    assert "FIFO" in err
    code = main(["check", "1", "--file", str(path), "--timeout", "0"])
    one_line_exit_2(code, capsys.readouterr()[1])
