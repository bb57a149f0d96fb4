"""The FLOP fraction across one long run (issue 20, item 4): does a long run slow down by itself
(memory growth, the allocator, long-lived worker state), or does the machine's speed drift?

    python -m bench.flop_across_run --rows 20000 --shards 100
    python -m bench.flop_across_run --smoke          # a tiny size: keeps the script working

One FastServe run (a Dask LocalCluster of 1 worker with every core; sentiment on the DistilBERT-
sized classifier of bench/throughput.py, rows of 5-200 words) while this process samples the
worker's resident memory every few seconds. Each shard's rate comes from its record: the matmul
FLOPs of its rows' real tokens over its model seconds. Then a control: a fresh run (a new worker)
over the rows of the long run's first tenth. If the fresh worker runs those rows as fast as the
long run's first tenth did, the machine held its speed and any slowdown at the end is the run's
own; if the fresh worker is as slow as the long run's last tenth, the machine drifted. The
2048-square matmul rate is measured before the run, after it and after the control.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from fastserve.pipeline.testing import sample_texts, write_texts

from .throughput import build_distilbert, encoder_flops, fastserve_run, matmul_rate


def worker_rss_sampler(stop: threading.Event, out: list, every_s: float) -> None:
    """(seconds, MiB) of the largest child process's RSS (the Dask worker) until `stop`."""
    import psutil

    me, t0 = psutil.Process(), time.time()
    while not stop.wait(every_s):
        rss = []
        for p in me.children(recursive=True):
            try:
                rss.append(p.memory_info().rss)
            except psutil.Error:
                continue
        if rss:
            out.append((time.time() - t0, max(rss) / 2**20))


def shard_rates(folder: Path, row_flops: dict[str, float]) -> list[tuple[float, float, int, list]]:
    """(model start, FLOP/s, rows, ids) per shard of a run folder, in the order they ran."""
    out = []
    for rec_path in (folder / "_manifest" / "shards").glob("*.json"):
        rec = json.loads(rec_path.read_text())
        ids = pq.read_table(folder / rec["output"], columns=["id"]).column("id").to_pylist()
        flops = sum(row_flops[i] for i in ids)
        out.append((rec["model_started"], flops / rec["seconds"]["model"], len(ids), ids))
    return sorted(out)


def rate_of(part) -> float:
    """Rows-weighted FLOP rate of shards."""
    return sum(r * m for _, r, m, _ in part) / sum(m for _, _, m, _ in part)


def tenths(rates: list[tuple[float, float, int]]) -> list[float]:
    """The FLOP rate of each tenth of the run (by shard order), rows-weighted."""
    n = len(rates)
    out = []
    for k in range(10):
        part = rates[k * n // 10 : (k + 1) * n // 10] or rates[-1:]
        out.append(rate_of(part))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--every", type=float, default=5.0, help="RSS sampling period, seconds")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.rows, args.shards, args.every = 60, 10, 0.5
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build_distilbert(tmp / "distilbert", small=args.smoke)
        texts = sample_texts(args.rows, seed=1, min_words=5, max_words=200)
        shard_rows = max(1, args.rows // args.shards)
        # row groups of a shard's size: the planner cuts shards at row groups
        write_texts(tmp / "corpus", texts, files=4, row_group_size=shard_rows)
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        lengths = [len(x) for x in tok(texts, truncation=True, max_length=512)["input_ids"]]
        per = -(-len(texts) // 4)  # write_texts' ids: r<global row number>
        row_flops = {
            f"r{i:07d}": encoder_flops(model, [n]) for i, n in enumerate(lengths) if i // per < 4
        }
        del model
        before = matmul_rate()
        rss: list[tuple[float, float]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=worker_rss_sampler, args=(stop, rss, args.every))
        sampler.start()
        wall, _ = fastserve_run(
            "sentiment",
            model_dir,
            tmp / "corpus",
            tmp / "long",
            shard_rows=shard_rows,
            workers=1,
        )
        stop.set()
        sampler.join()
        after = matmul_rate()
        rates = shard_rates(tmp / "long", row_flops)
        by_tenth = tenths(rates)
        # the control: the long run's first tenth of rows, again, in a fresh worker
        ids = {i for *_, part in rates[: max(1, len(rates) // 10)] for i in part}
        index = {f"r{i:07d}": i for i in range(len(texts))}
        again = [texts[index[i]] for i in sorted(ids)]
        write_texts(tmp / "control-corpus", again, files=1, row_group_size=shard_rows)
        control_flops = {
            f"r{k:07d}": row_flops[i] for k, i in enumerate(sorted(ids)) if i in row_flops
        }
        fastserve_run(
            "sentiment",
            model_dir,
            tmp / "control-corpus",
            tmp / "control",
            shard_rows=shard_rows,
            workers=1,
        )
        control = shard_rates(tmp / "control", control_flops)
        control_rate = rate_of(control)
        last = matmul_rate()

    g = 1e9
    print(f"rows {args.rows}, shards {len(rates)}, wall {wall:.1f} s")
    print(
        f"matmul GFLOP/s: before {before / g:.0f}, after the run {after / g:.0f}, "
        f"after the control {last / g:.0f}"
    )
    print("model GFLOP/s by tenth of the run: " + ", ".join(f"{r / g:.0f}" for r in by_tenth))
    print(
        f"first tenth {by_tenth[0] / g:.0f}, last tenth {by_tenth[-1] / g:.0f} "
        f"({by_tenth[-1] / by_tenth[0]:.2f}x); the first tenth's rows again in a fresh worker: "
        f"{control_rate / g:.0f} ({control_rate / by_tenth[0]:.2f}x the first tenth, "
        f"{control_rate / by_tenth[-1]:.2f}x the last)"
    )
    whole = rate_of(rates)
    print(
        f"FLOP fraction of the whole run: {whole / before:.0%} of the matmul rate before, "
        f"{whole / after:.0%} of the rate after, {whole / statistics.median([before, after, last]):.0%} of the median"
    )
    if rss:
        n = len(rss)
        peaks = [
            max(m for _, m in rss[k * n // 10 : (k + 1) * n // 10] or rss[-1:]) for k in range(10)
        ]
        print(
            "worker RSS MiB, the peak of each tenth of the run: "
            + ", ".join(f"{m:.0f}" for m in peaks)
            + f" ({n} samples)"
        )


if __name__ == "__main__":
    main()
