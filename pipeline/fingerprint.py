"""A run's fingerprint: everything that decides what a row's result is, and nothing else.

Input paths, output folder, batch size and cluster shape are left out: they change how a run
goes, not what it writes, so an incremental rerun with new files or more workers resumes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from . import __version__, schemas
from .config import JobConfig

_SMALL = 16 << 20  # files up to this size are hashed whole; larger ones (weights) by name and size


def model_identity(path: str) -> str:
    """A hash of the model folder's contents (config, tokenizer, weights by size)."""
    h = hashlib.sha256()
    root = Path(path)
    for p in sorted(q for q in root.rglob("*") if q.is_file() and not q.name.startswith(".")):
        rel = p.relative_to(root).as_posix()
        size = p.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        if size <= _SMALL:
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def fingerprint(job: JobConfig) -> dict:
    """{'sha': identity, 'fields': what it was computed from} for `job`."""
    task = {
        f"task.{k}": list(v) if isinstance(v, tuple) else v for k, v in asdict(job.task).items()
    }
    task.pop("task.batch_size")  # how rows are grouped, not what they become
    task.pop("task.max_tokens")
    fields = {
        "task": task.pop("task.name"),
        **task,
        "model": model_identity(job.model.path),
        "model.dtype": job.model.dtype,
        "input.text_column": job.input.text_column,
        "input.id_column": job.input.id_column,
        "input.keep_columns": list(job.input.keep_columns),
        "schema": f"{job.task.name}.v{schemas.load(job.task.name).version}",
        "fastserve": __version__.rsplit(".", 1)[0],  # patch releases do not change results
    }
    blob = json.dumps(fields, sort_keys=True).encode()
    return {"sha": hashlib.sha256(blob).hexdigest()[:16], "fields": fields}
