"""Where shards run: a Dask LocalCluster started here, or a running scheduler.

The only module of the library that knows Dask. An executor maps a function over items and
yields (item, result or exception) as each finishes; the run logic (pipeline/infer.py) does not
care which executor it is given.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from .config import ClusterConfig
from .errors import ConfigError

# A worker whose scheduler is gone (its client killed) exits after this many seconds, so a killed
# run leaves no workers behind for long.
DEATH_TIMEOUT_S = 10
# Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in the workers it spawns (to hand memory back to the OS).
# Any explicit malloc threshold turns off glibc's dynamic mmap threshold: every activation tensor of
# a forward pass is then a fresh mmap, page faults and all (measured: DistilBERT on CPU 25% slower).
# A model's memory stays resident anyway, so workers keep glibc's default unless the user set one.
_USER_MALLOC_TRIM = os.environ.get("MALLOC_TRIM_THRESHOLD_")

# Task threads per worker: a shard in the model and the next one reading (or the last one
# writing) beside it. The model itself runs one shard at a time per worker (pipeline/runner.py).
TASK_SLOTS = 2


def worker_threads(requested: int, workers: int) -> int:
    """Torch threads per worker so that workers x threads = the machine's cores."""
    if requested > 0:
        return requested
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    return max(1, cores // max(1, workers))


class DaskExecutor:
    def __init__(self, client, threads: int):
        self.client = client
        self.threads = threads
        """Torch threads each task should use in its worker."""

    @property
    def dashboard_link(self) -> str | None:
        try:
            return self.client.dashboard_link
        except Exception:  # no bokeh: no dashboard
            return None

    def map_unordered(
        self,
        fn: Callable,
        items: list,
        key: Callable[[Any], str],
        stop=None,
        per_item: dict[str, Callable[[Any], Any]] | None = None,
        **kwargs: Any,
    ) -> Iterator[tuple[Any, Any]]:
        """Run fn(item, **kwargs, **{k: f(item) for k, f in per_item}) for every item; yield
        (item, result or exception) as each ends.

        A worker that dies mid-task has its task rescheduled elsewhere by the scheduler
        (`distributed.scheduler.allowed-failures` times) before it is reported as failed.
        `stop.level` is read between completions: 1 cancels what has not started and lets
        running tasks finish; 2 cancels everything and returns at once.
        """
        from distributed import as_completed

        if not items:
            return
        per_item = per_item or {}
        futures = [
            self.client.submit(
                fn,
                item,
                key=key(item),
                pure=False,
                **kwargs,
                **{k: f(item) for k, f in per_item.items()},
            )
            for item in items
        ]
        which = {f.key: item for f, item in zip(futures, items, strict=True)}
        pending = set(futures)
        ac = as_completed(futures)
        level = 0
        while pending:
            if stop is not None and stop.level > level:
                level = stop.level
                self._stop(pending, drain=level == 1)
                if level >= 2:
                    return
            for fut in ac.next_batch(block=False) or self._wait(ac):
                pending.discard(fut)
                item = which[fut.key]
                try:
                    yield item, fut.result()
                except (
                    Exception,
                    asyncio.CancelledError,
                ) as e:  # raised, cancelled, or workers kept dying
                    yield item, e
                finally:
                    fut.release()

    def on_each_worker(self, fn: Callable, key: str, **kwargs: Any) -> list:
        """Start fn(**kwargs) once on every worker connected now, without waiting (e.g. loading
        the model while the client plans); keep what this returns until the run ends. Workers
        that join later simply do the same work on their first shard."""
        workers = list(self.client.scheduler_info(n_workers=-1)["workers"])
        return [
            self.client.submit(
                fn, key=f"{key}-{i}", workers=[w], allow_other_workers=False, pure=False, **kwargs
            )
            for i, w in enumerate(workers)
        ]

    @staticmethod
    def _wait(ac, timeout: float = 0.2) -> list:
        """Block briefly for the next completion, so stop requests are seen within `timeout`."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ac.has_ready():
                return ac.next_batch(block=False)
            time.sleep(0.02)
        return []

    def _stop(self, futures: set, drain: bool) -> None:
        running = set()
        if drain:
            for keys in self.client.processing().values():
                running.update(keys)
        self.client.cancel([f for f in futures if f.key not in running])


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES (Slurm sets it to the job's GPUs),
    else those `nvidia-smi -L` lists; none on a machine without NVIDIA GPUs."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU")]


def _one_gpu_per_worker(ordinal: Callable[[Any], int]):
    """A worker plugin: worker k sees only GPU k mod (the GPUs visible), set before anything in it
    initialises CUDA, so `--workers` = the node's GPUs gives each worker its own GPU."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class OneGPUPerWorker(WorkerPlugin):
        name = "fastserve-one-gpu-per-worker"

        def setup(self, worker) -> None:
            gpus = visible_gpus()
            if len(gpus) > 1:
                os.environ["CUDA_VISIBLE_DEVICES"] = gpus[ordinal(worker) % len(gpus)]

    return OneGPUPerWorker()


def _local_cluster(cfg: ClusterConfig, threads: int):
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=cfg.workers,
        # Two task threads: one shard in the model (torch uses `threads` inside it), the next
        # one reading meanwhile (pipeline/runner.py holds the model to one shard at a time).
        threads_per_worker=TASK_SLOTS,
        processes=True,
        host=cfg.host,
        dashboard_address=f"{cfg.host}:0",
        death_timeout=DEATH_TIMEOUT_S,
        silence_logs=logging.ERROR,
        env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
    )


