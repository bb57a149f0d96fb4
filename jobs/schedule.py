"""`fastserve schedule`: run an inference job file again and again (nightly), with Slurm's own
scheduling. Each run is incremental (the input files that arrived since the last run) and leaves
a dated entry in the run folder (_manifest/runs/).

fastserve schedule job.toml --cron "0 2 * * *"     # every night at 02:00
fastserve schedule job.toml --every 6h             # every six hours
fastserve schedule --list
fastserve schedule --remove job

Where the site's Slurm has a `scrontab` client, a --cron schedule becomes a scrontab entry.
Elsewhere (Debian's Slurm ships none) the job is submitted with `--begin` at the next time and,
when it ends, submits itself again for the time after; the schedule is kept in
$FASTSERVE_HOME/schedules/NAME.json (default ~/.fastserve) for --list and --remove.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import click

from fastserve.pipeline.errors import ConfigError, UserError
from fastserve.pipeline.manifest import atomic_write_json

from .slurm_job import SlurmJob, job_state, run_slurm, submit_script
from .submit import fastserve_command, kind_of, prepare, write_script

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SCRON_MARK = "# fastserve schedule"


def registry(home: str | None = None) -> Path:
    base = home or os.environ.get("FASTSERVE_HOME") or str(Path.home() / ".fastserve")
    return Path(base) / "schedules"


MAX_EVERY_S = 366 * 86400


def parse_every(text: str) -> int:
    m = _DURATION.match(text.strip())
    seconds = int(m.group(1)) * _UNITS[m.group(2)] if m else 0
    if not 0 < seconds <= MAX_EVERY_S:
        raise ConfigError(
            f"--every {text!r}: expected a period from 1s to 366d, such as 30s, 15m, 6h or 1d; "
            "use --cron for times of day"
        )
    return seconds


def check_cron(expr: str) -> str:
    """A five-field cron line (no seconds field, no newline), as Slurm's scrontab takes it."""
    from cronsim import CronSim, CronSimError

    expected = 'expected five fields "minute hour day month weekday", e.g. "0 2 * * *"'
    if expr != expr.strip() or "\n" in expr or "\r" in expr or len(expr.split()) != 5:
        raise ConfigError(f"--cron {expr!r}: {expected}")
    try:
        CronSim(expr, datetime.now())
    except CronSimError as e:
        raise ConfigError(f"--cron {expr!r}: {e}; {expected}") from None
    return expr


def next_time(entry: dict, after: datetime) -> datetime:
    """The first scheduled time strictly after `after` (local time, whole seconds)."""
    if entry.get("cron"):
        from cronsim import CronSim

        return next(CronSim(entry["cron"], after.replace(microsecond=0)))
    every = timedelta(seconds=entry["every_s"])
    last = datetime.fromisoformat(entry["begin"]) if entry.get("begin") else after
    nxt = last + every
    while nxt <= after:  # a run longer than the period: the next one starts at once
        nxt += every
    return nxt.replace(microsecond=0)


def _entry_path(name: str, home: str | None = None) -> Path:
    if not _NAME.match(name):
        raise ConfigError(f"schedule name {name!r}: use letters, digits, '.', '_' or '-'")
    return registry(home) / f"{name}.json"


def _read(name: str, home: str | None = None) -> dict:
    path = _entry_path(name, home)
    if not path.exists():
        known = sorted(p.stem for p in registry(home).glob("*.json"))
        raise UserError(
            f"no schedule named {name!r} in {registry(home)}"
            + (f"; schedules: {', '.join(known)}" if known else "; there are none")
        )
    return json.loads(path.read_text())


def _submit_next(entry: dict, home: str) -> dict:
    """Submit the scheduled job for its next time; record the job id in the entry."""
    begin = next_time(entry, datetime.now())
    job, _ = submit_script(entry["script"], begin=begin.isoformat(timespec="seconds"))
    entry = {**entry, "job_id": job.job_id, "begin": begin.isoformat(timespec="seconds")}
    path = _entry_path(entry["name"], home)
    if not path.exists():  # removed meanwhile (fastserve schedule --remove): undo
        job.cancel()
        raise UserError(f"schedule {entry['name']} was removed; job {job} cancelled")
    atomic_write_json(path, entry)
    return entry


def scron_entry(name: str, cron: str, script: str, script_path: str) -> str:
    """The scrontab lines for a schedule: the script's #SBATCH options as #SCRON ones (less
    those scrontab manages itself), then the cron line running the script."""
    skip = ("--requeue", "--array", "--dependency", "--kill-on-invalid-dep", "--open-mode")
    options = [
        line.replace("#SBATCH ", "#SCRON ", 1)
        for line in script.splitlines()
        if line.startswith("#SBATCH ") and not line.split()[1].startswith(skip)
    ]
    return "\n".join([f"{SCRON_MARK} {name}", *options, f"{cron} bash {shlex.quote(script_path)}"])


