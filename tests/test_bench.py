"""The benchmarks keep working: each runs here at a tiny size (figures come from full runs)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_memory_benchmark_runs_and_reports_the_ratio():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.memory",
            "--rows",
            "400",
            "--factor",
            "2",
            "--shard-rows",
            "200",
            "--file-rows",
            "200",
            "--check",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "worker peak ratio 2xN / N" in proc.stdout


def test_training_benchmark_runs_at_smoke_size():
    proc = subprocess.run(
        [sys.executable, "-m", "bench.train_pipeline", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    assert "PP2 m=8" in proc.stdout and "DP2" in proc.stdout


def test_throughput_benchmark_runs_at_smoke_size():
    proc = subprocess.run(
        [sys.executable, "-m", "bench.throughput", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    for row in ("| encoder ", "| Dask overhead", "| generate GPT-2-small", "continuous batching"):
        assert row in proc.stdout
