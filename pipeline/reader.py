"""Reading one shard: the row groups of its pieces, only the needed columns, schema checked first.

A file that cannot be read, lacks a column or has it in the wrong type raises an InputError that
names the file and column (and carries the file's key, so the run can plan that file alone and
finish the others); row-level problems (null or empty text, bad ids) are the runner's, which
rejects those rows with a reason. A file is read only while it is the version that was planned.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from . import schemas
from .config import InputConfig
from .errors import InputError
from .plan import FileId, Piece, Shard, is_string_type, text_column_problem


@dataclass
class ShardData:
    texts: list[str | None]
    ids: list[str | None]
    """Row keys as strings; '<file key>:<row>' for files without an id column."""
    source_file: list[str]
    row_number: list[int]
    """Each row's file (key) and 0-based row number within that file."""
    keep: pa.Table
    """The columns to pass through, in row order."""
    extra: dict[str, list]
    """Columns the task reads besides the text (TaskConfig.input_columns()), as Python lists."""
    invalid_text: dict[int, str] = field(default_factory=dict)
    """Rows whose text is not valid UTF-8 (row -> detail); their `texts` entry is None."""


def _decode(col: pa.ChunkedArray) -> tuple[list[str | None], dict[int, str]]:
    """A string column as Python strings; rows that are not UTF-8 become None, with a detail."""
    try:
        return col.cast(pa.string()).to_pylist(), {}
    except UnicodeDecodeError:  # rare: decode row by row to keep the good ones
        texts: list[str | None] = []
        bad: dict[int, str] = {}
        for i, b in enumerate(col.cast(pa.binary()).to_pylist()):
            try:
                texts.append(None if b is None else b.decode("utf-8"))
            except UnicodeDecodeError as e:
                texts.append(None)
                bad[i] = f"the text is not valid UTF-8 ({e.reason} at byte {e.start})"
        return texts, bad


def vectors(col: pa.ChunkedArray) -> list:
    """A list-of-floats column as one float32 NumPy row per row (read-only views into one array;
    None for a null row, NaN for a null float)."""
    arr = col.combine_chunks().cast(pa.list_(pa.float32()))
    values = arr.values.to_numpy(zero_copy_only=False)
    offsets = arr.offsets.to_numpy()
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    return [values[offsets[i] : offsets[i + 1]] if valid[i] else None for i in range(len(arr))]


class PieceError(InputError):
    """An input file of a shard that cannot be read as planned; `key` names the file."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@contextmanager
def _open(piece: Piece, path: str) -> Iterator[pq.ParquetFile]:
    """The piece's file, opened once: its identity and its data come from the same open file."""
    if not path or not os.path.lexists(path):
        raise PieceError(
            piece.key,
            f"input file {piece.key} is planned in this run folder but is not at {path or 'any path'} "
            "and not among the inputs; restore it (or name it with --input) and rerun",
        )
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below, after pyarrow is done with it
    except OSError as e:
        raise PieceError(
            piece.key, f"input file {path} cannot be opened ({e.strerror or e})"
        ) from None
    with fh:
        why = piece.file.change(FileId.of(fh))
        if why:
            raise PieceError(
                piece.key,
                f"input file {path} changed since it was planned: {why}; rerun the same command "
                "(a rerun plans the new version and withdraws the old one's rows)",
            )
        try:
            pf = pq.ParquetFile(fh)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise PieceError(
                piece.key, f"input file {path} is not readable Parquet ({e})"
            ) from None
        yield pf


def _id_column(schema: pa.Schema, cfg: InputConfig, path: str) -> str | None:
    ref = schemas.load("corpus").ref
    id_col = cfg.id_column
    if id_col is not None and id_col not in schema.names:
        raise InputError(
            f"input file {path} has no id column {id_col!r} (columns: {', '.join(schema.names)}); "
            "fix --id-column, or leave it out to number rows by file and position"
        )
    if id_col is None and "id" in schema.names:
        id_col = "id"
    if id_col is not None:
        t = schema.field(id_col).type
        if not (is_string_type(t) or pa.types.is_integer(t)):
            raise InputError(
                f"column {id_col!r} is {t} in {path}; expected string or integer ids ({ref})"
            )
    return id_col


