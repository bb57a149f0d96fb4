"""Reading one shard: the row groups of its pieces, only the needed columns, schema checked first.

A file that cannot be read, lacks a column or has it in the wrong type raises an InputError that
names the file and column; row-level problems (null or empty text, bad ids) are the runner's, which
rejects those rows with a reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from . import schemas
from .config import InputConfig
from .errors import InputError
from .plan import Piece, Shard, is_string_type, text_column_problem


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


def _open(piece: Piece, path: str) -> pq.ParquetFile:
    if piece.problem:
        raise InputError(piece.problem)
    if not path or not os.path.exists(path):
        raise InputError(
            f"input file {piece.key} is planned in this run folder but is no longer among the inputs; "
            "restore it, or run into a new --output folder"
        )
    if os.path.getsize(path) != piece.size:
        raise InputError(
            f"input file {path} changed since it was planned ({piece.size} -> {os.path.getsize(path)} "
            "bytes); a run folder never mixes versions of a file: use a new --output folder or --overwrite"
        )
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"input file {path} is not readable Parquet ({e})") from None


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
    f = _open(piece, path)
    id_col = _id_column(f.schema_arrow, cfg, path)
    if id_col is None:
        return None
    return (
        f.read_row_groups(range(*piece.row_groups), columns=[id_col])
        .column(0)
        .cast(pa.string())
        .to_pylist()
    )


def read_shard(shard: Shard, cfg: InputConfig, task_columns: tuple[str, ...] = ()) -> ShardData:
    """The rows of `shard`: text, ids, kept columns and the columns the task needs."""
    texts: list = []
    ids: list = []
    source_file: list[str] = []
    row_number: list[int] = []
    keeps: list[pa.Table] = []
    extra: dict[str, list] = {c: [] for c in task_columns}
    for piece, path in zip(shard.pieces, shard.paths, strict=True):
        f = _open(piece, path)
        schema = f.schema_arrow
        problem = text_column_problem(schema, cfg.text_column, path)
        if problem:
            raise InputError(problem)
        id_col = _id_column(schema, cfg, path)
        missing = [c for c in cfg.keep_columns if c not in schema.names]
        if missing:
            raise InputError(
                f"input file {path} lacks the kept column(s) {', '.join(missing)} "
                f"(columns: {', '.join(schema.names)}); fix --keep-column"
            )
        lacking = [c for c in task_columns if c not in schema.names]
        if lacking:
            raise InputError(
                f"input file {path} lacks the column(s) {', '.join(lacking)} that the task's options "
                f"name (task.max_new_tokens_column / task.target_lang_column); columns: {', '.join(schema.names)}"
            )
        start, stop = piece.row_groups  # type: ignore[misc]
        first_row = sum(f.metadata.row_group(g).num_rows for g in range(start))
        wanted = [cfg.text_column, *([id_col] if id_col else []), *cfg.keep_columns, *task_columns]
        columns = list(dict.fromkeys(wanted))
        try:
            table = f.read_row_groups(range(start, stop), columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"input file {path} could not be read ({e})") from None
        n = table.num_rows
        rows = range(first_row, first_row + n)
        texts += table.column(cfg.text_column).cast(pa.string()).to_pylist()
        if id_col is None:
            ids += [f"{piece.key}:{r}" for r in rows]
        else:
            ids += table.column(id_col).cast(pa.string()).to_pylist()
        source_file += [piece.key] * n
        row_number += rows
        keeps.append(table.select(list(cfg.keep_columns)))
        for c in task_columns:
            extra[c] += table.column(c).to_pylist()
    try:
        keep = pa.concat_tables(keeps, promote_options="permissive") if keeps else pa.table({})
    except pa.ArrowException as e:
        raise InputError(f"kept columns differ in type between {shard.sources}: {e}") from None
    return ShardData(texts, ids, source_file, row_number, keep, extra)
