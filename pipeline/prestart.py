"""The executor started in a thread while the client plans.

A run's start-up is a chain: the client reads its config, lists its inputs, hashes the model,
binds the run folder and plans the shards; the workers start and, once the plan says a shard is
pending, import torch and load the model. Starting the workers needs nothing of the plan, so it
runs beside the planning instead of after it.

Knows nothing of Dask: it enters whatever executor factory it is given, in a thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any


class Prestarted:
    """`factory(cfg)` entered in a thread from now on; `use()` waits for it, `close()` ends it
    (whether or not it was used)."""

    def __init__(self, factory: Callable, cfg: Any):
        self._stack = ExitStack()
        self._ex: Any = None
        self._error: BaseException | None = None
        self.ready_at = 0.0
        """When the executor was up (epoch seconds)."""
        self._thread = threading.Thread(
            target=self._start, args=(factory, cfg), name="fastserve-executor-start", daemon=True
        )
        self._thread.start()

    def _start(self, factory: Callable, cfg: Any) -> None:
        try:
            ex = self._stack.enter_context(factory(cfg))
        except BaseException as e:  # raised again by use(), in the client's thread
            self._error = e
            return
        self._ex, self.ready_at = ex, time.time()

    @contextmanager
    def use(self, cfg: Any = None) -> Iterator[Any]:
        """The executor, once up (an executor factory's shape; `close()` ends it, not this)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield self._ex

    def close(self) -> None:
        self._thread.join()
        self._stack.close()
