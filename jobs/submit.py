"""`fastserve submit`: render an sbatch script from a job file's [slurm] table and submit it.

fastserve submit infer job.toml --dry-run      # print the script
fastserve submit infer job.toml                # sbatch it; prints the job id
fastserve submit train train.toml --wait       # and wait for it (exit code of the job)
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from fastserve.pipeline.config import INFER_PATH_KEYS, load_job, read_job_file
from fastserve.pipeline.errors import ConfigError
from fastserve.pipeline.training.config import PATH_KEYS as TRAIN_PATH_KEYS
from fastserve.pipeline.training.config import load_train_job

from .sbatch import LAUNCH_TABLES, check_fits, render, slurm_config, train_tasks
from .slurm_job import node_cpus, submit_script


def kind_of(job_file: str) -> str:
    """infer or train, by the tables of the job file."""
    raw = read_job_file(job_file)
    if "input" in raw:
        return "infer"
    if "data" in raw or "parallel" in raw:
        return "train"
    raise ConfigError(f"{job_file}: neither an infer job ([input]) nor a train job ([data])")


def fastserve_command() -> str:
    """How a job script runs FastServe: this interpreter, so the job sees the same install."""
    return f"{shlex.quote(sys.executable)} -m fastserve.jobs"


def prepare(
    kind: str,
    job_file: str,
    dependency: str | None = None,
    after: str = "",
    check_cluster: bool = False,
) -> str:
    """Validate the job file for `kind` and render its script (the command: this interpreter).
    `check_cluster`: also refuse a job the cluster's nodes cannot hold (asks sinfo)."""
    raw = read_job_file(job_file, INFER_PATH_KEYS if kind == "infer" else TRAIN_PATH_KEYS)
    cfg = slurm_config(
        {**raw.get("slurm", {}), **({"dependency": dependency} if dependency else {})}, job_file
    )
    if cfg.array and kind != "infer":
        raise ConfigError(
            f"{job_file}: slurm.array splits an inference run; a train job takes none"
        )
    load = load_job if kind == "infer" else load_train_job
    job = load(job_file, other_tables=LAUNCH_TABLES)  # the job must be valid
    if kind == "train":
        p = job.parallel
        cfg = train_tasks(cfg, p.dp * p.tp * p.pp, job_file)
    if check_cluster:
        check_fits(cfg, node_cpus(cfg.partition), job_file)
    return render(kind, cfg, str(Path(job_file).resolve()), fastserve_command(), after)


def write_script(kind: str, job_file: str, script: str) -> Path:
    folder = Path(job_file).resolve().parent / ".fastserve-sbatch"
    folder.mkdir(exist_ok=True)
    path = folder / f"{Path(job_file).stem}-{kind}.sbatch"
    path.write_text(script)
    return path


@click.command()
@click.argument("kind", type=click.Choice(["infer", "train", "pipeline"]))
@click.argument("job_files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the sbatch script(s); submit nothing.")
@click.option(
    "--wait", is_flag=True, help="Wait for the (last) job to end; exit with its exit code."
)
def submit(kind: str, job_files: tuple[str, ...], dry_run: bool, wait: bool) -> None:
    """Submit job files to Slurm: `infer JOB`, `train JOB`, or `pipeline JOB JOB...` (a chain,
    e.g. train then infer on its export: each starts after the previous one succeeded, and a
    failure cancels the rest)."""
    if kind != "pipeline" and len(job_files) != 1:
        raise ConfigError(f"submit {kind} takes one job file; use `submit pipeline` for a chain")
    kinds = [kind_of(f) if kind == "pipeline" else kind for f in job_files]
    if not dry_run:  # every job of a chain is checked before the first one is submitted
        for i, (k, job_file) in enumerate(zip(kinds, job_files, strict=True)):
            prepare(k, job_file, "afterok:1" if i else None, check_cluster=True)
    previous: str | None = None
    for i, job_file in enumerate(job_files):
        k = kinds[i]
        dependency = (
            f"afterok:{previous}"
            if previous and not dry_run
            else ("afterok:0" if i and dry_run else None)
        )
        script = prepare(k, job_file, dependency, check_cluster=not dry_run)
        if dry_run:
            click.echo(script, nl=False)
            continue
        last = i == len(job_files) - 1
        job, code = submit_script(str(write_script(k, job_file, script)), wait=wait and last)
        previous = job.job_id
        click.echo(previous)
        if code:
            click.secho(f"job {previous} ended with exit code {code}", err=True, fg="red")
            sys.exit(code)
