"""A job file's [slurm] table (SlurmConfig) and the sbatch script rendered from it by one pure
function, over one template (`slurm/job.sbatch`, the requeue loop) for infer and train alike.

    script = render("infer", SlurmConfig(nodes=2, time="04:00:00"), "job.toml")
    job = submit_script(path)          # jobs/slurm_job.py: a SlurmJob (state / wait / cancel)

The job file's [slurm] table becomes `#SBATCH` directives (sorted), the `setup` lines, and a
command with every value shell-quoted. Values are validated: a misspelled key lists the valid
ones; a newline, or a job name outside [A-Za-z0-9._-], is refused, so nothing in a job file can
add a line to the script or run a command of its own.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, fields, replace
from importlib import resources

from fastserve.pipeline.config import build_config
from fastserve.pipeline.errors import ConfigError

# The job file's tables that are the launcher's, not the run's: the CLI has load_job /
# load_train_job leave them out (other_tables=LAUNCH_TABLES); Python callers pass the same.
LAUNCH_TABLES = ("slurm",)


@dataclass(frozen=True)
class SlurmConfig:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    ntasks_per_node: int | None = None
    """Tasks per node. infer: one is the Dask scheduler and one the client, the rest are workers
    (at least 3 in all; unset: 3). train: one MPI rank per task (one per GPU); unset: the job's
    dp x tp x pp ranks over `nodes`."""
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    """CPUs per task (torch threads per worker or rank). Unset: Slurm's default (and with
    overcommit, leave it unset: Slurm refuses the pair on a node smaller than the tasks)."""
    mem: str | None = None
    """Memory per node, as sbatch takes it (e.g. 64G)."""
    time: str = "01:00:00"
    job_name: str = "fastserve"
    output: str = "slurm-%j.out"
    error: str | None = None
    overcommit: bool = False
    """Allow more tasks than CPUs (small test nodes)."""
    signal_grace_s: int = 120
    """Seconds before the time limit at which the job is warned (USR1) to stop and requeue."""
    requeue: bool = True
    max_requeues: int = 5
    """A job stopped by the time-limit warning requeues itself at most this many times."""
    array: int | None = None
    """infer: split the run over this many array tasks (each does its share of the shards)."""
    array_parallel: int | None = None
    """At most this many array tasks at once (sbatch's %N)."""
    dependency: str | None = None
    """Set by `fastserve submit pipeline` (afterok:<id>); not for job files."""
    extra: tuple[str, ...] = ()
    """More sbatch options, each one `--name=value` (e.g. "--constraint=a100")."""
    setup: tuple[str, ...] = ()
    """Shell lines run before the command: module loads, a venv activation. One line each."""


# An infer job's tasks per node when none are given: scheduler, client, one worker.
INFER_TASKS = 3

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")
_MEM = re.compile(r"^\d+[KMGT]?$")
_OPTION = re.compile(r"^--[a-z][a-z-]*(=[^\s'\"`$;\\]+)?$")
_WORD = re.compile(r"^[A-Za-z0-9._,:@%/+=-]+$")


def slurm_config(table: dict, where: str) -> SlurmConfig:
    """The [slurm] table as a SlurmConfig; a misspelled key is an error listing the valid ones."""
    cfg = build_config(SlurmConfig, table, "slurm.", where)
    _check(cfg, where)
    return cfg


def _check(cfg: SlurmConfig, where: str) -> None:
    def bad(key: str, value, expected: str):
        raise ConfigError(f"{where}: slurm.{key} = {value!r}; expected {expected}")

    for f in fields(cfg):
        values = getattr(cfg, f.name)
        for v in values if isinstance(values, tuple) else [values]:
            if isinstance(v, str) and any(c in v for c in "\n\r\0"):
                bad(f.name, v, "a single line (no newline)")
    if not _NAME.match(cfg.job_name):
        bad("job_name", cfg.job_name, "letters, digits, '.', '_' or '-' (at most 64)")
    if not _TIME.match(cfg.time):
        bad("time", cfg.time, "a Slurm time such as 30, 04:00:00 or 2-00:00:00")
    if cfg.mem is not None and not _MEM.match(cfg.mem):
        bad("mem", cfg.mem, "a size such as 64G or 16000M")
    for key in ("partition", "account", "qos"):
        v = getattr(cfg, key)
        if v is not None and not _WORD.match(v):
            bad(key, v, "a plain name")
    for path_key in ("output", "error"):
        # sbatch splits an #SBATCH line at spaces: a space would start another option
        v = getattr(cfg, path_key)
        if v is not None and not _WORD.match(v):
            bad(
                path_key,
                v,
                "a path of letters, digits and ._-/%+=@, (no spaces, quotes, $, ; or backticks)",
            )
    for opt in cfg.extra:
        if not _OPTION.match(opt):
            bad("extra", opt, "one option per entry, of the form --name=value (no spaces)")
    if not 0 <= cfg.signal_grace_s <= 65535:  # sbatch's --signal range
        bad("signal_grace_s", cfg.signal_grace_s, "seconds from 0 to 65535")
    if cfg.dependency is not None and not re.match(r"^afterok:\d+(:\d+)*$", cfg.dependency):
        bad("dependency", cfg.dependency, "afterok:<job id>")
    if cfg.max_requeues < 0:
        bad("max_requeues", cfg.max_requeues, "a number >= 0")
    for key in ("nodes", "ntasks_per_node", "cpus_per_task", "array", "array_parallel"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            bad(key, getattr(cfg, key), "a number >= 1")


def train_tasks(cfg: SlurmConfig, world: int, where: str) -> SlurmConfig:
    """The [slurm] table of a train job with its task count made to fit the parallel layout
    (`world` = dp x tp x pp ranks, one task each), or a ConfigError saying why it cannot."""

    if cfg.ntasks_per_node is None:
        if world % cfg.nodes:
            raise ConfigError(
                f"{where}: parallel dp x tp x pp = {world} ranks do not spread evenly over "
                f"slurm.nodes = {cfg.nodes}; change the layout or the node count"
            )
        return replace(cfg, ntasks_per_node=world // cfg.nodes)
    if cfg.nodes * cfg.ntasks_per_node != world:
        raise ConfigError(
            f"{where}: slurm.nodes x slurm.ntasks_per_node = {cfg.nodes * cfg.ntasks_per_node} "
            f"tasks, but parallel dp x tp x pp = {world} ranks (one task each); leave "
            "slurm.ntasks_per_node out to have it derived"
        )
    return cfg


def check_fits(cfg: SlurmConfig, node_cpus: list[int], where: str) -> None:
    """Refuse a job its partition can never run (it would stay pending for good): more tasks x
    CPUs per node than any node of the partition has (`node_cpus`, from sinfo), without
    overcommit; or more nodes than it has. Nothing known (no nodes listed): sbatch decides."""
    if not node_cpus:
        return
    where_ = f"partition {cfg.partition}" if cfg.partition else "this cluster"
    if cfg.nodes > len(node_cpus):
        raise ConfigError(
            f"{where}: slurm.nodes = {cfg.nodes}, but {where_} has {len(node_cpus)} node"
            f"{'s' if len(node_cpus) != 1 else ''} (sinfo): the job would stay pending; ask for "
            f"at most {len(node_cpus)}, or another slurm.partition"
        )
    if cfg.overcommit:
        return
    tasks, cpus = cfg.ntasks_per_node or INFER_TASKS, cfg.cpus_per_task or 1
    if sum(c >= tasks * cpus for c in node_cpus) < cfg.nodes <= len(
        node_cpus
    ) and tasks * cpus <= max(node_cpus):
        big = sum(c >= tasks * cpus for c in node_cpus)
        raise ConfigError(
            f"{where}: {cfg.nodes} nodes of {tasks} tasks x {cpus} CPUs, but only {big} node"
            f"{'s' if big != 1 else ''} of {where_} have {tasks * cpus} CPUs: the job would stay "
            "pending; use fewer nodes, fewer ranks per node, or slurm.overcommit = true"
        )
    if tasks * cpus > max(node_cpus):
        raise ConfigError(
            f"{where}: {tasks} tasks x {cpus} CPUs per node, but the nodes of "
            f"{where_} have at most "
            f"{max(node_cpus)} CPUs: the job would stay pending; use more nodes, fewer ranks, or "
            "slurm.overcommit = true"
        )


def directives(kind: str, cfg: SlurmConfig) -> list[str]:
    """The `#SBATCH` lines, sorted by option name."""
    opts = {
        "job-name": cfg.job_name,
        "nodes": str(cfg.nodes),
        "time": cfg.time,
        "output": cfg.output,
        "signal": f"B:USR1@{cfg.signal_grace_s}",
        "open-mode": "append",  # a requeued job adds to its log instead of replacing it
    }
    per_node = cfg.ntasks_per_node or INFER_TASKS
    if cfg.overcommit:  # Slurm refuses --ntasks-per-node above the node's CPUs, even overcommitted
        opts["ntasks"] = str(cfg.nodes * per_node)
    else:
        opts["ntasks-per-node"] = str(per_node)
    for key in ("partition", "account", "qos", "mem", "error", "cpus_per_task"):
        if getattr(cfg, key) is not None:
            opts[key.replace("_", "-")] = str(getattr(cfg, key))
    if cfg.array:
        opts["array"] = f"0-{cfg.array - 1}" + (
            f"%{cfg.array_parallel}" if cfg.array_parallel else ""
        )
    if cfg.dependency:
        opts["dependency"] = cfg.dependency
        opts["kill-on-invalid-dep"] = (
            "yes"  # a failed parent cancels this job, not pends it forever
        )
    if cfg.gpus_per_node:
        opts["gpus-per-node"] = str(cfg.gpus_per_node)
    flags = [f"--{k}={v}" for k, v in opts.items()]
    if cfg.requeue:
        flags.append("--requeue")
    if cfg.overcommit:
        flags.append("--overcommit")
    flags += list(cfg.extra)
    return [f"#SBATCH {f}" for f in sorted(flags)]


@dataclass(frozen=True)
class Kind:
    """What differs between an infer and a train job script; the rest is `slurm/job.sbatch`."""

    what: str
    step: str
    """The srun line, {fastserve} and {job} filled in (the job file's path, shell-quoted)."""
    stop_code: int
    """The exit code with which the step says "stopped at the time-limit warning: requeue me"."""
    on_warning: str
    roles: str
    cleanup: str = ""


KINDS = {
    "infer": Kind(
        what="batch inference",
        step="srun {fastserve} infer --config {job} --executor slurm",
        stop_code=138,  # infer exits 128 + the signal that stopped it: SIGUSR1 is 10 on Linux
        on_warning="the run takes no new shards and finishes the running ones",
        roles="""\
# Dask inside the allocation, started by dask-jobqueue's SLURMRunner over the step's tasks: task 0
# the scheduler, task 1 the client that runs the job, the others the workers; they meet through a
# scheduler file. The same script serves 1 or N nodes. A requeued job keeps its id: remove the file
# an earlier run of it left, or the workers would look for a scheduler that is gone.
export FASTSERVE_SCHEDULER_FILE="${SLURM_SUBMIT_DIR:-$PWD}/.fastserve-sbatch/dask-scheduler-${SLURM_JOB_ID}.json"
mkdir -p "$(dirname "$FASTSERVE_SCHEDULER_FILE")"
rm -f "$FASTSERVE_SCHEDULER_FILE\"""",
        cleanup='rm -f "$FASTSERVE_SCHEDULER_FILE"',
    ),
    "train": Kind(
        what="training",
        step="srun --mpi=pmi2 --kill-on-bad-exit=1 {fastserve} train --config {job}",
        stop_code=75,  # EX_TEMPFAIL: pipeline/training/trainer.py's REQUEUE_EXIT_CODE
        on_warning="the ranks save a checkpoint",
        roles="""\
# One MPI rank per task (one per GPU where there are GPUs), started by srun with the pmi2 plugin;
# rank 0's node holds the rendezvous.""",
    ),
}


def command(kind: str, job_file: str, fastserve: str = "fastserve") -> str:
    """The step the job runs: every value shell-quoted."""
    return KINDS[kind].step.format(fastserve=fastserve, job=shlex.quote(job_file))


def render(
    kind: str, cfg: SlurmConfig, job_file: str, fastserve: str = "fastserve", after: str = ""
) -> str:
    """The whole sbatch script for `kind` (infer or train): pure, so golden files pin it.
    `after`: shell lines run once the step has ended for good (a scheduled run's next submission)."""
    k = KINDS[kind]
    template = resources.files("fastserve.slurm").joinpath("job.sbatch").read_text()
    fill = {
        "DIRECTIVES": "\n".join(directives(kind, cfg)),
        "WHAT": k.what,
        "KIND": kind,
        "SETUP": "\n".join(cfg.setup) if cfg.setup else ":",
        "ROLES": k.roles,
        "ON_WARNING": k.on_warning,
        "STOP_CODE": str(k.stop_code),
        "COMMAND": command(kind, job_file, fastserve),
        "MAX_REQUEUES": str(cfg.max_requeues if cfg.requeue else 0),
        "CLEANUP": k.cleanup,
        "AFTER": after,
    }

    def one(m: re.Match) -> str:
        text = fill[m.group(1)]
        # a whole-line mark with nothing to put there leaves no empty line behind
        return text + m.group(2) if text or not m.group(2) else ""

    # one pass: what a job file put in (setup lines) is never searched for marks itself
    return re.sub(r"#@([A-Z_]+)(\n?)", one, template)