@contextmanager
def dask_executor(cfg: ClusterConfig) -> Iterator[DaskExecutor]:
    """A DaskExecutor on a running scheduler (cfg.scheduler_address) or on a LocalCluster
    started here with cfg.workers processes, listening on cfg.host (loopback by default)."""
    from distributed import Client

    if cfg.scheduler_address:
        try:
            client = Client(cfg.scheduler_address, timeout="30s")
        except (OSError, TimeoutError, ValueError, TypeError) as e:
            raise ConfigError(
                f"cannot reach the Dask scheduler at {cfg.scheduler_address} ({e}); "
                "check cluster.scheduler_address (--scheduler-address) or leave it out to start one"
            ) from None
        try:
            # The workers' cores are theirs to know: 0 leaves torch's own default.
            yield DaskExecutor(client, cfg.threads_per_worker)
        finally:
            client.close()
        return
    import dask

    threads = worker_threads(cfg.threads_per_worker, cfg.workers)
    if _USER_MALLOC_TRIM is None:  # an earlier nanny of this process may have set it here
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    trim = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": _USER_MALLOC_TRIM}
    with dask.config.set(trim):
        cluster = _local_cluster(cfg, threads)
    client = Client(cluster)
    try:
        # LocalCluster names its workers 0, 1, ...
        client.register_plugin(_one_gpu_per_worker(lambda w: int(w.name)))
        yield DaskExecutor(client, threads)
    finally:
        client.close()
        cluster.close()


def start_mpi_roles(cfg: ClusterConfig) -> None:
    """Under `srun`/`mpiexec` with cluster.executor = 'mpi', call this first, before any run
    logic: rank 0 becomes the Dask scheduler and ranks 2+ workers (dask-mpi; the call never
    returns on them: they exit when the client is done), and rank 1 returns, to run the job as
    the client. Only the client touches the run folder."""
    try:
        from dask_mpi import initialize
    except ImportError:
        raise ConfigError(
            "cluster.executor = 'mpi' needs dask-mpi and mpi4py: pip install dask-mpi mpi4py mpich"
        ) from None
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() < 3:
        raise ConfigError(
            f"cluster.executor = 'mpi' needs at least 3 ranks (scheduler, client, a worker), got "
            f"{MPI.COMM_WORLD.Get_size()}; launch with srun --mpi=pmi2 -n 3 or more (--overcommit on small nodes)"
        )
    if MPI.COMM_WORLD.Get_rank() != 1:
        # Slurm's warning signal reaches every task; only the client (rank 1) acts on it (it
        # drains the run). The scheduler and workers must outlive it to finish in-flight shards.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    # One node: everything on loopback. Several: the nodes' own interfaces (the hostname's).
    single = os.environ.get("SLURM_NNODES", "1") == "1" and cfg.host.startswith("127.")
    initialize(
        interface="lo" if single else None,
        nthreads=TASK_SLOTS,
        nanny=False,
        dashboard_address=":0",
        memory_limit=0,
    )


