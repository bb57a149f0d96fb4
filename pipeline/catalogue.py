"""The items a recommend job scores its queries against, read block by block from Parquet.

A catalogue is vectors: an embed run folder (complete: `_SUCCESS`), or Parquet files holding a
vector column (task.catalogue_embedding_column). Parquet files of id + text are embedded once,
with the job's own model, into the nested embed run folder `<output>/_catalogue` (`prepare`), so a
nightly rerun embeds only new items and queries are embedded exactly as the items were.

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
from .errors import ConfigError, InputError
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

    def check(self) -> None:
        """The files exist and hold the columns, with vectors of one dimension (from the
        footers and first rows only)."""
        if not self.files:
            raise InputError("the catalogue holds no items (no Parquet files)")
        dims = set()
        for path in self.files:
            schema = pq.read_schema(path)
            needed = [self.id_column, self.vector_column]
            needed += [self.filter_column] if self.filter_column else []
            lacking = [c for c in needed if c not in schema.names]
            if lacking:
                raise InputError(
                    f"catalogue file {path} lacks the column(s) {', '.join(lacking)} (columns: "
                    f"{', '.join(schema.names)})"
                    + (
                        "; an embed run keeps a column with --keep-column"
                        if self.filter_column in lacking
                        else ""
                    )
                )
            first = pq.ParquetFile(path).iter_batches(batch_size=1, columns=[self.vector_column])
            for batch in first:
                dims.add(matrix(batch.column(0), path, self.vector_column).shape[1])
                break
        if len(dims) > 1:
            raise InputError(f"the catalogue's vectors differ in dimension ({sorted(dims)})")


def matrix(col: pa.Array, path: str, name: str) -> np.ndarray:
    """A list-of-floats column as an (n, d) float32 matrix; an InputError for rows of another
    length or nulls (a catalogue cannot hold a row it cannot score)."""
    arr = col.cast(pa.list_(pa.float32())) if not pa.types.is_list(col.type) else col
    if arr.null_count:
        raise InputError(f"catalogue file {path}: column {name!r} has null vectors")
    lengths = np.diff(arr.offsets.to_numpy())
    if len(lengths) and (lengths != lengths[0]).any():
        raise InputError(f"catalogue file {path}: column {name!r} holds vectors of several lengths")
    d = int(lengths[0]) if len(lengths) else 0
    values = arr.flatten().cast(pa.float32()).to_numpy(zero_copy_only=False)
    if np.isnan(values).any():
        raise InputError(f"catalogue file {path}: column {name!r} holds null or NaN values")
    return values.reshape(len(arr), d)


def catalogue_identity(job: JobConfig) -> str:
    """What the catalogue holds: its files' bytes (an embed run's outputs, or the files of
    task.catalogue_embedding_column, or rerank's texts); part of the run's fingerprint."""
    from .fingerprint import content_identity
    from .inputs import resolve_inputs

    t = job.task
    if t.name == "recommend":
        files = Catalogue.of(t).files
    else:
        files = tuple(resolve_inputs([t.catalogue]).values())
    return content_identity([(Path(f).name, Path(f)) for f in files])


def run_identity(folder: str) -> str:
    """What a run folder's results are: its output files' bytes."""
    from .fingerprint import content_identity

    run = RunDir.at(folder)
    files = [run.output_path(sid) for sid in sorted(run.records())]
    return content_identity([(f.name, f) for f in files])


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


def prepare(job: JobConfig, run_embed: Callable[[JobConfig], object], share) -> JobConfig:
    """The job with task.catalogue naming vectors (an embed run folder, or Parquet files with
    task.catalogue_embedding_column), embedding a text catalogue first (`run_embed` runs an
    embed job to completion and returns its RunSummary); queries get the items' embedding
    options. Raises a UserError when the catalogue cannot serve the job."""
    t = job.task
    if t.catalogue_embedding_column:
        Catalogue.of(t).check()
        return job
    fields = embed_run_fields(t.catalogue)
    folder = Path(t.catalogue)
    if fields is None:  # items to embed
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
        nested = embed_job(job)
        summary = run_embed(nested)
        folder = Path(nested.output.path)
        if not getattr(summary, "ok", False):
            failed = "; ".join(f"{k}: {v}" for k, v in getattr(summary, "failed", {}).items())
            raise InputError(
                f"the catalogue {t.catalogue} could not be embedded whole into {folder}"
                + (f" ({failed})" if failed else " (interrupted)")
                + "; fix what is named and rerun the same command (embedded items are kept)"
            )
        fields = embed_run_fields(folder)
    elif not RunDir.at(folder).success.exists():
        raise InputError(
            f"task.catalogue {folder} is an embed run folder that is not complete (no _SUCCESS); "
            "rerun its command until it is, then this one"
        )
    assert fields is not None
    job = _embedded_like(job, fields, folder)
    job = dataclasses.replace(job, task=dataclasses.replace(job.task, catalogue=str(folder)))
    Catalogue.of(job.task).check()
    return job


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


def check_candidates(t: TaskConfig) -> None:
    """rerank's task.candidates is a complete recommend run folder, and task.catalogue's files
    hold the items' ids and texts."""
    from .inputs import resolve_inputs

    run = RunDir.at(t.candidates)
    fields = (run.read_run() or {}).get("fingerprint", {}).get("fields", {})
    if fields.get("task") != "recommend":
        raise InputError(
            f"task.candidates {t.candidates} is not a recommend run folder; name the output "
            "folder of a `fastserve infer --task recommend` run"
        )
    if not run.success.exists():
        raise InputError(
            f"task.candidates {t.candidates} is not complete (no _SUCCESS); rerun its command "
            "until it is, then this one"
        )
    files = resolve_inputs([t.catalogue])
    if not files:
        raise InputError(f"task.catalogue {t.catalogue} names no Parquet files")
    for path in files.values():
        schema = pq.read_schema(path)
        lacking = [
            c for c in (t.catalogue_id_column, t.catalogue_text_column) if c not in schema.names
        ]
        if lacking:
            raise InputError(
                f"catalogue file {path} lacks the column(s) {', '.join(lacking)} (columns: "
                f"{', '.join(schema.names)}); name them with task.catalogue_id_column and "
                "task.catalogue_text_column"
            )


