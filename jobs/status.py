"""`fastserve status OUTPUT_DIR`: what a run folder holds, during a run or after it.

fastserve status out/
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from fastserve.pipeline.counts import Counts
from fastserve.pipeline.errors import UserError
from fastserve.pipeline.ledger import complete_records, read_ledger
from fastserve.pipeline.manifest import RunDir
from fastserve.pipeline.models.int8_check import describe as describe_int8
from fastserve.pipeline.models.int8_check import summarize as summarize_int8

from .progress import startup_line, usage_line
from .slurm_job import job_state


@click.command()
@click.argument("output", type=click.Path(file_okay=False))
def status(output: str) -> None:
    """Summarise a run folder: shards done, rows in/out/rejected, failures, fingerprint."""
    run = RunDir.at(output)
    info = run.read_run()
    if info is None and training_run(Path(output)):
        return training_status(Path(output))
    if info is None:
        raise UserError(
            f"{output} is not a FastServe run folder (no _manifest/run.json of an inference run, "
            "no metrics.jsonl or checkpoints/ of a training run)"
        )
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
    dtype = f.get("model.dtype")
    click.echo(
        f"fingerprint  {fp['sha']}  (task {f['task']}, model {f['model']}"
        + (f", dtype {dtype}" if dtype not in (None, "auto") else "")
        + f", schema {f['schema']})"
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
    check = summarize_int8(records.values())
    if check:
        click.echo("int8 check   " + describe_int8(check, check["threshold"]))
    if model_s > 0:
        click.echo(f"throughput   {rows_in / model_s:.1f} rows/s of model time")
    started = [e for e in ended if (e.get("startup") or {}).get("first_batch")]
    if started:
        click.echo(f"start-up     {startup_line(started[-1]['startup'])} (last run that ran one)")
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


def training_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("metrics.jsonl", "checkpoints", "runs.jsonl"))


def _lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill
    return out


def training_status(folder: Path) -> None:
    """A training run folder: steps done, the last losses, checkpoints, export, Slurm jobs."""
    from fastserve.pipeline.training.checkpoints import latest_complete

    metrics, starts = _lines(folder / "metrics.jsonl"), _lines(folder / "runs.jsonl")
    target = starts[-1]["steps"] if starts else None
    done = metrics[-1]["step"] if metrics else 0
    last = latest_complete(folder)
    exported = any((folder / "export" / f).exists() for f in ("fastserve.json", "config.json"))
    click.echo(f"run folder   {folder} (training)")
    if starts:
        layout = starts[-1].get("layout") or {}
        click.echo(
            f"layout       dp {layout.get('dp', 1)} x tp {layout.get('tp', 1)} x pp "
            f"{layout.get('pp', 1)} ({starts[-1]['world_size']} rank{'s' if starts[-1]['world_size'] != 1 else ''})"
        )
    click.echo(f"steps        {done}" + (f" of {target}" if target else "") + " done")
    if metrics:
        m = metrics[-1]
        line = f"last loss    {m['loss']:.4f} at step {m['step']}"
        evals = [x for x in metrics if "val_loss" in x]
        if evals:
            line += f"; validation {evals[-1]['val_loss']:.4f} at step {evals[-1]['step']}"
        click.echo(line)
    kept = sorted(p.parent.name for p in (folder / "checkpoints").glob("step-*/COMPLETE"))
    click.echo("checkpoints  " + (", ".join(kept) + " (complete)" if kept else "none"))
    if exported and (target is None or done >= target):
        state = f"complete: exported to {folder / 'export'}"
    elif starts and not exported:
        resume = f"from {last.name}" if last else "from the start (no complete checkpoint)"
        state = f"incomplete (or running): the same command resumes {resume}"
    else:
        state = "incomplete"
    click.echo(f"state        {state}")
    jobs = [s["slurm_job_id"] for s in starts if s.get("slurm_job_id")]
    for job_id in dict.fromkeys(jobs):
        click.echo(f"slurm job   {job_id}: {job_state(job_id)}")
