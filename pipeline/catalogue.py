"""The items a recommend job scores its queries against, read block by block from Parquet.

A catalogue is vectors: an embed run folder (complete: `_SUCCESS`), or Parquet files holding a
vector column (task.catalogue_embedding_column). Parquet files of id + text are embedded once,
with the job's own model, into the nested embed run folder `<output>/_catalogue` (`embed_texts`),
so a nightly rerun embeds only new items and queries are embedded exactly as the items were.

Workers read the vectors themselves, memory-mapped, one block at a time: nothing of the catalogue
travels through the scheduler, and memory holds one block, whatever the catalogue's size.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import InputConfig, JobConfig, OutputConfig, TaskConfig
from .errors import ConfigError, InputError, Stopped
from .manifest import RunDir

NESTED = "_catalogue"


def embed_run_fields(folder: str | Path) -> dict | None:
    """The fingerprint fields of the embed run folder `folder`, or None when it is none."""
    run = Path(folder) / "_manifest" / "run.json"
    try:
        fields = json.loads(run.read_text())["fingerprint"]["fields"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return fields if fields.get("task") == "embed" else None


@dataclass(frozen=True)
class Catalogue:
    files: tuple[str, ...]
    """Its Parquet files, in the order items are numbered."""
    id_column: str
    vector_column: str
    filter_column: str | None = None

    @classmethod
    def of(cls, t: TaskConfig) -> Catalogue:
        """The catalogue a prepared recommend task names (task.catalogue: an embed run folder,
        or Parquet files with task.catalogue_embedding_column)."""
        if t.catalogue_embedding_column:
            from .inputs import resolve_inputs

            files = tuple(resolve_inputs([t.catalogue]).values())
            return cls(files, t.catalogue_id_column, t.catalogue_embedding_column, t.filter_column)
        run = RunDir.at(t.catalogue)
        files = tuple(str(run.output_path(sid)) for sid in sorted(run.records()))
        return cls(files, "id", "embedding", t.filter_column)

    def ids(self) -> pa.Array:
        """Every item's id, as strings, in item order (ids only: a small read)."""
        parts = [pq.read_table(f, columns=[self.id_column]).column(0) for f in self.files]
        if not parts:
            return pa.array([], type=pa.string())
        return pa.chunked_array(parts).cast(pa.string()).combine_chunks()

    def blocks(self, block_items: int) -> Iterator[tuple[np.ndarray, pa.Array | None]]:
        """(vectors (n, d) float32, the block's filter values) per block of at most
        `block_items` items, in item order."""
        columns = [self.vector_column, *([self.filter_column] if self.filter_column else [])]
        for path in self.files:
            f = pq.ParquetFile(path, memory_map=True)
            for batch in f.iter_batches(batch_size=block_items, columns=columns):
                vec = matrix(batch.column(0), path, self.vector_column)
                yield vec, (batch.column(1) if self.filter_column else None)

    def check(self, whole: bool, metric: str = "cosine") -> None:
        """The files are there and hold the columns, with vectors of one dimension. `whole`
        (vectors FastServe did not write): every row is read too, a block at a time: no null or
        repeated id, no null, empty, NaN or (cosine) zero vector. An InputError names the file,
        the column and the row."""
        if not self.files:
            raise InputError("the catalogue holds no items (no Parquet files)")
        dims: dict[int, str] = {}
        seen: set[str] = set()
        for path in self.files:
            if not Path(path).is_file():
                raise InputError(
                    f"catalogue file {path} is missing from its run folder; rerun the command "
                    "that made that folder (it redoes the missing shard), then this one"
                )
            schema = pq.read_schema(path)
            needed = [self.id_column, self.vector_column]
            needed += [self.filter_column] if self.filter_column else []
            lacking = [c for c in needed if c not in schema.names]
            if lacking:
                hint = (
                    "; the embed run must keep it (--keep-column)"
                    if self.filter_column in lacking
                    else ""
                )
                raise InputError(
                    f"catalogue file {path} lacks the column(s) {', '.join(lacking)} (columns: "
                    f"{', '.join(schema.names)}){hint}"
                )
            f = pq.ParquetFile(path)
            row = 0
            for batch in f.iter_batches(
                batch_size=8192 if whole else 1, columns=[self.id_column, self.vector_column]
            ):
                vec = matrix(batch.column(1), path, self.vector_column, row)
                dims.setdefault(vec.shape[1], path)
                if whole:
                    ids = batch.column(0).cast(pa.string()).to_pylist()
                    _check_rows(ids, vec, seen, path, self.id_column, row, metric)
                    row += len(ids)
                else:
                    break
        if len(dims) > 1:
            (a, pa_), (b, pb) = list(dims.items())[:2]
            raise InputError(
                f"the catalogue's vectors differ in dimension: {a} in {pa_}, {b} in {pb}; a "
                "catalogue's vectors come from one model"
            )


