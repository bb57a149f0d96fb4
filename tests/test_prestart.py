"""The executor started in a thread while the client plans (pipeline/prestart.py), with a
factory standing in for the executor at its seam (the real one: tests/test_infer_cli.py)."""

import threading
import time
from contextlib import contextmanager

import pytest

from fastserve.pipeline.prestart import Prestarted


def factory(log, delay=0.2, fail=None):
    @contextmanager
    def make(cfg):
        log.append(("enter", cfg, threading.current_thread().name))
        time.sleep(delay)
        if fail:
            raise fail
        try:
            yield f"executor {cfg}"
        finally:
            log.append(("exit", cfg))

    return make


def test_the_executor_starts_in_a_thread_while_the_caller_goes_on():
    log = []
    t0 = time.time()
    early = Prestarted(factory(log, delay=0.5), "c")
    assert early.ready_at == 0.0  # not waited for: the client goes on planning meanwhile
    with early.use() as ex:  # waits for it
        assert ex == "executor c" and early.ready_at >= t0
    assert log == [("enter", "c", "fastserve-executor-start")]  # use() does not end it
    early.close()
    assert log[-1] == ("exit", "c")


def test_a_failed_start_is_raised_where_the_executor_is_used_and_close_is_safe():
    early = Prestarted(factory([], fail=ValueError("no scheduler there")), "c")
    with pytest.raises(ValueError, match="no scheduler there"), early.use():
        pass
    early.close()


def test_closed_unused_the_executor_still_ends():
    log = []
    early = Prestarted(factory(log), "c")
    early.close()  # e.g. the folder was bound to another config: nothing ran
    assert [e[0] for e in log] == ["enter", "exit"]


# -- in a run: when the executor starts, and when the workers load the model ---------------------


class RecordingExecutor:
    """The serial executor, recording what the run asks of its workers (the seam: the Dask
    executor's own behaviour is tested in tests/test_infer_cli.py)."""

    def __init__(self, log):
        from fastserve.pipeline.executors import SerialExecutor

        self.inner, self.log = SerialExecutor(), log
        self.threads, self.dashboard_link = 0, None

    def map_unordered(self, *args, **kwargs):
        return self.inner.map_unordered(*args, **kwargs)

    def on_each_worker(self, fn, key, **kwargs):
        self.log.append(("warm",))
        return []


def run_with_log(tmp_path, model, log=None, **output):
    from fastserve.pipeline.config import load_job
    from fastserve.pipeline.infer import run_infer

    log = [] if log is None else log

    @contextmanager
    def factory(cfg):
        log.append(("enter",))
        yield RecordingExecutor(log)

    job = load_job(
        None,
        {
            "input": {"paths": [str(tmp_path / "c")]},
            "model": {"path": str(model)},
            "task": {"name": "sentiment"},
            "output": {"path": str(tmp_path / "out"), **output},
            "cluster": {"executor": "local"},
        },
    )
    return run_infer(job, factory), log


def test_workers_start_only_once_the_folder_is_known_to_take_the_run(tmp_path):
    """A new folder: the executor starts and the model load is asked for (shards are pending); a
    rerun of a complete folder starts the executor but loads nothing; a folder bound to another
    config is refused before any worker starts."""
    from fastserve.pipeline.errors import RunStateError
    from fastserve.pipeline.testing import write_corpus
    from fastserve.pipeline.testing.models import build_classifier

    model = build_classifier(tmp_path / "m")
    write_corpus(tmp_path / "c", n_files=2, rows=6)
    summary, log = run_with_log(tmp_path, model)
    assert summary.ok and log == [("enter",), ("warm",)]
    assert {"config", "planned", "cluster", "first_batch"} <= set(summary.startup)
    summary, log = run_with_log(tmp_path, model)
    assert summary.ok and summary.processed.shards == 0 and log == [("enter",)]
    log = []
    with pytest.raises(RunStateError, match="holds a run with another config"):
        run_with_log(tmp_path, build_classifier(tmp_path / "m2", seed=1), log)
    assert log == []  # refused at once: no worker was started for it
