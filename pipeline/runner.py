"""One shard: read -> validate (good rows / rejected rows) -> task -> write atomically -> record.

Knows nothing of Dask: an executor calls `run_shard` wherever it likes, as often as it likes.
A shard's output is deterministic and every file is renamed into place, so two writers of one
shard (a retried task, an orphaned worker) leave the same bytes; the record is written last.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from . import schemas
from .config import JobConfig
from .errors import UserError
from .manifest import RunDir, atomic_write_json, atomic_write_parquet
from .plan import Shard
from .reader import ShardData, ShardReadError, read_shard
from .tasks import TaskOutput, get_task


@dataclass
class ShardResult:
    shard: str
    source: str
    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    usage: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    """Set when the shard as a whole could not be processed (e.g. an unreadable file)."""
    fatal: bool = False
    """With `error`: the model could not be loaded; every other shard would fail the same way."""
    bad_files: dict[str, str] = field(default_factory=dict)
    """With `error`: the shard's files that could not be read (key -> why); the others are fine."""
    skipped: bool = False
    """True when the shard was already complete and nothing was done."""
    model_started: float = 0.0
    """When (epoch seconds) its first batch went into the model: the run's start-up ends at the
    first shard's."""
    int8_check: dict | None = None
    """dtype int8: the part of this worker's check against float32 done in this shard
    (models/int8_check.py)."""


# One shard in the model at a time per process. A worker may run two shards at once (executors
# start workers with two task threads): the other one reads its Parquet or writes its output
# meanwhile, so I/O overlaps the model instead of stalling it. Loading the model happens under the
# lock too, so two threads never load it twice.
_model_lock = threading.Lock()


def _set_threads(threads: int) -> None:
    """Torch's intra-op threads for the calling thread (OpenMP's setting is per thread)."""
    if threads > 0:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere).

    Called after each shard leaves the model: glibc keeps what each batch shape freed in its
    arenas, so a long run's worker grew from 1.6 to 2.1 GB over its first half (bench/RESULTS.md).
    A trim between shards returns it without a malloc trim threshold, which would turn off
    glibc's dynamic mmap threshold and make every activation a fresh mmap (20-25% slower)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def warm(job: JobConfig, threads: int = 0, fingerprint_sha: str = "") -> float:
    """Load the job's model in this process ahead of its first shard (the executor runs this on
    each worker while the client plans); returns the seconds it took."""
    t0 = time.perf_counter()
    with _model_lock:
        _set_threads(threads)
        try:
            get_task(job.model, job.task, fingerprint_sha)
        except Exception:  # the first shard meets the same error and reports it
            return -1.0
    return time.perf_counter() - t0


def _validate_rows(
    ids: list[str | None],
    texts: list[str | None],
    duplicates: dict[int, tuple[str, str]],
    invalid_text: dict[int, str] | None = None,
    column: str = "text",
) -> tuple[list[int], list[tuple[int, str, str]]]:
    """Rows a task can take, and (row, reason, detail) for the rest, in row order.

    `duplicates` holds rows whose id appeared earlier in the corpus (pipeline/dedupe.py); an id
    repeated within this shard is caught here too, so a shard run alone is still exactly-once.
    """
    good, bad = [], []
    seen: set[str] = set()
    for i, (rid, text) in enumerate(zip(ids, texts, strict=True)):
        if rid is None:
            bad.append((i, "null_id", "the id column is null"))
        elif i in duplicates:
            bad.append((i, "duplicate_id", duplicates[i][0]))
        elif rid in seen:
            bad.append((i, "duplicate_id", "the same id is earlier in this shard"))
        elif invalid_text and i in invalid_text:
            bad.append((i, "invalid_text", invalid_text[i]))
        elif text is None:
            bad.append((i, "null_text", f"the text column {column!r} is null"))
        elif not (text.strip() if isinstance(text, str) else len(text)):
            bad.append((i, "empty_text", f"the text column {column!r} is empty or blank"))
        else:
            good.append(i)
        if rid is not None:
            seen.add(rid)
    return good, bad


def _rejected_table(data: ShardData, rows: list[tuple[int, str, str]]) -> pa.Table:
    rows = sorted(rows)
    return pa.table(
        {
            "id": [data.ids[i] for i, _, _ in rows],
            "source_file": [data.source_file[i] for i, _, _ in rows],
            "row_number": [data.row_number[i] for i, _, _ in rows],
            "reason": [r for _, r, _ in rows],
            "detail": [d for _, _, d in rows],
        },
        schema=schemas.load("rejected").arrow,
    )


