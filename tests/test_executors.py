"""The Dask executor's per-worker set-up, on a real LocalCluster."""

import os

from fastserve.pipeline.config import ClusterConfig
from fastserve.pipeline.executors import dask_executor


def test_each_worker_gets_its_own_gpu(monkeypatch):
    """With several GPUs visible (as Slurm lists a job's GPUs), worker k sees only the k-th: no
    two workers share a GPU, and none sees the others'. No GPU is needed to check the pinning."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with dask_executor(ClusterConfig(workers=2)) as ex:
        seen = ex.client.run(lambda: os.environ["CUDA_VISIBLE_DEVICES"])
    assert sorted(seen.values()) == ["3", "5"]


def test_one_gpu_or_none_is_left_alone(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with dask_executor(ClusterConfig(workers=2)) as ex:
        seen = ex.client.run(lambda: os.environ["CUDA_VISIBLE_DEVICES"])
    assert list(seen.values()) == ["", ""]


def test_workers_keep_glibcs_dynamic_malloc_threshold():
    """Dask's nanny would set MALLOC_TRIM_THRESHOLD_ in its workers; an explicit threshold turns
    glibc's dynamic mmap threshold off and makes every activation tensor a fresh mmap (CPU
    inference measured 25% slower). A second cluster from the same process must not inherit
    what the first nanny put into this process's environment either."""
    for _ in range(2):
        with dask_executor(ClusterConfig(workers=1)) as ex:
            seen = ex.client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        assert list(seen.values()) == [None]