def candidates_of(
    t: TaskConfig, query_ids: list[str]
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({query id: its item ids, by rank}, {item id: text}) for these queries: the rows of the
    recommend run task.candidates, and the texts of their items in task.catalogue (both read
    with a filter, not whole)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from .inputs import resolve_inputs

    run = RunDir.at(t.candidates)
    outputs = [str(run.output_path(sid)) for sid in sorted(run.records())]
    recs = ds.dataset(outputs, format="parquet").to_table(
        columns=["id", "item_id", "rank"], filter=pc.field("id").isin(query_ids)
    )
    recs = recs.sort_by([("id", "ascending"), ("rank", "ascending")])
    items: dict[str, list[str]] = {}
    for qid, item in zip(
        recs.column("id").to_pylist(), recs.column("item_id").to_pylist(), strict=True
    ):
        items.setdefault(qid, []).append(item)
    wanted = sorted({i for v in items.values() for i in v})
    cat = ds.dataset(list(resolve_inputs([t.catalogue]).values()), format="parquet")
    id_type = cat.schema.field(t.catalogue_id_column).type
    keys = pa.array(wanted, type=pa.string())
    if not pa.types.is_string(id_type) and not pa.types.is_large_string(id_type):
        keys = pc.cast(keys, id_type, safe=False) if wanted else pa.array([], type=id_type)
    found = cat.to_table(
        columns=[t.catalogue_id_column, t.catalogue_text_column],
        filter=pc.field(t.catalogue_id_column).isin(keys),
    )
    texts = dict(
        zip(
            found.column(0).cast(pa.string()).to_pylist(),
            found.column(1).to_pylist(),
            strict=True,
        )
    )
    return items, texts