def run_shard(
    shard: Shard,
    job: JobConfig,
    fingerprint_sha: str,
    threads: int = 0,
    duplicates: dict[int, tuple[str, str]] | None = None,
) -> ShardResult:
    """Process `shard` into the run folder of `job`; return its counts and timings.

    `duplicates`: rows (by position in the shard) whose id appeared earlier in the corpus, with
    the detail and the shard holding the first occurrence.

    A user-facing problem (an unreadable file, a full disk) is returned as `ShardResult.error`
    so the run can finish the other shards; anything else propagates.
    """
    run = RunDir.at(job.output.path)
    if is_complete(run, shard.id, fingerprint_sha):
        done = run.read_record(shard.id)
        return ShardResult(shard=shard.id, source=shard.sources, skipped=True, **_counts(done))
    result = ShardResult(shard=shard.id, source=shard.sources)
    started = time.time()
    t0 = time.perf_counter()
    try:
        data = read_shard(shard, job.input, job.task.input_columns())
    except ShardReadError as e:
        result.error, result.bad_files = str(e), e.bad
        return result
    except UserError as e:
        result.error = str(e)
        return result
    duplicates = duplicates or {}
    good, bad = _validate_rows(
        data.ids, data.texts, duplicates, data.invalid_text, job.input.text_column
    )
    t1 = time.perf_counter()

    with _model_lock:
        t_lock = time.perf_counter()
        _set_threads(threads)
        try:
            task = get_task(job.model, job.task, fingerprint_sha)
        except UserError as e:
            result.error, result.fatal = str(e), True
            return result
        t_loaded = time.perf_counter()
        result.model_started = time.time()
        texts = [data.texts[i] for i in good]
        ids = [data.ids[i] for i in good]
        extra = {c: [v[i] for i in good] for c, v in data.extra.items()}
        if good:
            out = task.process(texts, ids, extra)
        else:  # every row rejected already: nothing for the model
            out = TaskOutput(
                kept=[], columns={f.name: [] for f in task.schema.fields if f.name != "id"}
            )
        t_model = time.perf_counter()
        if job.model.dtype == "int8" and good:  # the worker's first rows in float32 too
            from .models.int8_check import DEFAULT_MIN_AGREEMENT, check_int8

            threshold = job.model.int8_min_agreement
            threshold = DEFAULT_MIN_AGREEMENT if threshold is None else threshold
            try:
                result.int8_check = check_int8(task, texts, ids, extra, threshold, got=out)
            except UserError as e:  # below the threshold: the run stops, nothing is written
                result.error, result.fatal = str(e), True
                return result
        t2 = time.perf_counter()
    trim_heap()
    kept = [good[k] for k in out.kept]
    bad += [(good[k], reason, detail) for k, reason, detail in out.rejected]

    schema = task.schema.arrow
    written = (
        kept
        if out.per_row is None
        else [i for i, n in zip(kept, out.per_row, strict=True) for _ in range(n)]
    )
    columns = {"id": [data.ids[i] for i in written], **out.columns}
    table = pa.table({f.name: columns[f.name] for f in schema}, schema=schema)
    if job.output.schema and job.output.schema != task.schema.version:  # an earlier version
        table = schemas.as_version(table, schemas.load(task.schema.name, job.output.schema))
    if data.keep.num_columns:
        taken = data.keep.take(pa.array(written, type=pa.int64()))
        for name in taken.column_names:
            table = table.append_column(taken.schema.field(name), taken.column(name))
    bound = (run.read_run() or {}).get("fingerprint", {}).get("sha")
    if bound != fingerprint_sha:  # the folder was replaced (--overwrite) under this run
        result.error = (
            f"shard {shard.id}: the run folder {run.root} is no longer bound to this run's config "
            f"(it was replaced by another run); nothing was written for it"
        )
        return result
    try:
        if bad:
            atomic_write_parquet(run.rejected_path(shard.id), _rejected_table(data, bad))
        else:  # an earlier attempt's rejected rows (another decision) must not stay
            run.rejected_path(shard.id).unlink(missing_ok=True)
        checksum = atomic_write_parquet(run.output_path(shard.id), table)
    except OSError as e:
        result.error = write_error(e, run)
        return result
    t3 = time.perf_counter()

    result.rows_in = len(data.texts)
    result.rows_out = len(kept)  # rows answered (a recommend row writes its top-k)
    result.rows_rejected = len(bad)
    result.rejected_by_reason = dict(Counter(r for _, r, _ in bad))
    result.tokens = out.tokens
    result.usage = dict(out.usage)
    result.seconds = {
        "read": t1 - t0,
        "wait": t_lock - t1,  # for the other shard of this worker to leave the model
        "load": t_loaded - t_lock,  # the model's load, on a worker's first shard (unless warm)
        "model": t_model - t_loaded,
        "write": t3 - t2,
    }
    if result.int8_check is not None:
        result.seconds["check"] = t2 - t_model  # its rows in float32
    if result.rows_in != result.rows_out + result.rows_rejected:  # invariant 1: nothing lost
        raise AssertionError(
            f"shard {shard.id}: {result.rows_in} in != {result.rows_out} + {result.rows_rejected}"
        )
    dup_of = sorted(
        {duplicates[i][1] for i, reason, _ in bad if reason == "duplicate_id" and i in duplicates}
    )
    record = {
        **asdict(result),
        "dup_of": dup_of,
        "fingerprint": fingerprint_sha,
        "output": run.output_path(shard.id).name,
        "sha256": checksum,
        "started": started,
        "finished": time.time(),
        "worker": f"{socket.gethostname()}:{os.getpid()}",
    }
    try:
        atomic_write_json(run.record_path(shard.id), record)
    except OSError as e:
        result.error = write_error(e, run)
    return result


def is_complete(run: RunDir, shard_id: str, fingerprint_sha: str) -> bool:
    """A record of this config, and the output it records (a deleted output is done again)."""
    rec = run.read_record(shard_id)
    return (
        rec is not None
        and rec.get("fingerprint") == fingerprint_sha
        and run.output_path(shard_id).exists()
    )


def write_error(e: OSError, run: RunDir) -> str:
    """A failed write to the run folder, in words that say what to do."""
    where = e.filename or run.root
    what = e.strerror or str(e)
    return f"cannot write {where}: {what}; free space or fix permissions there, then rerun the same command (completed shards are kept)"


def _counts(record: dict) -> dict:
    keys = ("rows_in", "rows_out", "rows_rejected", "rejected_by_reason", "tokens", "seconds")
    return {**{k: record[k] for k in keys}, "usage": record.get("usage", {})}