def _check_rows(ids, vec: np.ndarray, seen: set, path: str, column: str, row0: int, metric: str):
    for j, i in enumerate(ids):
        if i is None:
            raise InputError(f"catalogue file {path}: row {row0 + j} has a null {column!r}")
        if i in seen:
            raise InputError(
                f"catalogue file {path}: item id {i!r} (row {row0 + j}) appears twice in the "
                "catalogue; give each item one row"
            )
        seen.add(i)
    if metric == "cosine":
        zero = np.flatnonzero(~vec.any(axis=1))
        if len(zero):
            raise InputError(
                f"catalogue file {path}: row {row0 + int(zero[0])} (item {ids[zero[0]]!r}) has a "
                "zero vector, which has no direction (metric cosine); drop it or use metric dot"
            )


def matrix(col: pa.Array, path: str, name: str, row0: int = 0) -> np.ndarray:
    """A list-of-floats column as an (n, d) float32 matrix; an InputError naming the row for a
    null, empty or uneven vector, or a null/NaN/infinite value (a catalogue cannot hold a row it
    cannot score). `row0`: the file row of the column's first."""
    arr = col.cast(pa.list_(pa.float32())) if not pa.types.is_list(col.type) else col

    def bad(j: int, what: str) -> InputError:
        return InputError(
            f"catalogue file {path}: column {name!r} row {row0 + j} {what}; every item needs a "
            "vector of the model's dimension"
        )

    if arr.null_count:
        raise bad(int(np.flatnonzero(~arr.is_valid().to_numpy(zero_copy_only=False))[0]), "is null")
    lengths = np.diff(arr.offsets.to_numpy())
    if len(lengths) and (lengths == 0).any():
        raise bad(int(np.flatnonzero(lengths == 0)[0]), "is empty")
    if len(lengths) and (lengths != lengths[0]).any():
        j = int(np.flatnonzero(lengths != lengths[0])[0])
        raise bad(j, f"has {lengths[j]} values where row {row0} has {lengths[0]}")
    d = int(lengths[0]) if len(lengths) else 0
    values = arr.flatten().cast(pa.float32()).to_numpy(zero_copy_only=False)
    if not np.isfinite(values).all():
        raise bad(
            int(np.flatnonzero(~np.isfinite(values))[0]) // max(d, 1),
            "holds a null, NaN or infinite value",
        )
    return values.reshape(len(arr), d)


def catalogue_identity(job: JobConfig) -> str:
    """What the catalogue holds: its files' bytes (an embed run's outputs, the files of
    task.catalogue_embedding_column, or the texts a catalogue is embedded from, which decide its
    vectors with the model); part of the run's fingerprint, so a changed catalogue is refused
    before anything is embedded or scored."""
    from .fingerprint import content_identity
    from .inputs import resolve_inputs

    t = job.task
    vectors = t.name == "recommend" and (
        t.catalogue_embedding_column or embed_run_fields(t.catalogue) is not None
    )
    if vectors:
        files = Catalogue.of(t).files
    else:  # texts (rerank's, or a recommend catalogue to embed): the files they are read from
        files = tuple(resolve_inputs([t.catalogue]).values())
    return content_identity([(Path(f).name, Path(f)) for f in files])


def embed_job(job: JobConfig) -> JobConfig:
    """The embed run that turns a Parquet catalogue of texts into vectors, in
    <output>/_catalogue, with the model and the embedding options of `job`."""
    t = job.task
    return dataclasses.replace(
        job,
        input=InputConfig(
            paths=(t.catalogue,),
            text_column=t.catalogue_text_column,
            id_column=t.catalogue_id_column,
            keep_columns=(t.filter_column,) if t.filter_column else (),
        ),
        task=TaskConfig(
            name="embed",
            pooling=t.pooling,
            normalize=t.normalize,
            max_length=t.max_length,
            on_long=t.on_long,
            batch_size=t.batch_size,
            max_tokens=t.max_tokens,
        ),
        output=OutputConfig(
            path=str(Path(job.output.path) / NESTED), overwrite=job.output.overwrite
        ),
    )


# The embedding options of the recommend task that must be those its catalogue was made with.
SAME_AS_ITEMS = ("pooling", "normalize", "max_length")


