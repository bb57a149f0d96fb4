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

from pipeline.config import INFER_PATH_KEYS, load_job, read_job_file
from pipeline.training.config import PATH_KEYS as TRAIN_PATH_KEYS
from pipeline.training.config import load_train_job

from .sbatch import render, sbatch, slurm_config


def prepare(kind: str, job_file: str) -> str:
    """Validate the job file for `kind` and render its script (the command: this interpreter)."""
    raw = read_job_file(job_file, INFER_PATH_KEYS if kind == "infer" else TRAIN_PATH_KEYS)
    cfg = slurm_config(raw.get("slurm", {}), job_file)
    (load_job if kind == "infer" else load_train_job)(job_file)  # the job itself must be valid
    fastserve = f"{shlex.quote(sys.executable)} -m jobs"
    return render(kind, cfg, str(Path(job_file).resolve()), fastserve)


@click.command()
@click.argument("kind", type=click.Choice(["infer", "train"]))
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the sbatch script; submit nothing.")
@click.option("--wait", is_flag=True, help="Wait for the job to end; exit with its exit code.")
def submit(kind: str, job_file: str, dry_run: bool, wait: bool) -> None:
    """Submit an infer or train job file to Slurm."""
    script = prepare(kind, job_file)
    if dry_run:
        click.echo(script, nl=False)
        return
    folder = Path(job_file).resolve().parent / ".fastserve-sbatch"
    folder.mkdir(exist_ok=True)
    path = folder / f"{Path(job_file).stem}-{kind}.sbatch"
    path.write_text(script)
    click.echo(sbatch(str(path), *(["--wait"] if wait else [])))
