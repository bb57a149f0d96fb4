"""A run's fingerprint: everything that decides what a row's result is, and nothing else.

Input paths, output folder, batch size and cluster shape are left out: they change how a run
goes, not what it writes, so an incremental rerun with new files or more workers resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

from . import __version__, schemas
from .config import JobConfig, TaskConfig


def _cache_file() -> Path | None:
    home = os.environ.get("FASTSERVE_HOME") or str(Path.home() / ".fastserve")
    return Path(home) / "cache" / "file-hashes.json"


def _stat_key(p: Path) -> str:
    # ctime too: a rewrite that restores the old size and mtime (cp -p, rsync -t) still changes it
    st = p.stat()
    return f"{os.path.realpath(p)}\0{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def model_identity(path: str) -> str:
    """A hash of the model folder's contents: every file's name and bytes (see content_identity);
    "none" for a job that runs no model."""
    if not path:
        return "none"
    root = Path(path)
    files = sorted(q for q in root.rglob("*") if q.is_file() and not q.name.startswith("."))
    return content_identity([(p.relative_to(root).as_posix(), p) for p in files])


def content_identity(files: list[tuple[str, Path]]) -> str:
    """A hash of (name, bytes) of each file.

    Files are hashed whole (a retrained model of the same size is another model); the hashes are
    cached by path, size, mtime and ctime in $FASTSERVE_HOME/cache (default ~/.fastserve), so a
    10 GB folder is read once, not on every run.
    """
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text()) if cache_path else {}
    except (OSError, ValueError):
        cache = {}
    h = hashlib.sha256()
    fresh = {}
    for name, p in files:
        key = _stat_key(p)
        digest = cache.get(key) or _sha256(p)
        fresh[key] = digest
        h.update(f"{name}\0{digest}\0".encode())
    if cache_path and any(k not in cache for k in fresh):
        try:  # best effort: a read-only home only costs the hashing again next time
            from .manifest import atomic_write_json

            keep = dict(list(cache.items())[-5000:])  # bounded: the newest entries
            atomic_write_json(cache_path, {**keep, **fresh})
        except OSError:
            pass
    return h.hexdigest()[:16]


# Task options added since 0.2.0: left out of the fingerprint while at their default, so a folder
# made before they existed keeps its identity (its rows are what the default gives).
LATER_OPTIONS = (
    "prompt_template",
    "chat",
    "system",
    "system_column",
    "json_schema",
    "regex",
    "choices",
    "requests",
    "messages_column",
    "labels",
    "hypothesis_template",
    "multi_label",
    "question_column",
    "question",
    "doc_stride",
    "max_answer_length",
    "max_question_length",
    "handle_impossible",
    "k",
    "text_pair_column",
    "catalogue_id_column",
    "catalogue_text_column",
    "embedding_column",
    "catalogue_embedding_column",
    "metric",
    "exclude_column",
    "filter_column",
)


def keep_folder_schema(job: JobConfig, bound: dict | None) -> JobConfig:
    """`job` as it reruns into a folder bound to `bound` (its run record): a folder started with an
    earlier version of the task's output schema goes on writing that version (output.schema = 0
    only, and not with --overwrite, which starts it afresh), so one folder never mixes two and
    a nightly run is not refused for a FastServe upgrade that added a schema version."""
    if job.output.schema or job.output.overwrite or not bound:
        return job
    name = f"{job.task.name}.v"
    fields = (bound.get("fingerprint") or {}).get("fields")
    was = str(fields.get("schema", "")) if isinstance(fields, dict) else ""
    if not (was.startswith(name) and was[len(name) :].isdigit()):
        return job
    version = int(was[len(name) :])
    if version == schemas.latest(job.task.name) or version not in schemas.versions(job.task.name):
        return job
    return replace(job, output=replace(job.output, schema=version))


def fingerprint(job: JobConfig) -> dict:
    """{'sha': identity, 'fields': what it was computed from} for `job`."""
    task = {
        f"task.{k}": list(v) if isinstance(v, tuple) else v for k, v in asdict(job.task).items()
    }
    task.pop("task.batch_size")  # how rows are grouped, not what they become
    task.pop("task.max_tokens")
    task.pop("task.reuse_prefix")  # how prompts are prefilled, not what they become
    task.pop("task.json_schema_file")  # its schema is task.json_schema; where it lay is not
    task.pop("task.block_items")  # how the catalogue is scored, not what the top-k is
    task.pop("task.catalogue")  # where it lies is not what it holds: that is "catalogue" below
    task.pop("task.candidates")  # likewise
    defaults = TaskConfig()
    for name in LATER_OPTIONS:
        if getattr(job.task, name) == getattr(defaults, name):
            task.pop(f"task.{name}")
    fields = {
        "task": task.pop("task.name"),
        **task,
        "model": model_identity(job.model.path),
        "model.dtype": job.model.dtype,
        "input.text_column": job.input.text_column,
        "input.id_column": job.input.id_column,
        "input.keep_columns": list(job.input.keep_columns),
        "schema": f"{job.task.name}.v{job.output.schema or schemas.latest(job.task.name)}",
        "fastserve": __version__.rsplit(".", 1)[0],  # patch releases do not change results
    }
    if job.model.dtype == "int8":  # how it is quantized decides the rows too
        from .models.int8_check import SCHEME

        fields["model.int8"] = SCHEME
    if job.task.catalogue:
        from .catalogue import catalogue_identity

        fields["catalogue"] = catalogue_identity(job)
    if job.task.candidates:
        from .candidates import candidates_identity

        fields["candidates"] = candidates_identity(job.task.candidates)
    blob = json.dumps(fields, sort_keys=True).encode()
    return {"sha": hashlib.sha256(blob).hexdigest()[:16], "fields": fields}
