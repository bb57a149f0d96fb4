"""Reading one input shard: only the needed columns, with the schema checked first.

A file that cannot be read, or lacks the text column, or has it in the wrong type, raises an
InputError naming the file and column; row-level problems (null or empty text, bad ids) are left
to the runner, which rejects those rows with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from . import schemas
from .config import InputConfig
from .errors import InputError
from .plan import Shard


@dataclass
class ShardData:
    texts: list[str | None]
    ids: list[str | None]
    """Row keys as strings; generated '<key>:<row>' when the corpus has no id column."""
    keep: pa.Table
    """The columns to pass through, in input row order."""


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def read_shard(shard: Shard, cfg: InputConfig) -> ShardData:
    corpus = schemas.load("corpus")
    try:
        f = pq.ParquetFile(shard.path)
        schema = f.schema_arrow
    except FileNotFoundError:
        raise InputError(f"input file {shard.path} disappeared before it was read") from None
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"input file {shard.path} is not readable Parquet ({e})") from None

    names = schema.names
    if cfg.text_column not in names:
        raise InputError(
            f"input file {shard.path} has no column {cfg.text_column!r} (columns: {', '.join(names)}); "
            f"expected the text in a string column ({corpus.ref}); name it with --text-column"
        )
    text_type = schema.field(cfg.text_column).type
    if not _is_string(text_type):
        raise InputError(
            f"column {cfg.text_column!r} is {text_type} in {shard.path}; expected string "
            f"({corpus.ref}); convert it or name the text column with --text-column"
        )
    id_col = cfg.id_column
    if id_col is not None and id_col not in names:
        raise InputError(
            f"input file {shard.path} has no id column {id_col!r} (columns: {', '.join(names)}); "
            "fix --id-column, or leave it out to number rows by file and position"
        )
    if id_col is None and "id" in names:
        id_col = "id"
    if id_col is not None:
        id_type = schema.field(id_col).type
        if not (_is_string(id_type) or pa.types.is_integer(id_type)):
            raise InputError(
                f"column {id_col!r} is {id_type} in {shard.path}; expected string or integer ids "
                f"({corpus.ref})"
            )
    missing = [c for c in cfg.keep_columns if c not in names]
    if missing:
        raise InputError(
            f"input file {shard.path} lacks the kept column(s) {', '.join(missing)} "
            f"(columns: {', '.join(names)}); fix --keep-column"
        )

    columns = list(
        dict.fromkeys([cfg.text_column, *([id_col] if id_col else []), *cfg.keep_columns])
    )
    try:
        table = f.read(columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"input file {shard.path} could not be read ({e})") from None
    texts = table.column(cfg.text_column).cast(pa.string()).to_pylist()
    if id_col is None:
        ids: list[str | None] = [f"{shard.key}:{i}" for i in range(table.num_rows)]
    else:
        raw = table.column(id_col)
        ids = raw.cast(pa.string()).to_pylist()
    return ShardData(texts=texts, ids=ids, keep=table.select(list(cfg.keep_columns)))
