"""Progress for a run: a live bar on a terminal, plain periodic lines in a batch job's log."""

from __future__ import annotations

import sys
import time

import click

from fastserve.pipeline.infer import RunSummary
from fastserve.pipeline.runner import ShardResult


class Progress:
    def __init__(self, every_s: float = 30.0, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s
        self.rows = 0
        self.shards = 0
        self.total = 0
        self.t0 = time.time()
        self.last = 0.0
        self.bar = None

    def start(self, summary: RunSummary, pending: int) -> None:
        """The run's shards are known (called again when shards are planned again mid-run)."""
        if self.total:  # a second round: shards of a failed shard's readable files, packed again
            self.total += pending
            click.echo(f"re-planned: {pending} more shard(s) to do", err=True)
            if self.bar is not None:
                self.bar.update(self.task, total=self.total)
            return
        self.total = pending
        self.t0 = time.time()
        click.echo(
            f"run folder {summary.output}: {summary.shards_total} shards, "
            f"{summary.shards_skipped} already complete, {pending} to do",
            err=True,
        )
        if summary.dashboard:
            click.echo(f"Dask dashboard: {summary.dashboard}", err=True)
        if self.tty and pending:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(
                TextColumn("shards"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rows]} rows  {task.fields[rate]} rows/s"),
                TimeRemainingColumn(),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("infer", total=pending, rows=0, rate="-")

    def shard(self, res: ShardResult, summary: RunSummary) -> None:
        self.shards += 1
        self.rows += res.rows_in
        elapsed = max(time.time() - self.t0, 1e-9)
        rate = f"{self.rows / elapsed:.1f}"
        if self.bar is not None:
            self.bar.update(self.task, advance=1, rows=self.rows, rate=rate)
        elif time.time() - self.last >= self.every_s or self.shards == self.total:
            self.last = time.time()
            eta = (self.total - self.shards) * elapsed / self.shards
            click.echo(
                f"progress: {self.shards}/{self.total} shards, {self.rows} rows, {rate} rows/s, "
                f"eta {eta:.0f}s",
                err=True,
            )

    def finish(self, s: RunSummary) -> None:
        if self.bar is not None:
            self.bar.stop()
        t = s.totals
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(t.rejected_by_reason.items()))
        click.echo(
            f"{'complete' if s.ok else 'incomplete'}: {t.shards}/{s.shards_total} shards, "
            f"rows in {t.rows_in} = out {t.rows_out} + rejected {t.rows_rejected}"
            + (f" ({reasons})" if reasons else "")
            + f"; {s.seconds:.1f}s"
            + (f" (start-up {s.startup['first_batch']:.1f}s)" if "first_batch" in s.startup else "")
            + f" -> {s.output}"
        )
        if t.usage:
            click.echo(usage_line(t.usage))


def startup_line(startup: dict[str, float]) -> str:
    """A run's start-up: from the command to its first batch in the model, and where it went
    (seconds from the command's start; the workers start while the client plans)."""
    labels = (("config", "config read"), ("planned", "planned"), ("cluster", "workers up"))
    parts = [f"{label} at {startup[key]:.1f}s" for key, label in labels if key in startup]
    if "load" in startup:
        parts.append(f"model loaded on them in {startup['load']:.1f}s")
    head = (
        f"{startup['first_batch']:.1f}s from the command to the first batch"
        if "first_batch" in startup
        else "no batch ran"
    )
    return f"{head} ({', '.join(parts)})"


def usage_line(usage: dict[str, int]) -> str:
    """Tokens as a hosted Batch API would bill them, and constrained rows that did not complete."""
    line = (
        f"tokens: prompt {usage.get('prompt_tokens', 0)} + completion "
        f"{usage.get('completion_tokens', 0)}"
    )
    if usage.get("unparsed"):
        line += (
            f"; {usage['unparsed']} row(s) ended before their output was complete (parsed_ok false)"
        )
    return line
