"""The Dask executor: a LocalCluster started here, or a running scheduler (the slurm and mpi
launches connect the same DaskExecutor to the scheduler their roles started)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..config import ClusterConfig
from ..errors import ConfigError

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


def one_gpu_per_worker(ordinal: Callable[[Any], int]):
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
        client.register_plugin(one_gpu_per_worker(lambda w: int(w.name)))
        yield DaskExecutor(client, threads)
    finally:
        client.close()
        cluster.close()
