"""`fastserve status OUTPUT_DIR`: what a run folder holds, during a run or after it.

fastserve status out/
"""

from __future__ import annotations

import click

from pipeline.errors import UserError
from pipeline.manifest import RunDir


@click.command()
@click.argument("output", type=click.Path(file_okay=False))
def status(output: str) -> None:
    """Summarise a run folder: shards done, rows in/out/rejected, failures, fingerprint."""
    run = RunDir.at(output)
    info = run.read_run()
    if info is None:
        raise UserError(f"{output} is not a FastServe run folder (no _manifest/run.json)")
    records = run.records()
    fp = info["fingerprint"]
    rows_in = sum(r["rows_in"] for r in records.values())
    rows_out = sum(r["rows_out"] for r in records.values())
    rejected = sum(r["rows_rejected"] for r in records.values())
    model_s = sum(r["seconds"].get("model", 0) for r in records.values())
    totals = info.get("totals", {})
    click.echo(f"run folder   {output}")
    click.echo(
        f"fingerprint  {fp['sha']}  (task {fp['fields']['task']}, schema {fp['fields']['schema']})"
    )
    click.echo(
        f"state        {'complete (_SUCCESS)' if run.success.exists() else 'incomplete or running'}"
    )
    click.echo(
        f"shards       {len(records)} complete"
        + (f" of {totals['shards']} planned" if "shards" in totals else "")
    )
    click.echo(f"rows         in {rows_in} = out {rows_out} + rejected {rejected}")
    if model_s > 0:
        click.echo(f"throughput   {rows_in / model_s:.1f} rows/s of model time")
    last = (info.get("runs") or [{}])[-1]
    for sid, reason in (last.get("failed") or {}).items():
        click.echo(f"failed       {sid}: {reason}")
