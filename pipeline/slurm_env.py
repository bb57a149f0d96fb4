"""What Slurm tells a process about the job it runs in, read from the environment in one place.

    env = SlurmEnv.read()
    if env.in_step: ...          # a task of an srun step (SLURM_PROCID / SLURM_NTASKS set)
    index, count = env.share     # this array task's share of the shards: (0, 1) outside an array

Only variables are read here: nothing runs a Slurm command (that is `jobs/slurm_job.py`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


def _int(env: Mapping[str, str], key: str, default: int | None) -> int | None:
    value = env.get(key, "")
    return int(value) if value.strip().isdigit() else default


@dataclass(frozen=True)
class SlurmEnv:
    job_id: str | None = None
    """SLURM_JOB_ID: set in every process of a job (its batch shell and its steps)."""
    procid: int | None = None
    """SLURM_PROCID: this task's rank within its srun step."""
    ntasks: int | None = None
    """SLURM_NTASKS: the tasks of the step (or of the job, in the batch shell)."""
    nnodes: int = 1
    localid: int = 0
    """SLURM_LOCALID: this task's rank among the step's tasks on its node."""
    cpus_per_task: int = 0
    """SLURM_CPUS_PER_TASK (0: not set)."""
    submit_dir: str | None = None
    array_index: int | None = None
    """SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN: this array task's place, from 0."""
    array_count: int | None = None
    restart_count: int = 0
    """SLURM_RESTART_COUNT: how many times the job was requeued."""

    @classmethod
    def read(cls, env: Mapping[str, str] | None = None) -> SlurmEnv:
        env = os.environ if env is None else env
        index = count = None
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            index = _int(env, "SLURM_ARRAY_TASK_ID", 0) - _int(env, "SLURM_ARRAY_TASK_MIN", 0)
            count = _int(env, "SLURM_ARRAY_TASK_COUNT", 1)
        return cls(
            job_id=env.get("SLURM_JOB_ID") or None,
            procid=_int(env, "SLURM_PROCID", None),
            ntasks=_int(env, "SLURM_NTASKS", None),
            nnodes=_int(env, "SLURM_NNODES", 1),
            localid=_int(env, "SLURM_LOCALID", 0),
            cpus_per_task=_int(env, "SLURM_CPUS_PER_TASK", 0),
            submit_dir=env.get("SLURM_SUBMIT_DIR") or None,
            array_index=index,
            array_count=count,
            restart_count=_int(env, "SLURM_RESTART_COUNT", 0),
        )

    @property
    def in_step(self) -> bool:
        """A task of an srun step of a job."""
        return self.job_id is not None and self.procid is not None and self.ntasks is not None

    @property
    def share(self) -> tuple[int, int]:
        """(this array task's index, the array's size); (0, 1) when not in an array."""
        if self.array_index is None or not self.array_count:
            return (0, 1)
        return (self.array_index, self.array_count)
