"""A whole inference run: plan the shards, bind the run folder, run what is not done, account.

    summary = run_infer(job, dask_executor)

Executor-agnostic: `executor_factory(cluster_cfg)` is a context manager giving an object with
`map_unordered(fn, items, key=..., **kwargs)` and `threads` (see pipeline/executors.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import JobConfig
from .fingerprint import fingerprint
from .manifest import RunDir, atomic_write_bytes
from .plan import plan_shards
from .runner import ShardResult, run_shard
from .tasks import check_model


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

    @property
    def ok(self) -> bool:
        return not self.failed and self.shards_done == self.shards_total


def run_infer(
    job: JobConfig,
    executor_factory: Callable,
    on_shard: Callable[[ShardResult, RunSummary], None] | None = None,
    on_start: Callable[[RunSummary, int], None] | None = None,
) -> RunSummary:
    """Run every shard of `job` that is not complete; return the run's totals.

    `on_start(summary, pending)` is called once the cluster is up, `on_shard(result, summary)`
    after each shard, for progress display.
    """
    t0 = time.time()
    check_model(job.model, job.task)
    shards = plan_shards(job.input.paths)
    fp = fingerprint(job)
    run = RunDir.at(job.output.path)
    run.bind(fp, job.output.overwrite)
    records = run.records()
    done_ids = {sid for sid, r in records.items() if r.get("fingerprint") == fp["sha"]}
    pending = [s for s in shards if s.id not in done_ids]
    summary = RunSummary(output=str(run.root), shards_total=len(shards))
    summary.shards_skipped = len(shards) - len(pending)
    if pending:
        run.success.unlink(missing_ok=True)

    with executor_factory(job.cluster) as ex:
        summary.dashboard = getattr(ex, "dashboard_link", None)
        if on_start:
            on_start(summary, len(pending))
        for shard, res in ex.map_unordered(
            run_shard,
            pending,
            key=lambda s: f"shard-{s.id}-{fp['sha']}",
            job=job,
            fingerprint_sha=fp["sha"],
            threads=ex.threads,
        ):
            if isinstance(res, BaseException):
                summary.failed[shard.id] = f"{shard.key}: {type(res).__name__}: {res}"
            elif res.error:
                summary.failed[shard.id] = res.error
            if on_shard and not isinstance(res, BaseException):
                on_shard(res, summary)

    # Totals come from the records on disk, so they cover earlier (resumed) runs too.
    records = run.records()
    for s in shards:
        rec = records.get(s.id)
        if rec is None or rec.get("fingerprint") != fp["sha"]:
            continue
        summary.shards_done += 1
        summary.rows_in += rec["rows_in"]
        summary.rows_out += rec["rows_out"]
        summary.rows_rejected += rec["rows_rejected"]
        summary.tokens += rec["tokens"]
        for reason, n in rec["rejected_by_reason"].items():
            summary.rejected_by_reason[reason] = summary.rejected_by_reason.get(reason, 0) + n
    summary.seconds = time.time() - t0
    history = (run.read_run() or {}).get("runs", [])
    history.append(
        {
            "started": t0,
            "finished": time.time(),
            "shards_processed": len(pending) - len(summary.failed),
            "failed": summary.failed,
        }
    )
    run.update_run(
        runs=history,
        totals={
            "shards": summary.shards_total,
            "shards_done": summary.shards_done,
            "rows_in": summary.rows_in,
            "rows_out": summary.rows_out,
            "rows_rejected": summary.rows_rejected,
            "rejected_by_reason": summary.rejected_by_reason,
            "tokens": summary.tokens,
        },
    )
    if summary.ok:
        atomic_write_bytes(run.success, b"")
    return summary
