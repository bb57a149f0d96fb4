"""Where shards run. The only package of the library that knows Dask (and, for dask-mpi's roles,
the only one besides `pipeline/distributed` that imports mpi4py).

An executor maps a function over items and yields (item, result or exception) as each finishes;
the run logic (pipeline/infer.py) does not care which one it is given. A launch is where the
executor's roles live: for `local` and `serial` nothing; for `slurm` and `mpi` the scheduler and
workers are other tasks of the same srun/mpiexec launch, started by `launch()` before any run
logic (only the client's task enters the `with` body) and ended with it:

    with launch(job.cluster) as executor_factory:      # the roles are up; this is the client
        run_infer(job, executor_factory)               # which enters executor_factory(cfg)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Protocol

from ..config import ClusterConfig
from .local import DaskExecutor, dask_executor, visible_gpus, worker_threads
from .serial import SerialExecutor, serial_executor

__all__ = [
    "DaskExecutor",
    "Executor",
    "ExecutorFactory",
    "SerialExecutor",
    "dask_executor",
    "executor_for",
    "launch",
    "serial_executor",
    "visible_gpus",
    "worker_threads",
]


class Executor(Protocol):
    threads: int
    """Torch threads each task should use in its worker (0: the worker's own default)."""
    dashboard_link: str | None

    def map_unordered(
        self,
        fn: Callable,
        items: list,
        key: Callable[[Any], str],
        stop=None,
        per_item: dict[str, Callable[[Any], Any]] | None = None,
        **kwargs: Any,
    ) -> Iterator[tuple[Any, Any]]:
        """fn(item, **kwargs, **{k: f(item) for k, f in per_item}) for every item; yield (item,
        result or the exception it raised) as each ends. `stop.level` 1: start nothing new;
        2: return at once."""
        ...

    def on_each_worker(self, fn: Callable, key: str, **kwargs: Any) -> list:
        """Start fn(**kwargs) once on every worker now (model loading ahead of the first shard);
        the caller keeps what this returns until the run ends."""
        ...


ExecutorFactory = Callable[[ClusterConfig], AbstractContextManager[Executor]]


def executor_for(cfg: ClusterConfig) -> ExecutorFactory:
    """The executor factory a cluster config names."""
    if cfg.executor == "slurm":
        from .slurm import slurm_executor

        return slurm_executor
    if cfg.executor == "mpi":
        from .mpi import mpi_executor

        return mpi_executor
    return serial_executor if cfg.executor == "serial" else dask_executor


@contextmanager
def launch(cfg: ClusterConfig) -> Iterator[ExecutorFactory]:
    """The roles of cfg.executor's launch, owned for the `with` body: entered by the client
    only, and whatever way the body ends (an error before it ever connected included), the
    scheduler and workers end with it, so a Slurm step ends with the client's exit code."""
    if cfg.executor == "slurm":
        from .slurm import slurm_launch as roles
    elif cfg.executor == "mpi":
        from .mpi import mpi_launch as roles
    else:
        roles = None
    with roles(cfg) if roles else nullcontext():
        yield executor_for(cfg)