def _scrontab(name: str, cron: str | None, script_text: str | None, script_path: str) -> None:
    """Add (cron given) or remove (cron None) the schedule's block in the user's scrontab."""
    current = run_slurm(["scrontab", "-l"], check=False).stdout
    blocks, keep, skipping = [], [], False
    for line in current.splitlines():
        if line.startswith(SCRON_MARK):
            skipping = line == f"{SCRON_MARK} {name}"
        elif skipping and not line.startswith("#SCRON"):
            skipping = False  # the cron line ends the block
            continue
        if not skipping:
            keep.append(line)
    if cron is not None and script_text is not None:
        blocks.append(scron_entry(name, cron, script_text, script_path))
    new = "\n".join([*keep, *blocks]) + "\n"
    tmp = registry() / f".{name}.scrontab"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(new)
    run_slurm(["scrontab", str(tmp)])
    tmp.unlink()


@click.command()
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@click.option("--cron", help='When to run, as a cron expression in local time, e.g. "0 2 * * *".')
@click.option("--every", help="Or: a fixed period, e.g. 30s, 15m, 6h, 1d.")
@click.option("--name", help="The schedule's name [the job file's name].")
@click.option("--list", "list_", is_flag=True, help="List the schedules and their next runs.")
@click.option("--remove", metavar="NAME", help="Remove a schedule (and cancel its pending run).")
@click.option(
    "--via",
    type=click.Choice(["auto", "begin", "scrontab"]),
    default="auto",
    help="scrontab where Slurm has it (--cron only), else a self-resubmitting --begin job [auto].",
)
@click.option("--dry-run", is_flag=True, help="Print the job script; install nothing.")
@click.option("--resubmit", metavar="NAME", hidden=True, help="Used by the scheduled job itself.")
@click.option("--home", hidden=True, help="Schedules folder's parent (the job passes it on).")
def schedule(job_file, cron, every, name, list_, remove, via, dry_run, resubmit, home) -> None:
    """Run an inference job file on a schedule, incrementally (nightly runs)."""
    home = home or str(registry().parent)
    if list_:
        return _list(home)
    if remove:
        return _remove(remove, home)
    if resubmit:
        return _resubmit(resubmit, home)
    if not job_file or bool(cron) == bool(every):
        raise ConfigError(
            "schedule takes a job file and one of --cron or --every (or --list, --remove NAME)"
        )
    if kind_of(job_file) != "infer":
        raise ConfigError(f"{job_file}: schedule runs inference job files ([input]) only")
    name = name or Path(job_file).stem
    path = _entry_path(name, home)
    entry = {
        "name": name,
        "job_file": str(Path(job_file).resolve()),
        "cron": check_cron(cron) if cron else None,
        "every_s": parse_every(every) if every else None,
        "created": datetime.now().isoformat(timespec="seconds"),
    }
    use_scrontab = via == "scrontab" or (via == "auto" and cron and shutil.which("scrontab"))
    if use_scrontab and not cron:
        raise ConfigError("--via scrontab takes --cron (scrontab has no fixed periods)")
    after = (
        ""
        if use_scrontab
        else (
            "# the next scheduled run (fastserve schedule)\n"
            f"{fastserve_command()} schedule --resubmit {shlex.quote(name)} --home {shlex.quote(home)}"
            ' || echo "fastserve: could not submit the next scheduled run"'
        )
    )
    script = prepare("infer", job_file, after=after, check_cluster=not dry_run)  # as submit does
    if "#SBATCH --array=" in script:
        raise ConfigError(f"{job_file}: a scheduled job takes no slurm.array")
    if dry_run:
        click.echo(script, nl=False)
        return
    if path.exists():
        raise UserError(
            f"a schedule named {name!r} exists; remove it first (fastserve schedule --remove {name}) or pass --name"
        )
    script_path = str(write_script("nightly", job_file, script))
    entry = {**entry, "script": script_path, "via": "scrontab" if use_scrontab else "begin"}
    if use_scrontab:
        _scrontab(name, cron, script, script_path)
        atomic_write_json(path, entry)
        click.echo(f"schedule {name}: scrontab entry '{cron}' installed")
        return
    atomic_write_json(path, entry)
    entry = _submit_next(entry, home)
    click.echo(f"schedule {name}: job {entry['job_id']} runs at {entry['begin']}")


def _resubmit(name: str, home: str) -> None:
    if not _entry_path(name, home).exists():
        click.echo(f"fastserve: schedule {name} was removed; no next run")
        return
    entry = _submit_next(_read(name, home), home)
    click.echo(f"fastserve: schedule {name}: next run is job {entry['job_id']} at {entry['begin']}")


def _list(home: str) -> None:
    entries = [json.loads(p.read_text()) for p in sorted(registry(home).glob("*.json"))]
    if not entries:
        click.echo(f"no schedules in {registry(home)}")
    for e in entries:
        when = f"cron '{e['cron']}'" if e.get("cron") else f"every {e['every_s']}s"
        nxt = (
            f"next job {e['job_id']} at {e['begin']} ({job_state(e['job_id'])})"
            if e.get("job_id")
            else "via scrontab"
        )
        click.echo(f"{e['name']:<20} {when:<20} {nxt}  {e['job_file']}")


def _remove(name: str, home: str) -> None:
    entry = _read(name, home)
    _entry_path(name, home).unlink()  # first: a run ending now will not resubmit
    if entry.get("via") == "scrontab":
        _scrontab(name, None, None, entry["script"])
    elif entry.get("job_id"):
        SlurmJob(entry["job_id"]).cancel(pending_only=True)
    click.echo(f"schedule {name} removed")
