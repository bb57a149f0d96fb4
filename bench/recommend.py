"""recommend: the scoring loop against a bare matmul, and peak memory as the catalogue grows.

    python -m bench.recommend            # 2048 queries x 100 000 items (d=384); memory: 20k vs 200k items
    python -m bench.recommend --smoke    # the CI size

1. Scoring rate: the same queries and items (in memory, float32), scored block by block by
   recommend's running top-k (tasks/topk.py), against the same blocked matmul with no top-k and
   against one whole matmul: ratios, same process, same threads, best of --rounds.
2. Peak memory: the real `fastserve infer --task recommend` (one worker) over a catalogue of N and
   of 10xN vectors in Parquet, with a fixed block size: the worker's peak RSS side by side (it
   should not grow with the catalogue: the vectors are read a block at a time).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fastserve.pipeline.tasks.topk import RunningTopK, query_block


def scoring(q: torch.Tensor, v: torch.Tensor, block: int, k: int, top: bool) -> float:
    t0 = time.perf_counter()
    running = RunningTopK(len(q), k, np.arange(len(v))) if top else None
    step = query_block(block)
    for i0 in range(0, len(v), block):
        vb = v[i0 : i0 + block]
        for q0 in range(0, len(q), step):
            s = q[q0 : q0 + step] @ vb.T
            if running is not None:
                running.offer(q0, s, i0)
    return time.perf_counter() - t0


def rate_table(n_queries: int, n_items: int, dim: int, block: int, k: int, rounds: int) -> list:
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(n_queries, dim, generator=g), dim=1)
    v = torch.nn.functional.normalize(torch.randn(n_items, dim, generator=g), dim=1)
    flops = 2 * n_queries * n_items * dim
    bare = min(scoring(q, v, block, k, top=False) for _ in range(rounds))
    ours = min(scoring(q, v, block, k, top=True) for _ in range(rounds))
    whole = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        _ = q @ v.T
        whole.append(time.perf_counter() - t0)
    one = min(whole)
    return [
        ("one whole matmul (no top-k)", one, flops / one / 1e9, 1.0),
        (f"blocked matmul, {block} items/block (no top-k)", bare, flops / bare / 1e9, one / bare),
        (
            f"recommend scoring: blocked matmul + running top-{k}",
            ours,
            flops / ours / 1e9,
            one / ours,
        ),
    ]


def write_catalogue(folder: Path, n: int, dim: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = 20_000
    for f in range(-(-n // per)):
        m = min(per, n - f * per)
        vec = rng.standard_normal((m, dim), dtype=np.float32)
        col = pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), dim)
        ids = [f"item-{f}-{i}" for i in range(m)]
        table = pa.table({"id": ids, "embedding": col.cast(pa.list_(pa.float32()))})
        pq.write_table(table, folder / f"part-{f:03d}.parquet", row_group_size=5000)


def memory_table(n_items: int, factor: int, dim: int, block: int, queries: int) -> list:
    from bench.memory import peak_rss
    from fastserve.pipeline.testing import toml_text

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_catalogue(root / "q", queries, dim, seed=1)
        for n in (n_items, n_items * factor):
            write_catalogue(root / f"cat{n}", n, dim, seed=2)
            job = root / f"job{n}.toml"
            task = {"name": "recommend", "k": 10, "block_items": block,
                    "catalogue": str(root / f"cat{n}"), "catalogue_embedding_column": "embedding",
                    "embedding_column": "embedding"}  # fmt: skip
            job.write_text(toml_text({"task": task}))
            cmd = [sys.executable, "-m", "fastserve.jobs", "infer", "--task", "recommend",
                   "--input", str(root / "q"), "--output", str(root / f"out{n}"),
                   "--config", str(job), "--workers", "1"]  # fmt: skip
            got = peak_rss(cmd)
            size = n * dim * 4 / 2**20
            rows.append((n, size, got["worker"], got["client"], got["seconds"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=2048)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--block", type=int, default=8192)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory-items", type=int, default=20_000)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="a tiny size, to show it runs")
    args = ap.parse_args()
    if args.smoke:
        args.queries, args.items, args.dim, args.block = 64, 3000, 32, 500
        args.rounds, args.memory_items, args.factor = 1, 500, 2
    print(f"torch threads: {torch.get_num_threads()}")
    print(
        f"\n## Scoring: {args.queries} queries x {args.items} items, d={args.dim}, best of {args.rounds}\n"
    )
    print("| scoring | seconds | GFLOP/s | rate vs one matmul |")
    print("|---|---|---|---|")
    for name, sec, gflops, ratio in rate_table(
        args.queries, args.items, args.dim, args.block, args.k, args.rounds
    ):
        print(f"| {name} | {sec:.3f} | {gflops:.1f} | {ratio:.2f}x |")
    print(f"\n## Peak memory, catalogue N vs {args.factor}xN, block_items={args.block}\n")
    print("| items | vectors MiB | worker peak MiB | client peak MiB | seconds |")
    print("|---|---|---|---|---|")
    mem = memory_table(args.memory_items, args.factor, args.dim, args.block, 256)
    for n, size, worker, client, sec in mem:
        print(f"| {n:,} | {size:,.0f} | {worker:,.0f} | {client:,.0f} | {sec:.1f} |")
    print(f"\nworker peak ratio {args.factor}xN / N: {mem[1][2] / mem[0][2]:.2f} "
          f"(catalogue {args.factor}x larger)")  # fmt: skip


if __name__ == "__main__":
    main()