def read_ids(piece: Piece, path: str, cfg: InputConfig) -> list[str | None] | None:
    """The ids of a piece's rows, or None when its file has no id column (ids are generated)."""
    with _open(piece, path) as f:
        id_col = _id_column(f.schema_arrow, cfg, path)
        if id_col is None:
            return None
        try:
            ids = f.read_row_groups(range(*piece.row_groups), columns=[id_col]).column(0)
            return ids.cast(pa.string()).to_pylist()
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise PieceError(piece.key, f"input file {path} could not be read ({e})") from None


class ShardReadError(InputError):
    """Some files of a shard could not be read; `bad` is {file key: why} for each of them."""

    def __init__(self, bad: dict[str, str]):
        super().__init__("; ".join(bad.values()))
        self.bad = bad


def read_shard(shard: Shard, cfg: InputConfig, task_columns: tuple[str, ...] = ()) -> ShardData:
    """The rows of `shard`: text, ids, kept columns and the columns the task needs.

    Every piece is tried, so one ShardReadError names every file of the shard that failed."""
    parts: list[ShardData] = []
    bad: dict[str, str] = {}
    for piece, path in zip(shard.pieces, shard.paths, strict=True):
        try:
            with _open(piece, path) as f:
                parts.append(_read_piece(f, piece, path, cfg, task_columns))
        except PieceError as e:
            bad.setdefault(e.key, str(e))
        except InputError as e:
            bad.setdefault(piece.key, str(e))
    if bad:
        raise ShardReadError(bad)
    try:
        keeps = [p.keep for p in parts]
        keep = pa.concat_tables(keeps, promote_options="permissive") if keeps else pa.table({})
    except pa.ArrowException as e:
        raise InputError(f"kept columns differ in type between {shard.sources}: {e}") from None
    offsets = [sum(len(q.texts) for q in parts[:k]) for k in range(len(parts))]
    return ShardData(
        invalid_text={
            o + i: d for o, p in zip(offsets, parts, strict=True) for i, d in p.invalid_text.items()
        },
        texts=[t for p in parts for t in p.texts],
        ids=[i for p in parts for i in p.ids],
        source_file=[k for p in parts for k in p.source_file],
        row_number=[r for p in parts for r in p.row_number],
        keep=keep,
        extra={c: [v for p in parts for v in p.extra[c]] for c in task_columns},
    )


def _read_piece(
    f: pq.ParquetFile, piece: Piece, path: str, cfg: InputConfig, task_columns: tuple[str, ...]
) -> ShardData:
    schema = f.schema_arrow
    problem = text_column_problem(schema, cfg.text_column, path, task_columns, cfg.text_kind)
    if problem:
        raise InputError(problem)
    id_col = _id_column(schema, cfg, path)
    missing = [c for c in cfg.keep_columns if c not in schema.names]
    if missing:
        raise InputError(
            f"input file {path} lacks the kept column(s) {', '.join(missing)} "
            f"(columns: {', '.join(schema.names)}); fix --keep-column"
        )
    start, stop = piece.row_groups
    first_row = sum(f.metadata.row_group(g).num_rows for g in range(start))
    wanted = [cfg.text_column, *([id_col] if id_col else []), *cfg.keep_columns, *task_columns]
    columns = list(dict.fromkeys(wanted))
    try:
        table = f.read_row_groups(range(start, stop), columns=columns)
        if cfg.text_kind == "messages":  # a chat per row, as JSON text (null stays null)
            chats = table.column(cfg.text_column).to_pylist()
            texts, invalid = [None if c is None else json.dumps(c) for c in chats], {}
        elif cfg.text_kind == "vector":
            texts, invalid = vectors(table.column(cfg.text_column)), {}
        else:
            texts, invalid = _decode(table.column(cfg.text_column))
        if id_col is None:
            ids = [f"{piece.key}:{r}" for r in range(first_row, first_row + table.num_rows)]
        else:
            ids = table.column(id_col).cast(pa.string()).to_pylist()
        extra = {c: table.column(c).to_pylist() for c in task_columns}
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        # a corrupt page, or bytes that are not UTF-8 in a string column
        raise InputError(f"input file {path} could not be read ({type(e).__name__}: {e})") from None
    n = table.num_rows
    return ShardData(
        texts=texts,
        ids=ids,
        source_file=[piece.key] * n,
        row_number=list(range(first_row, first_row + n)),
        keep=table.select(list(cfg.keep_columns)),
        extra=extra,
        invalid_text=invalid,
    )
