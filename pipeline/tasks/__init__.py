"""Tasks by name. `get_task` builds a task (and loads its model) once per process."""

from __future__ import annotations

from functools import cache

from ..config import ModelConfig, TaskConfig
from .base import Task, TaskOutput

__all__ = ["Task", "TaskOutput", "check_model", "get_task", "output_schema"]

# Which kind of checkpoint each task needs (see models/hf.py).
MODEL_KINDS = {"sentiment": "sequence-classification"}


def check_model(model_cfg: ModelConfig, task_cfg: TaskConfig) -> None:
    """Fail early, on the client and without loading weights, when the model folder is unfit."""
    from ..models.hf import check_checkpoint

    check_checkpoint(model_cfg.path, MODEL_KINDS[task_cfg.name])


@cache
def get_task(model_cfg: ModelConfig, task_cfg: TaskConfig) -> Task:
    """The task named by `task_cfg`, with its model loaded; cached so a worker loads it once."""
    if task_cfg.name == "sentiment":
        from .sentiment import SentimentTask

        return SentimentTask(model_cfg, task_cfg)
    raise ValueError(f"unknown task {task_cfg.name!r}")


def output_schema(task_name: str):
    """The declared output schema of a task, without loading its model."""
    from .. import schemas

    return schemas.load(task_name, 1)
