"""analyze.py end to end on a small trained model, and its one-line errors."""
import json
import os
import re

import pytest

from conftest import ROOT, SHAKESPEARE, run_script

from tinylm.analysis.report import SECTIONS


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A tiny model trained for a few seconds with --track_spectra on a slice of Tiny Shakespeare."""
    from tinylm.analysis.tracking import log_spectra
    from tinylm.train.args import TrainArgs
    from tinylm.train.loop import train
    root = tmp_path_factory.mktemp("analyze")
    data = root / "text.txt"
    with open(SHAKESPEARE, encoding="utf-8") as f:
        data.write_text(f.read()[:60_000], encoding="utf-8")
    out = root / "run"
    train(TrainArgs(data=str(data), out_dir=str(out), n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8,
                    max_iters=40, lr_decay_iters=40, warmup_iters=5, eval_interval=20, eval_iters=2,
                    learning_rate=3e-3, sample_tokens=0, progress=False, track_spectra=True), log=lambda *a: None,
          tracker=log_spectra)
    return out


def test_track_spectra_logs_a_line_per_evaluation(tracked_run):
    rows = [json.loads(l) for l in open(tracked_run / "spectra.jsonl")]
    assert [r["step"] for r in rows] == [0, 20, 40]
    assert {"wte", "h1.attn.q", "h1.mlp.c_proj"} <= set(rows[-1]["matrices"])


def test_report_has_every_section_json_and_figures(tracked_run, tmp_path):
    report = tmp_path / "report"
    proc = run_script("analyze.py", tracked_run / "ckpt.npz", "--report", report, "--only", "all", "--compare-init",
                      "--n-boot", "10", "--eval-seqs", "8", "--hessian-k", "1", "--hessian-batch", "2", "--no-progress",
                      env={"OPENBLAS_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    # the terminal table
    assert "stable rk" in proc.stdout and "h1.mlp.c_fc" in proc.stdout and "curvature:" in proc.stdout
    page = (report / "index.html").read_text(encoding="utf-8")
    for name, (title, concepts, where) in SECTIONS.items():
        assert f"id='{name}'" in page and where.split(":")[0] in page
    assert "http://" not in page and "https://" not in page and "<script" not in page      # opens offline
    metrics = json.loads((report / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert set(SECTIONS) <= set(metrics)
    assert metrics["spectra"]["init"]["wte"]["shape"] == [metrics["config"]["vocab_size"], 32]
    assert len(metrics["training"]["spectra"]) == 3
    pytest.importorskip("matplotlib")
    assert page.count("data:image/png;base64,") >= 10
    # Every caption says what to notice and links the tour section that explains it, and that section exists.
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page, re.S)
    assert len(captions) == page.count("data:image/png;base64,")
    with open(os.path.join(ROOT, "docs", "tour.md"), encoding="utf-8") as f:
        headings = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in re.findall(r"^#+ (.+)$", f.read(), re.M)}
    for caption in captions:
        assert "What to notice: " in caption, caption
        link = re.search(r"<a href='([^'#]+)#([\w-]+)'>[^<]*</a>\.$", caption)
        assert link and link.group(2) in headings, caption
        assert os.path.samefile(report / link.group(1), os.path.join(ROOT, "docs", "tour.md")), link.group(1)


def test_default_run_prints_the_table_without_a_report(tracked_run):
    proc = run_script("analyze.py", tracked_run, "--only", "spectra,embeddings", "--n-boot", "0", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].split()[:2] == ["matrix", "shape"]
    assert "embeddings:" in proc.stdout and "circuits:" not in proc.stdout


@pytest.mark.parametrize("args, words", [
    (["missing.npz"], ["not found"]),
    (["DAMAGED"], ["checkpoint"]),
    (["CKPT", "--only", "spectra,bogus"], ["unknown", "bogus"]),
])
def test_errors_are_one_line(tracked_run, tmp_path, args, words):
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes((tracked_run / "ckpt.npz").read_bytes()[:5000])
    args = [str(damaged) if a == "DAMAGED" else str(tracked_run / "ckpt.npz") if a == "CKPT" else a for a in args]
    proc = run_script("analyze.py", *args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr
    assert all(w in lines[0] for w in words), lines[0]


def drawn_text_overlaps(fig):
    """Pairs of panels (i, j) where a title, axis label or drawn tick label of panel i lies on panel j or on
    one of j's texts: what made a colour bar's labels run into the next heat map's axis."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = []
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible() or not ax.axison:
            continue
        def drawn(axis, lim):
            lo, hi = min(lim), max(lim)
            return [t for v, t in zip(axis.get_ticklocs(), axis.get_ticklabels()) if lo - 1e-9 <= v <= hi + 1e-9]
        texts = [ax.title, ax.xaxis.label, ax.yaxis.label] + drawn(ax.xaxis, ax.get_xlim()) + drawn(ax.yaxis, ax.get_ylim())
        panels.append((i, ax.get_window_extent(renderer),
                       [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]))
    return sorted({(i, j) for i, _, boxes in panels for j, frame, other in panels if i != j
                   for b in boxes if b.overlaps(frame) or any(b.overlaps(c) for c in other)})


def test_report_figures_keep_their_text_apart_and_label_the_small_multiples(tracked_run, monkeypatch):
    """The heat maps' colour bars clear of the next panel, and every grid of small panels (spectra, ESDs, OV
    eigenvalues, attention maps) with readable titles and its axes named on the outer panels."""
    pytest.importorskip("matplotlib")
    import tinylm.analysis.report as R
    from tinylm.cli.analyze import analyze_parser, run_analysis
    from tinylm.io.checkpoint import load_checkpoint
    path = str(tracked_run / "ckpt.npz")
    args = analyze_parser().parse_args([path, "--compare-init", "--n-boot", "0", "--eval-seqs", "4", "--no-progress"])
    sections = ["spectra", "circuits", "embeddings"]
    results = run_analysis(load_checkpoint(path), path, sections, args, log=lambda *a: None)
    seen = []

    def check(fig):
        panels = [ax for ax in fig.axes if ax.axison]
        seen.append((getattr(fig, "_many_panels", False), drawn_text_overlaps(fig),
                     min(ax.title.get_fontsize() for ax in panels),
                     any(ax.get_xlabel() for ax in panels) and any(ax.get_ylabel() for ax in panels)))
        return ""
    monkeypatch.setattr(R, "_png", check)
    for name in sections:
        R.section_figures(name, results[name], results)
    assert len(seen) >= 8 and sum(many for many, *_ in seen) >= 4
    for many, overlaps, title_size, labelled in seen:
        assert overlaps == [], overlaps
        if many:
            assert title_size >= 9 and labelled


def test_a_flag_in_a_caption_never_breaks_at_its_hyphens():
    from tinylm.analysis.report import _caption, _caption_html
    page = _caption_html(_caption("Spectra", "run with --compare-init to see which.", "3-linear-transformations"), "tour.md")
    assert "<code class='flag'>--compare-init</code>" in page and page.endswith("</a>.")
    assert "code.flag{white-space:nowrap}" in __import__("tinylm.analysis.report", fromlist=["CSS"]).CSS
