"""The task interface: one list of texts in, one set of result columns out.

A task knows nothing of Dask, MPI, Slurm or files. The runner hands it the texts of one chunk of a
shard; the task tokenizes them once, batches them by length, runs the model and returns columns in
input order, plus the rows it could not process with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..schemas import TableSchema


@dataclass
class TaskOutput:
    kept: list[int]
    """Indices (into the texts given) of the rows that produced a result, ascending."""
    columns: dict[str, list[Any]]
    """One list per output column of the task's schema (without `id`), aligned with `kept`."""
    rejected: list[tuple[int, str, str]] = field(default_factory=list)
    """(index, reason, detail) for each row the task could not process."""
    tokens: int = 0
    """Real (unpadded) tokens the model read and wrote, for throughput figures."""
    per_row: list[int] | None = None
    """Output rows per kept row, where a row gives several (recommend: its top-k); the columns
    then hold sum(per_row) values, each kept row's in turn. None: one row each."""
    usage: dict[str, int] = field(default_factory=dict)
    """Counters a user compares with other ways of running the job (generate: prompt_tokens,
    completion_tokens, and unparsed: constrained rows whose output did not complete)."""


class ModelTask:
    """What every task does first: its output schema and its model, as the registry says
    (pipeline/registry.py: the task's model kind and schema). Subclasses set `name`."""

    name: str

    def __init__(self, model_cfg, task_cfg):
        from .. import schemas
        from ..models import load_model
        from ..registry import TASKS

        spec = TASKS[self.name]
        self.schema = schemas.load(spec.schema)
        self.cfg = task_cfg
        self.loaded = load_model(model_cfg.path, spec.kind, model_cfg.device, model_cfg.dtype)


class Task(Protocol):
    name: str
    schema: TableSchema

    def process(self, texts: list[str], ids: list[str], extra: dict[str, list]) -> TaskOutput:
        """`ids`: the rows' ids (seeds for sampling); `extra`: the columns of
        `TaskConfig.input_columns()`, aligned with `texts`."""
        ...
