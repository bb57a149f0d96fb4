"""Executors: the Dask executor's per-worker set-up on a real LocalCluster; the serial one."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastserve.pipeline.config import ClusterConfig
from fastserve.pipeline.executors import dask_executor, launch, serial_executor
from fastserve.pipeline.testing import infer_args, write_corpus

from conftest import read_sorted, run_cli


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


def test_the_serial_executor_writes_what_the_dask_one_does(tmp_path, classifier):
    """`--executor serial` (no Dask: every shard in this process, in turn) is for debugging: it
    must produce the same run folder contents as a LocalCluster run, rejected rows included."""
    c = tmp_path / "c"
    write_corpus(c, n_files=3, rows=25)
    pq.write_table(pa.table({"id": ["x", "y"], "text": ["", None]}), c / "bad.parquet")
    outs = {}
    for executor in ("serial", "local"):
        out = tmp_path / executor
        run_cli(*infer_args(classifier, out, c, extra=["--executor", executor, "--shard-rows",
                                                       "10"]), check=True)  # fmt: skip
        outs[executor] = (read_sorted(out).to_pylist(), read_sorted(out / "_rejected").to_pylist())
        assert (out / "_SUCCESS").exists()
    (serial, serial_rej), (local, local_rej) = outs["serial"], outs["local"]
    assert len(serial) == 75 and serial_rej == local_rej and len(serial_rej) == 2
    assert [(r["id"], r["label"]) for r in serial] == [(r["id"], r["label"]) for r in local]
    assert [r["score"] for r in serial] == pytest.approx([r["score"] for r in local], abs=1e-5)


def test_serial_executor_stops_between_items_and_reports_errors_as_results():
    class Stop:
        level = 0

    stop, seen = Stop(), []

    def fn(item):
        seen.append(item)
        if item == 1:
            raise ValueError("bad item")
        if item == 2:
            stop.level = 1
        return item * 10

    with launch(ClusterConfig(executor="serial")) as factory, factory(ClusterConfig()) as ex:
        got = list(ex.map_unordered(fn, [0, 1, 2, 3], key=str, stop=stop))
    assert [i for i, _ in got] == [0, 1, 2] and seen == [0, 1, 2]
    assert got[0][1] == 0 and isinstance(got[1][1], ValueError) and got[2][1] == 20


def test_launch_of_a_local_or_serial_run_starts_no_roles():
    assert_factory = {"local": dask_executor, "serial": serial_executor}
    for name, factory in assert_factory.items():
        with launch(ClusterConfig(executor=name)) as got:
            assert got is factory
