"""`fastserve infer`: bulk inference over a Parquet corpus on Dask.

fastserve infer --task sentiment --model models/sst2 --input corpus/ --output out/
fastserve infer --config job.toml --workers 4
"""

from __future__ import annotations

import signal
import sys
import time

import click

from fastserve.pipeline.config import (
    DEVICES,
    DTYPES,
    EXECUTORS,
    ON_LONG,
    OUTPUT_FORMATS,
    TASKS,
    load_job,
)
from fastserve.pipeline.executors import launch
from fastserve.pipeline.infer import Stop, run_infer
from fastserve.pipeline.slurm_env import SlurmEnv

from .progress import Progress
from .sbatch import LAUNCH_TABLES


def _overrides(**flags) -> dict:
    """Flags the user gave, as nested config tables (unset flags leave the job file's value)."""
    where = {
        "inputs": ("input", "paths"),
        "text_column": ("input", "text_column"),
        "id_column": ("input", "id_column"),
        "keep_columns": ("input", "keep_columns"),
        "shard_rows": ("input", "shard_rows"),
        "model": ("model", "path"),
        "device": ("model", "device"),
        "dtype": ("model", "dtype"),
        "task": ("task", "name"),
        "batch_size": ("task", "batch_size"),
        "max_tokens": ("task", "max_tokens"),
        "max_length": ("task", "max_length"),
        "on_long": ("task", "on_long"),
        "output": ("output", "path"),
        "overwrite": ("output", "overwrite"),
        "output_format": ("output", "format"),
        "output_schema": ("output", "schema"),
        "workers": ("cluster", "workers"),
        "threads_per_worker": ("cluster", "threads_per_worker"),
        "scheduler_address": ("cluster", "scheduler_address"),
        "host": ("cluster", "host"),
        "interface": ("cluster", "interface"),
        "executor": ("cluster", "executor"),
    }
    out: dict = {}
    for name, value in flags.items():
        if value is None or value == () or value is False:
            continue
        table, key = where[name]
        out.setdefault(table, {})[key] = list(value) if isinstance(value, tuple) else value
    return out


@click.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="TOML job file; flags override it.",
)
@click.option("--task", type=click.Choice(TASKS), help="What to run.")
@click.option("--model", help="Local model folder (Hugging Face checkpoint).")
@click.option(
    "--input",
    "inputs",
    multiple=True,
    help="Parquet file, folder or glob (repeatable); or Batch-API request files (.jsonl).",
)
@click.option("--output", help="Run folder to write (resumable).")
@click.option("--text-column", help="Column holding the text [text].")
@click.option("--id-column", help="Column holding row ids [id if present, else file:row].")
@click.option(
    "--keep-column",
    "keep_columns",
    multiple=True,
    help="Input column to copy to the output (repeatable).",
)
@click.option(
    "--shard-rows", type=int, help="Rows per shard (the unit of work and memory) [100000]."
)
@click.option(
    "--batch-size",
    type=int,
    help="Most rows per model call [sentiment, embed: 256; generate (decode slots), translate: 32].",
)
@click.option(
    "--max-tokens",
    type=int,
    help="sentiment, embed: most padded tokens per model call [2048 on CPU, 16384 on GPU].",
)
@click.option("--max-length", type=int, help="Longest input in tokens [the model's limit].")
@click.option(
    "--on-long",
    type=click.Choice(ON_LONG),
    help="Over-long text: truncate (flagged) or reject [truncate].",
)
@click.option("--device", type=click.Choice(DEVICES), help="[auto]")
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    help="int8: CPU, encoder tasks, checked against float32 on each worker's first rows "
    "[auto: float32 on cpu, bfloat16 on cuda].",
)
@click.option("--workers", type=int, help="Dask worker processes to start [2].")
@click.option("--threads-per-worker", type=int, help="Torch threads per worker [cores / workers].")
@click.option("--scheduler-address", help="Use a running Dask scheduler instead of starting one.")
@click.option("--host", help="Interface a started scheduler listens on [127.0.0.1].")
@click.option(
    "--interface",
    help="Across Slurm nodes: the network interface Dask uses (e.g. ib0) [the host name's address].",
)
@click.option(
    "--executor",
    type=click.Choice(EXECUTORS),
    help="local (a LocalCluster), slurm (SLURMRunner inside an srun step), mpi (dask-mpi) or serial (no Dask: this process, one shard at a time) [local].",
)
@click.option(
    "--overwrite", is_flag=True, default=None, help="Replace a run made with another config."
)
@click.option(
    "--output-format",
    type=click.Choice(OUTPUT_FORMATS),
    help="batch-jsonl: also write Batch-API responses (_batch/results.jsonl, errors.jsonl) [parquet].",
)
@click.option(
    "--output-schema",
    type=int,
    help="Write version N of the task's output schema (data_schemas/<task>.vN.json) [the newest; a rerun keeps its folder's].",
)
def infer(config_file, **flags) -> None:
    """Run a task over a Parquet corpus; write one Parquet file per input shard.

    Rerunning the same command resumes: finished shards are skipped, new input files are done.
    """
    job = load_job(config_file, _overrides(**flags), other_tables=LAUNCH_TABLES)
    # executor slurm/mpi: the scheduler's and workers' tasks never enter the `with` body; the
    # client's does, and whatever way it ends, they end too (the step ends with its exit code)
    with launch(job.cluster) as executor_factory:
        _run(job, executor_factory)


