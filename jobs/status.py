"""`fastserve status OUTPUT_DIR`: what a run folder holds, during a run or after it.

fastserve status out/
"""

from __future__ import annotations

import time

import click

from fastserve.pipeline.counts import Counts
from fastserve.pipeline.errors import UserError
from fastserve.pipeline.ledger import complete_records, read_ledger
from fastserve.pipeline.manifest import RunDir

from .progress import usage_line
from .slurm_job import job_state


@click.command()
@click.argument("output", type=click.Path(file_okay=False))
def status(output: str) -> None:
    """Summarise a run folder: shards done, rows in/out/rejected, failures, fingerprint."""
    run = RunDir.at(output)
    info = run.read_run()
    if info is None:
        raise UserError(f"{output} is not a FastServe run folder (no _manifest/run.json)")
    fp = info["fingerprint"]
    ledger = read_ledger(run.plan_dir)
    records = complete_records(run, fp["sha"])
    t = Counts.total(records.values())
    rows_in, rows_out, rejected, model_s = (
        t.rows_in,
        t.rows_out,
        t.rejected_by_reason,
        t.model_seconds,
    )
    planned_rows = sum(s.rows for s in ledger.live)
    runs = sorted(run.run_entries(), key=lambda e: e.get("started", 0))
    ended = [e for e in runs if "finished" in e]
    last = runs[-1] if runs else {}
    if run.success.exists():
        state = "complete (_SUCCESS)"
    elif last and "finished" not in last:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["started"]))
        state = f"running since {started} (pid {last['pid']} on {last['host']}), or killed then"
    elif ended and ended[-1].get("interrupted"):
        state = "incomplete: the last run was interrupted; rerun the same command to finish"
    else:
        state = "incomplete: rerun the same command to finish"
    f = fp["fields"]
    click.echo(f"run folder   {output}")
    click.echo(
        f"fingerprint  {fp['sha']}  (task {f['task']}, model {f['model']}, schema {f['schema']})"
    )
    click.echo(f"state        {state}")
    click.echo(f"shards       {len(records)} of {len(ledger.live)} complete")
    click.echo(
        f"rows         in {rows_in} of {planned_rows} planned = out {rows_out} + rejected {sum(rejected.values())}"
    )
    if rejected:
        click.echo("rejected     " + ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())))
    if t.usage:
        click.echo("usage        " + usage_line(t.usage))
    if model_s > 0:
        click.echo(f"throughput   {rows_in / model_s:.1f} rows/s of model time")
    if records:
        last = max(r["finished"] for r in records.values())
        click.echo(f"last shard   {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last))}")
    for what, reason in ((ended[-1] if ended else {}).get("failed") or {}).items():
        click.echo(f"failed       {what}: {reason}")
    if ledger.retracted:
        click.echo(f"withdrawn    {len(ledger.retracted)} shard(s) (changed files, re-planned)")
    jobs = [r["slurm_job_id"] for r in runs if r.get("slurm_job_id")]
    for job_id in dict.fromkeys(jobs):
        click.echo(f"slurm job   {job_id}: {job_state(job_id)}")
