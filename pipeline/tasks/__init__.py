"""Tasks by name. `get_task` builds a task (and loads its model) once per process."""

from __future__ import annotations

from functools import lru_cache

from ..config import ModelConfig, TaskConfig
from ..registry import TASKS
from .base import Task, TaskOutput

__all__ = ["MODEL_KINDS", "Task", "TaskOutput", "check_model", "get_task", "output_schema"]

# Which kind of model each task needs (see models/hf.py KIND_NAMES), from the registry.
MODEL_KINDS = {name: spec.kind for name, spec in TASKS.items()}


def check_model(model_cfg: ModelConfig, task_cfg: TaskConfig) -> None:
    """Fail early, on the client and without loading weights, when the model folder is unfit."""
    from ..models import check_model_folder

    check_model_folder(model_cfg.path, MODEL_KINDS[task_cfg.name])


@lru_cache(maxsize=2)
def get_task(model_cfg: ModelConfig, task_cfg: TaskConfig, identity: str = "") -> Task:
    """The task named by `task_cfg`, with its model loaded; cached so a worker loads it once.

    `identity` (the run's fingerprint, which holds the model's bytes) is part of the key: a
    long-lived worker given a retrained model at the same path loads it again. Two entries: a
    worker serving two runs at once keeps both, an older model is let go."""
    if task_cfg.name not in TASKS:
        raise ValueError(f"unknown task {task_cfg.name!r}")
    return TASKS[task_cfg.name].load()(model_cfg, task_cfg)


def output_schema(task_name: str):
    """The declared output schema of a task, without loading its model."""
    from .. import schemas

    return schemas.load(TASKS[task_name].schema)