def _nested(job, executor_factory, stop: Stop):
    """A run the job needs first (recommend: its catalogue's embeddings), with its own progress."""
    click.echo(f"first, task {job.task.name} over {', '.join(job.input.paths)}:", err=True)
    progress = Progress()
    summary = run_infer(
        job, executor_factory, on_shard=progress.shard, on_start=progress.start, stop=stop
    )
    progress.finish(summary)
    return summary


def process_started() -> float | None:
    """When this process started (epoch seconds): the command's start, the origin of its
    start-up figures (None where it cannot be told)."""
    try:  # the process's age from the boot clock (/proc/self/stat's start tick, /proc/uptime):
        # exact to a tick, where psutil's create_time adds a boot time rounded to the second
        import os

        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _run(job, executor_factory) -> None:
    progress = Progress()
    stop = Stop()

    def on_signal(signum, frame):
        stop.request(signum)
        what = (
            "abandoning running shards"
            if stop.level > 1
            else "finishing running shards (signal again to abandon)"
        )
        click.echo(f"{signal.Signals(signum).name}: no new shards; {what}", err=True)

    # SIGINT (Ctrl-C), SIGTERM (kill, scancel), SIGUSR1 (Slurm's warning before a time limit)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, on_signal)
    # Slurm facts: an array task does its share of the shards, and the job id is kept in the
    # run's entry (_manifest/runs/) for `fastserve status`.
    slurm = SlurmEnv.read()
    launcher = {"slurm_job_id": slurm.job_id} if slurm.job_id else {}
    summary = run_infer(
        job,
        executor_factory,
        on_shard=progress.shard,
        on_start=progress.start,
        stop=stop,
        share=slurm.share,
        launcher=launcher,
        nested=lambda nested_job: _nested(nested_job, executor_factory, stop),
        started=process_started(),
    )
    progress.finish(summary)
    for note in summary.notes:
        click.echo(f"note: {note}", err=True)
    if summary.failed:
        files = sum(k.startswith("file ") for k in summary.failed)
        click.secho(
            f"{files} input file(s) and {len(summary.failed) - files} shard(s) failed; "
            "the rest is complete:",
            err=True,
            fg="red",
        )
        for reason in summary.failed.values():
            click.echo(f"  {reason}", err=True)
        click.echo(
            "Fix those inputs (or leave them out) and rerun the same command: a fixed file is "
            "planned again, the rest is not redone.",
            err=True,
        )
    if summary.interrupted:
        click.echo(
            "interrupted: completed shards are kept; rerun the same command to finish.", err=True
        )
        sys.exit(128 + (stop.signal or signal.SIGINT))
    if summary.failed:
        sys.exit(1)
