"""executor = 'slurm': Dask's roles over the tasks of one srun step (dask-jobqueue's SLURMRunner,
meeting through a scheduler file; no MPI): task 0 the scheduler, task 1 the client, tasks 2+ workers.
The launch owns the roles' lifetimes: whatever way the client ends, the step ends with it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from ..config import ClusterConfig
from ..errors import ConfigError
from ..netaddr import node_address
from ..slurm_env import SlurmEnv
from .local import DEATH_TIMEOUT_S, TASK_SLOTS, DaskExecutor, one_gpu_per_worker

SCHEDULER_FILE_ENV = "FASTSERVE_SCHEDULER_FILE"


def _slurm_step() -> SlurmEnv:
    """This task's Slurm environment; an error unless it is a task of an srun step."""
    env = SlurmEnv.read()
    if not env.in_step:
        raise ConfigError(
            "cluster.executor = 'slurm' runs inside a Slurm job step: launch with "
            "`srun -n 3 fastserve infer ...` (or `fastserve submit infer`), or use executor = 'local'"
        )
    return env


def slurm_scheduler_file() -> str:
    """Where the step's scheduler writes its address: $FASTSERVE_SCHEDULER_FILE (the job script
    sets it, on a filesystem every node sees, and removes a stale one before `srun`)."""
    path = os.environ.get(SCHEDULER_FILE_ENV)
    if not path:
        env = _slurm_step()
        path = os.path.join(env.submit_dir or os.getcwd(), f"dask-scheduler-{env.job_id}.json")
    return path


def start_slurm_roles(cfg: ClusterConfig) -> None:
    """Under `srun -n N` with cluster.executor = 'slurm', call this first, before any run logic:
    task 0 becomes the Dask scheduler and tasks 2+ workers (dask-jobqueue's SLURMRunner, which
    meets through a scheduler file; no MPI), each returning only when the client shuts the
    cluster down (then the process exits 0); task 1 returns at once, to run the job as the client.
    Only the client touches the run folder."""
    env = _slurm_step()
    procid, ntasks = env.procid, env.ntasks
    if ntasks < 3:
        raise ConfigError(
            f"cluster.executor = 'slurm' needs at least 3 tasks (scheduler, client, a worker), got "
            f"{ntasks}; set slurm.ntasks_per_node (or srun -n) to 3 or more"
        )
    if procid == 1:
        return
    try:
        from dask_jobqueue.slurm import SLURMRunner
    except ImportError:
        raise ConfigError(
            "cluster.executor = 'slurm' needs dask-jobqueue: pip install dask-jobqueue"
        ) from None
    # Slurm's warning signal reaches every task; only the client acts on it (it drains the run).
    # The scheduler and workers must outlive it to finish in-flight shards.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    where = listen_on(cfg, env)
    threads = cfg.threads_per_worker or env.cpus_per_task
    if threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    from distributed.diagnostics.plugin import SchedulerPlugin

    class EndWithTheClient(SchedulerPlugin):
        """The scheduler closes (and its workers with it) when the client leaves, also when it
        was killed without shutting the cluster down: the step then ends with the client's exit
        code, instead of waiting for its time limit."""

        def remove_client(self, scheduler, client: str) -> None:
            if not any(c != "fire-and-forget" for c in scheduler.clients if c != client):
                asyncio.get_running_loop().create_task(scheduler.close(reason="client left"))

    class Runner(SLURMRunner):
        async def on_scheduler_start(self, scheduler) -> None:
            scheduler.add_plugin(EndWithTheClient())

    try:
        Runner(
            scheduler_file=slurm_scheduler_file(),
            scheduler_options={**where, "dashboard_address": ":0"},
            worker_options={
                **where,
                "nthreads": TASK_SLOTS,
                "memory_limit": 0,
                "death_timeout": DEATH_TIMEOUT_S,  # the scheduler gone: exit
            },
        )
    except KeyboardInterrupt:  # how the runner ends a scheduler or worker that is done
        pass
    sys.exit(0)


def listen_on(cfg: ClusterConfig, env: SlurmEnv) -> dict:
    """Where this node's scheduler or worker listens, as Dask options, decided on each node: one
    node, loopback (cluster.host); several, the address of cluster.interface if given, else the
    address this node's host name resolves to (what Slurm and MPI ranks use too), else the first
    interface with another address. Never loopback across nodes: the others could not reach it."""
    if env.nnodes <= 1 and cfg.host.startswith("127."):
        return {"host": cfg.host}
    return {"host": node_address(cfg.interface)}


@contextmanager
def slurm_executor(cfg: ClusterConfig) -> Iterator[DaskExecutor]:
    """The client's side (task 1) after start_slurm_roles: connect through the scheduler file,
    wait for the workers, run; shut the whole cluster down at the end, so the step ends."""
    from distributed import Client

    env = _slurm_step()
    threads = cfg.threads_per_worker or env.cpus_per_task
    path = slurm_scheduler_file()
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise ConfigError(
                f"no Dask scheduler wrote {path} within 120 s; see the job's output for task 0"
            )
        time.sleep(0.2)
    client = Client(scheduler_file=path, timeout="60s")
    try:
        client.wait_for_workers(1, timeout=120)
        # tasks 2+ are the workers; their local ids order them on each node
        client.register_plugin(
            one_gpu_per_worker(lambda w: SlurmEnv.read().localid)  # runs in each worker
        )
        yield DaskExecutor(client, threads)
    finally:
        with suppress(Exception):  # already gone (its task killed): nothing left to end
            client.shutdown()  # the scheduler and every worker exit: the srun step ends
        _ROLES["ended"] = True
        client.close()


# Whether this process (a client task of a slurm/mpi launch) has shut its roles down already.
_ROLES = {"ended": False}


def _end_roles(cfg: ClusterConfig) -> None:
    """The client is ending without having shut the cluster down (an error before it ever
    connected: a bad model folder, a typo caught by a check): connect now only to shut the
    scheduler and workers down, so the step ends with the client's exit code instead of running
    on to its time limit."""
    from distributed import Client

    try:
        path = slurm_scheduler_file()
        deadline = time.monotonic() + 120
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.2)
        client = Client(scheduler_file=path, timeout="30s")
        client.shutdown()
        client.close()
    except Exception as e:  # noqa: BLE001 - reported; the step's time limit is the fallback
        logging.getLogger("fastserve").warning("could not shut the Dask roles down: %s", e)


@contextmanager
def slurm_launch(cfg: ClusterConfig) -> Iterator[None]:
    """Start the roles (only the client's task returns from here, into the `with` body), and
    whatever way the client's body ends, make sure the scheduler and workers end too."""
    start_slurm_roles(cfg)
    try:
        yield
    finally:
        if not _ROLES["ended"]:
            _end_roles(cfg)
