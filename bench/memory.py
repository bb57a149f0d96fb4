"""Peak memory of a run over N rows and over 10xN rows: it should depend on shard size only.

    python -m bench.memory                 # N = 20000 rows, factor 10
    python -m bench.memory --rows 500 --factor 2 --shard-rows 250   # the CI smoke size

Runs the real `fastserve infer` (LocalCluster, 2 workers) on a tiny classifier built here, samples
the RSS of every process in its tree every 50 ms, and prints the peak of the largest worker and of
the client, side by side, with the ratio large/small. The invariant: worker peak ratio <= 1.2.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from fastserve.pipeline.testing import sample_texts, write_texts
from fastserve.pipeline.testing.models import build_classifier


def write_corpus(folder: Path, rows: int, file_rows: int) -> None:
    write_texts(folder, sample_texts(rows), files=-(-rows // file_rows), row_group_size=1000)


def peak_rss(cmd: list[str]) -> dict:
    """Run `cmd`; return the peak RSS (MiB) of the client process and of its largest descendant."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    client = worker = 0
    t0 = time.perf_counter()
    while proc.poll() is None:
        try:
            client = max(client, root.memory_info().rss)
            for child in root.children(recursive=True):
                try:
                    worker = max(worker, child.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    err = proc.stderr.read()
    if proc.wait() != 0:
        raise SystemExit(f"run failed: {err}")
    return {"client": client / 2**20, "worker": worker / 2**20, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--shard-rows", type=int, default=5_000)
    ap.add_argument("--file-rows", type=int, default=10_000)
    ap.add_argument("--check", action="store_true", help="exit non-zero when the ratio is over 1.2")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_classifier(tmp / "model")
        results = {}
        for label, rows in (("N", args.rows), (f"{args.factor}xN", args.rows * args.factor)):
            corpus = tmp / f"corpus-{rows}"
            write_corpus(corpus, rows, args.file_rows)
            cmd = [
                sys.executable,
                "-m",
                "jobs",
                "infer",
                "--task",
                "sentiment",
                "--model",
                str(model),
                "--input",
                str(corpus),
                "--output",
                str(tmp / f"out-{rows}"),
                "--workers",
                "2",
                "--shard-rows",
                str(args.shard_rows),
            ]
            results[label] = {"rows": rows, **peak_rss(cmd)}
        small, large = results["N"], results[f"{args.factor}xN"]
        print(
            f"{'run':>6} {'rows':>9} {'worker peak MiB':>16} {'client peak MiB':>16} {'seconds':>8}"
        )
        for label, r in results.items():
            print(
                f"{label:>6} {r['rows']:>9} {r['worker']:>16.1f} {r['client']:>16.1f} {r['seconds']:>8.1f}"
            )
        ratio = large["worker"] / small["worker"]
        print(
            f"worker peak ratio {args.factor}xN / N = {ratio:.3f} (invariant: <= 1.2); "
            f"client ratio = {large['client'] / small['client']:.3f}"
        )
        if args.check and ratio > 1.2:
            sys.exit(f"worker peak grew {ratio:.2f}x with the corpus: over the 1.2 bound")


if __name__ == "__main__":
    main()
