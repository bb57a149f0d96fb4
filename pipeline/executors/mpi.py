"""executor = 'mpi': Dask's roles over the MPI ranks of one launch (dask-mpi), under
`mpiexec -n N` or `srun --mpi=pmi2 -n N`: rank 0 the scheduler, rank 1 the client, ranks 2+ workers."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from ..config import ClusterConfig
from ..errors import ConfigError
from ..slurm_env import SlurmEnv
from .local import TASK_SLOTS, DaskExecutor


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
    single = SlurmEnv.read().nnodes == 1 and cfg.host.startswith("127.")
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

    threads = cfg.threads_per_worker or SlurmEnv.read().cpus_per_task
    client = Client(timeout="60s")
    try:
        yield DaskExecutor(client, threads)
    finally:
        client.close()


@contextmanager
def mpi_launch(cfg: ClusterConfig) -> Iterator[None]:
    """The roles for the `with` body of the client's rank (the others never enter it); dask-mpi
    shuts its roles down when the client's process exits."""
    start_mpi_roles(cfg)
    yield
