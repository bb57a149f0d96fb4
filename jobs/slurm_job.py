"""The one seam through which FastServe runs Slurm's commands, and a submitted job as an object.

    job = submit_script(".fastserve-sbatch/reviews-infer.sbatch")   # a SlurmJob
    job.state()          # JobState(name='RUNNING', exit_code='0:0')
    job.wait(timeout=600)
    job.cancel()

The shape is submitit's (a job with state / wait / cancel), over sbatch, scontrol, sacct and
scancel; the job's own environment (inside it) is read by `pipeline/slurm_env.py`.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass

from fastserve.pipeline.errors import UserError

# Slurm's states in which a job will not run again by itself (ended, or held until released).
ENDED = frozenset(
    {
        "REQUEUE_HOLD",
        "SPECIAL_EXIT",
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)
_JOB_ID = re.compile(r"^\d+(_\d+)?$")


def run_slurm(
    args: list[str], timeout: float | None = 60, check: bool = True
) -> subprocess.CompletedProcess:
    """Run sbatch, squeue, scontrol, scancel, sacct, sinfo or scrontab; a missing command or (with
    `check`) a failure is a UserError with Slurm's own words."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise UserError(
            f"{args[0]} not found: is this a Slurm login node (and SLURM_CONF set)?"
        ) from None
    if check and proc.returncode != 0:
        raise UserError(
            f"{' '.join(args[:2])} failed: {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


@dataclass(frozen=True)
class JobState:
    name: str
    """Slurm's state (PENDING, RUNNING, COMPLETED, ...), or UNKNOWN once Slurm forgot the job
    (MinJobAge) and no accounting remembers it."""
    exit_code: str | None = None
    """Slurm's `code:signal`, once known."""

    @property
    def ended(self) -> bool:
        return self.name in ENDED

    def __str__(self) -> str:
        if self.name == "UNKNOWN":
            return "unknown (Slurm no longer remembers it and has no accounting here)"
        return self.name + (f" (exit {self.exit_code})" if self.exit_code else "")


@dataclass(frozen=True)
class SlurmJob:
    job_id: str

    def __post_init__(self) -> None:
        if not _JOB_ID.match(self.job_id):
            raise ValueError(f"not a Slurm job id: {self.job_id!r}")

    def __str__(self) -> str:
        return self.job_id

    def state(self) -> JobState:
        """From scontrol while Slurm remembers the job, else from sacct; else UNKNOWN."""
        import shutil

        if shutil.which("scontrol"):
            out = run_slurm(["scontrol", "show", "job", "-o", self.job_id], check=False).stdout
            m = re.search(r"JobState=(\S+)", out)
            if m:
                code = re.search(r"ExitCode=(\S+)", out)
                return JobState(m.group(1), code.group(1) if code else None)
        if shutil.which("sacct"):
            proc = run_slurm(
                ["sacct", "-n", "-X", "-P", "-j", self.job_id, "-o", "State,ExitCode"],
                check=False,
            )
            fields = proc.stdout.strip().splitlines()[0].split("|") if proc.stdout.strip() else []
            if proc.returncode == 0 and len(fields) == 2 and fields[0].strip():
                state, code = fields
                return JobState(state.split()[0], code or None)  # "CANCELLED by 0": the state
        return JobState("UNKNOWN")

    def wait(self, timeout: float | None = None, every: float = 1.0) -> JobState:
        """Poll until the job has ended (or Slurm forgot it); TimeoutError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.state()
            if state.ended or state.name == "UNKNOWN":
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id} still {state.name} after {timeout} s")
            time.sleep(every)

    def cancel(self, pending_only: bool = False) -> None:
        """scancel the job (only while it is pending, with `pending_only`); a job that has
        ended already is no error."""
        run_slurm(
            ["scancel", *(["--state=PENDING"] if pending_only else []), self.job_id], check=False
        )


def job_state(job_id: str) -> str:
    """A job's state as `status` and `schedule --list` print it; an id that is not a Slurm job
    id (a hand-edited file) is said so, not a crash."""
    try:
        return str(SlurmJob(job_id).state())
    except ValueError:
        return f"not a Slurm job id: {job_id!r}"


def submit_script(
    script_path: str, wait: bool = False, begin: str | None = None
) -> tuple[SlurmJob, int]:
    """sbatch a script; return the job and an exit code (the job's own with `wait`, else 0).
    `begin`: not before this time (sbatch --begin, e.g. 2026-11-29T02:00:00)."""
    args = [
        "sbatch",
        "--parsable",
        *(["--wait"] if wait else []),
        *([f"--begin={begin}"] if begin else []),
        script_path,
    ]
    proc = run_slurm(args, timeout=None, check=False)
    job_id = proc.stdout.strip().split(";")[0]
    if not _JOB_ID.match(job_id):
        raise UserError(f"sbatch failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return SlurmJob(job_id), proc.returncode


def node_cpus(partition: str | None = None) -> list[int]:
    """The CPUs of each node of the partition (or of the cluster), from sinfo; [] when unknown."""
    import shutil

    if shutil.which("sinfo") is None:
        return []
    args = ["sinfo", "-h", "-N", "-o", "%N %c %P"] + (["-p", partition] if partition else [])
    proc = run_slurm(args, check=False)
    if proc.returncode != 0:
        return []
    return partition_cpus(proc.stdout, partition)


def partition_cpus(sinfo: str, partition: str | None) -> list[int]:
    """The CPUs of each node of `partition` (None: the default one, marked * by sinfo) from
    `sinfo -h -N -o "%N %c %P"` lines; a node in two partitions is counted once."""
    nodes: dict[str, int] = {}
    for line in sinfo.splitlines():
        parts = line.split()
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        name, cpus, part = parts
        if (
            part == partition
            or part == f"{partition}*"
            or (partition is None and part.endswith("*"))
        ):
            nodes[name] = int(cpus)
    return list(nodes.values())
