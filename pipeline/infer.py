"""A whole inference run: plan the shards, bind the run folder, run what is not done, account.

    summary = run_infer(job, dask_executor)

Executor-agnostic: `executor_factory(cluster_cfg)` is a context manager giving an object with
`map_unordered(fn, items, key=..., stop=..., **kwargs)` and `threads` (pipeline/executors.py).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import JobConfig
from .dedupe import find_duplicates, pending_hashes, written_hashes
from .fingerprint import fingerprint
from .manifest import RunDir, atomic_write_bytes, atomic_write_json
from .plan import plan_run, resolve_inputs
from .runner import ShardResult, run_shard, warm
from .tasks import check_model


class Stop:
    """How hard a run has been asked to stop: 0 go on, 1 drain (no new shards), 2 abandon.

    Signal handlers raise the level; the executor reads it between completions.
    """

    def __init__(self) -> None:
        self.level = 0
        self.signal: int | None = None

    def request(self, signum: int | None = None) -> None:
        self.level = min(2, self.level + 1)
        self.signal = self.signal or signum


@dataclass
class RunSummary:
    output: str
    shards_total: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    """shard id -> reason, for shards that could not be processed."""
    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    dashboard: str | None = None
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted and self.shards_done == self.shards_total


def run_infer(
    job: JobConfig,
    executor_factory: Callable,
    on_shard: Callable[[ShardResult, RunSummary], None] | None = None,
    on_start: Callable[[RunSummary, int], None] | None = None,
    stop: Stop | None = None,
    share: tuple[int, int] = (0, 1),
    launcher: dict | None = None,
) -> RunSummary:
    """Run every shard of `job` that is not complete; return the run's totals.

    `share=(k, n)`: this process does the shards whose plan index is k modulo n (array tasks
    splitting one run folder; each shard has one owner, so each row is written once).
    `launcher`: facts about what started the run (e.g. a Slurm job id), kept in run.json.

    `on_start(summary, pending)` is called once the cluster is up, `on_shard(result, summary)`
    after each shard, for progress display. Raising `stop.level` drains or abandons the run;
    what is complete stays complete and a rerun does the rest.
    """
    t0 = time.time()
    stop = stop or Stop()
    check_model(job.model, job.task)
    files = resolve_inputs(job.input.paths)
    fp = fingerprint(job)
    run = RunDir.at(job.output.path)
    run.bind(fp, job.output.overwrite)
    shards = plan_run(run.plan_dir, files, job.input.text_column, job.input.shard_rows)
    records = run.records()
    done = [s for s in shards if records.get(s.id, {}).get("fingerprint") == fp["sha"]]
    mine = {s.id for i, s in enumerate(shards) if i % share[1] == share[0]}
    pending = [s for s in shards if s not in done and s.id in mine]
    summary = RunSummary(output=str(run.root), shards_total=len(shards), shards_skipped=len(done))
    if pending:
        run.success.unlink(missing_ok=True)
    run.update_run(
        active={"started": t0, "pid": os.getpid(), "host": socket.gethostname(), **(launcher or {})}
    )

    this_run = dict.fromkeys(("shards", "rows_in", "rows_out", "rows_rejected", "tokens"), 0)
    token = uuid.uuid4().hex[:8]  # task keys unique to this run, even on a shared scheduler
    with executor_factory(job.cluster) as ex:
        summary.dashboard = getattr(ex, "dashboard_link", None)
        warming = (
            ex.on_each_worker(warm, f"warm-{token}", job=job, threads=ex.threads) if pending else []
        )
        duplicates = _duplicates(ex, run, done, pending, job, stop, token) if pending else {}
        if on_start:
            on_start(summary, len(pending))
        for shard, res in ex.map_unordered(
            run_shard,
            pending,
            key=lambda s: f"shard-{s.id}-{token}",
            stop=stop,
            job=job,
            fingerprint_sha=fp["sha"],
            threads=ex.threads,
            per_item={"duplicates": lambda s: duplicates.get(s.id, {})},
        ):
            if isinstance(res, BaseException):
                if not stop.level:
                    summary.failed[shard.id] = f"{shard.sources}: {type(res).__name__}: {res}"
                continue
            if res.error:
                summary.failed[shard.id] = res.error
            else:
                this_run["shards"] += 1
                for k in ("rows_in", "rows_out", "rows_rejected", "tokens"):
                    this_run[k] += getattr(res, k)
            if on_shard:
                on_shard(res, summary)
        del warming  # loaded or not, the shards are done with
    summary.interrupted = stop.level > 0

    _totals(summary, run, shards, fp["sha"])
    summary.seconds = time.time() - t0
    history = (run.read_run() or {}).get("runs", [])
    entry = {
        "started": t0,
        "finished": time.time(),
        "shards_pending": len(pending),
        "processed": this_run,
        "failed": summary.failed,
        "interrupted": summary.interrupted,
        "share": list(share),
        **(launcher or {}),
    }
    history.append(entry)
    totals = {
        "shards": summary.shards_total,
        "shards_done": summary.shards_done,
        "rows_in": summary.rows_in,
        "rows_out": summary.rows_out,
        "rows_rejected": summary.rows_rejected,
        "rejected_by_reason": summary.rejected_by_reason,
        "tokens": summary.tokens,
    }
    run.update_run(active=None, runs=history, totals=totals)
    # A dated summary per run (what a nightly run did), beside the cumulative totals.
    stamp = time.strftime("%Y-%m-%dT%H%M%S", time.localtime(t0))
    atomic_write_json(
        run.summaries_dir / f"{stamp}-{os.getpid()}.json",
        {**entry, "task": job.task.name, "complete": summary.ok, "totals": totals},
    )
    if summary.ok:
        atomic_write_bytes(run.success, b"")
    return summary


def _duplicates(ex, run: RunDir, done, pending, job: JobConfig, stop: Stop, token: str) -> dict:
    """The corpus-wide duplicate-id pass, its reading fanned out on the executor."""
    outputs = [str(run.output_path(s.id)) for s in done]
    written = [
        h
        for _, h in ex.map_unordered(
            written_hashes, outputs, key=lambda p: f"ids-{os.path.basename(p)}-{token}", stop=stop
        )
        if not isinstance(h, BaseException)
    ]
    got = dict(
        ex.map_unordered(
            pending_hashes, pending, key=lambda s: f"ids-{s.id}-{token}", stop=stop, cfg=job.input
        )
    )
    ordered = [(s, got.get(s)) for s in pending]
    return find_duplicates(
        written, [(s, h if not isinstance(h, BaseException) else None) for s, h in ordered]
    )


def _totals(summary: RunSummary, run: RunDir, shards, sha: str) -> None:
    """Totals from the records on disk, so they cover earlier (resumed) runs too."""
    records = run.records()
    for s in shards:
        rec = records.get(s.id)
        if rec is None or rec.get("fingerprint") != sha:
            continue
        summary.shards_done += 1
        summary.rows_in += rec["rows_in"]
        summary.rows_out += rec["rows_out"]
        summary.rows_rejected += rec["rows_rejected"]
        summary.tokens += rec["tokens"]
        for reason, n in rec["rejected_by_reason"].items():
            summary.rejected_by_reason[reason] = summary.rejected_by_reason.get(reason, 0) + n
