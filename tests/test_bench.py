"""The benchmarks keep working: each runs here at a tiny size (figures come from full runs)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench(module: str, *args: str, timeout: float = 900) -> str:
    """Run `python -m bench.<module> args...`; return its stdout (a failure shows its stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_memory_benchmark_runs_and_reports_the_ratio():
    args = ["--rows", "400", "--factor", "2", "--shard-rows", "200", "--file-rows", "200"]
    out = bench("memory", *args, "--check", timeout=600)
    assert "worker peak ratio 2xN / N" in out


def test_training_benchmark_runs_at_smoke_size():
    out = bench("train_pipeline", "--smoke")
    assert "PP2 m=8" in out and "DP2" in out


def test_throughput_benchmark_runs_at_smoke_size():
    out = bench("throughput", "--smoke")
    for row in ("| encoder ", "| Dask overhead", "| generate GPT-2-small", "continuous batching"):
        assert row in out


def test_prompting_benchmark_runs_at_smoke_size():
    out = bench("prompting", "--smoke")
    assert "| prefix reuse:" in out and "| JSON-schema output:" in out


def test_recommend_benchmark_runs_at_smoke_size():
    out = bench("recommend", "--smoke")
    assert "| recommend scoring:" in out and "worker peak ratio" in out


def test_flop_across_run_benchmark_runs_at_smoke_size():
    out = bench("flop_across_run", "--smoke")
    assert "model GFLOP/s by tenth of the run" in out and "in a fresh worker" in out
    assert "worker RSS MiB, the peak of each tenth" in out
