"""executor = 'serial': no Dask; every shard in this process, in turn."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..config import ClusterConfig


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