def resolve(job: JobConfig, share) -> JobConfig:
    """Before the run's fingerprint: the catalogue is checked, and queries get the embedding
    options an embed run folder's items were made with. Raises a UserError when it cannot serve
    the job. A text catalogue is embedded later, under the run folder's lock (`embed_texts`)."""
    t = job.task
    if not Path(t.catalogue).exists() and not any(c in t.catalogue for c in "*?["):
        raise InputError(
            f"task.catalogue {t.catalogue} does not exist; name an embed run folder, or Parquet "
            "files of the items"
        )
    if t.catalogue_embedding_column:
        Catalogue.of(t).check(whole=True, metric=t.metric)
        return job
    fields = embed_run_fields(t.catalogue)
    if fields is None:  # texts, embedded by this run
        if not job.model.path:
            raise ConfigError(
                f"task.catalogue {t.catalogue} holds texts to embed, and no model is given; give "
                "--model, or a catalogue of vectors (an embed run folder, or "
                "task.catalogue_embedding_column)"
            )
        if share != (0, 1):
            raise ConfigError(
                "array tasks share one catalogue: embed it first (fastserve infer --task embed "
                f"--input {t.catalogue} ...) and name that run folder as task.catalogue"
            )
        return job
    if (Path(t.catalogue) / "_manifest" / "run.json").exists() and not RunDir.at(
        t.catalogue
    ).success.exists():
        raise InputError(
            f"task.catalogue {t.catalogue} is an embed run folder that is not complete (no "
            "_SUCCESS); rerun its command until it is, then this one"
        )
    job = _embedded_like(job, fields, Path(t.catalogue))
    Catalogue.of(job.task).check(whole=False)
    return job


def embed_texts(job: JobConfig, run_embed: Callable[[JobConfig], object]) -> JobConfig:
    """A text catalogue embedded into <output>/_catalogue (only what is new; what task.catalogue
    no longer holds is withdrawn), by `run_embed` (it runs an embed job to its end and returns
    its RunSummary); the job then names that folder. Other catalogues: the job unchanged.
    Raises Stopped when the run was asked to stop meanwhile."""
    t = job.task
    if t.catalogue_embedding_column or embed_run_fields(t.catalogue) is not None:
        return job
    nested = embed_job(job)
    _withdraw_removed(nested)
    summary = run_embed(nested)
    folder = Path(nested.output.path)
    if getattr(summary, "interrupted", False):
        raise Stopped()
    if not getattr(summary, "ok", False):
        failed = "; ".join(f"{k}: {v}" for k, v in getattr(summary, "failed", {}).items())
        raise InputError(
            f"the catalogue {t.catalogue} could not be embedded whole into {folder} ({failed}); "
            f"in the catalogue, the text is task.catalogue_text_column ({t.catalogue_text_column!r}), "
            f"the id task.catalogue_id_column ({t.catalogue_id_column!r}); fix what is named and "
            "rerun the same command (embedded items are kept)"
        )
    job = dataclasses.replace(job, task=dataclasses.replace(t, catalogue=str(folder)))
    Catalogue.of(job.task).check(whole=False)
    return job


def _withdraw_removed(nested: JobConfig) -> None:
    """Shards of the nested catalogue folder holding files the catalogue no longer names are
    withdrawn (their other files planned again), so the items are what task.catalogue holds."""
    from .inputs import resolve_inputs
    from .ledger import extend, read_ledger

    run = RunDir.at(nested.output.path)
    if not run.plan_dir.is_dir():
        return
    files = resolve_inputs(nested.input.paths)
    live = read_ledger(run.plan_dir).live
    gone = {s.id: k for s in live for k in s.keys if k not in files}
    if gone:
        retract = {sid: f"catalogue file {key} was removed" for sid, key in gone.items()}
        cfg = nested.input
        extend(run, files, cfg.text_column, cfg.shard_rows, retract=retract)


def _embedded_like(job: JobConfig, fields: dict, folder: Path) -> JobConfig:
    """Queries embedded as the catalogue's items were: by the same model, with the same
    pooling, normalisation and max length (taken from the catalogue where the job left them)."""
    from .fingerprint import model_identity

    t = job.task
    if t.embedding_column:  # the queries are vectors already: no model runs
        return job
    if fields.get("model") != model_identity(job.model.path):
        raise ConfigError(
            f"the catalogue {folder} was embedded with another model than {job.model.path}; "
            "vectors of two models cannot be compared: embed the catalogue with this model (or "
            "give the model it was made with)"
        )
    defaults, changes = TaskConfig(), {}
    for key in SAME_AS_ITEMS:
        theirs = fields.get(f"task.{key}", getattr(defaults, key))
        ours = getattr(t, key)
        if ours == getattr(defaults, key):
            changes[key] = theirs
        elif ours != theirs:
            raise ConfigError(
                f"task.{key} is {ours!r}, but the catalogue {folder} was embedded with {theirs!r}; "
                f"leave task.{key} out (queries are then embedded as the items were)"
            )
    return dataclasses.replace(job, task=dataclasses.replace(t, **changes))