@contextmanager
def mpi_executor(cfg: ClusterConfig) -> Iterator[DaskExecutor]:
    """The client's side of dask-mpi, after start_mpi_roles: connect to the scheduler of rank 0.
    Torch threads per worker: cluster.threads_per_worker, else SLURM_CPUS_PER_TASK."""
    from distributed import Client

    threads = cfg.threads_per_worker or int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
    client = Client(timeout="60s")
    try:
        yield DaskExecutor(client, threads)
    finally:
        client.close()


SCHEDULER_FILE_ENV = "FASTSERVE_SCHEDULER_FILE"


def _slurm_step() -> tuple[int, int]:
    """(SLURM_PROCID, SLURM_NTASKS) of this task of an srun step."""
    env = os.environ
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env or "SLURM_JOB_ID" not in env:
        raise ConfigError(
            "cluster.executor = 'slurm' runs inside a Slurm job step: launch with "
            "`srun -n 3 fastserve infer ...` (or `fastserve submit infer`), or use executor = 'local'"
        )
    return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])


def slurm_scheduler_file() -> str:
    """Where the step's scheduler writes its address: $FASTSERVE_SCHEDULER_FILE (the job script
    sets it, on a filesystem every node sees, and removes a stale one before `srun`)."""
    path = os.environ.get(SCHEDULER_FILE_ENV)
    if not path:
        submit_dir = os.environ.get("SLURM_SUBMIT_DIR", os.getcwd())
        path = os.path.join(submit_dir, f"dask-scheduler-{os.environ['SLURM_JOB_ID']}.json")
    return path


def start_slurm_roles(cfg: ClusterConfig) -> None:
    """Under `srun -n N` with cluster.executor = 'slurm', call this first, before any run logic:
    task 0 becomes the Dask scheduler and tasks 2+ workers (dask-jobqueue's SLURMRunner, which
    meets through a scheduler file; no MPI), each returning only when the client shuts the
    cluster down (then the process exits 0); task 1 returns at once, to run the job as the client.
    Only the client touches the run folder."""
    procid, ntasks = _slurm_step()
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
    # One node: everything on loopback. Several: the nodes' own addresses.
    single = os.environ.get("SLURM_NNODES", "1") == "1" and cfg.host.startswith("127.")
    where = {"host": cfg.host} if single else {}
    threads = cfg.threads_per_worker or int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
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


@contextmanager
def slurm_executor(cfg: ClusterConfig) -> Iterator[DaskExecutor]:
    """The client's side (task 1) after start_slurm_roles: connect through the scheduler file,
    wait for the workers, run; shut the whole cluster down at the end, so the step ends."""
    from distributed import Client

    _, ntasks = _slurm_step()
    threads = cfg.threads_per_worker or int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
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
            _one_gpu_per_worker(lambda w: int(os.environ.get("SLURM_LOCALID", "0")))
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
def client_role(cfg: ClusterConfig) -> Iterator[None]:
    """Where the scheduler and workers are other tasks of the same launch (executor slurm or
    mpi): start the roles (only the client's task returns from here, into the `with` body), and
    whatever way the client's body ends, make sure the roles end too. Other executors: nothing."""
    if cfg.executor == "mpi":  # dask-mpi shuts its roles down when the client's process exits
        start_mpi_roles(cfg)
        yield
        return
    if cfg.executor != "slurm":
        yield
        return
    start_slurm_roles(cfg)
    try:
        yield
    finally:
        if not _ROLES["ended"]:
            _end_roles(cfg)


class SerialExecutor:
    """Everything in this process, one item at a time, in order: for debugging (a breakpoint in
    a task works) and for tests that drive many small runs. No Dask."""

    threads = 0
    dashboard_link = None

    def map_unordered(self, fn, items, key, stop=None, per_item=None, **kwargs):
        for item in items:
            if stop is not None and stop.level:
                return
            try:
                res = fn(item, **kwargs, **{k: f(item) for k, f in (per_item or {}).items()})
            except Exception as e:  # as a Dask future would report it
                res = e
            yield item, res

    def on_each_worker(self, fn: Callable, key: str, **kwargs: Any) -> list:
        return []  # the first shard loads the model


@contextmanager
def serial_executor(cfg: ClusterConfig) -> Iterator[SerialExecutor]:
    yield SerialExecutor()


def executor_for(cfg: ClusterConfig):
    """The executor factory a cluster config names."""
    return {"mpi": mpi_executor, "slurm": slurm_executor, "serial": serial_executor}.get(
        cfg.executor, dask_executor
    )
