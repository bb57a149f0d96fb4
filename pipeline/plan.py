"""Which shards exist: files into pieces, pieces into shards. Pure, but for reading footers.

A piece is a range of row groups of one file; a shard is a run of pieces of about `shard_rows`
rows: one 50 GB file becomes many shards, a thousand tiny files a few. Planning reads only
Parquet footers. A file that cannot be planned (not Parquet, no text column, text of the wrong
type, a link that leads nowhere) gets a problem instead of pieces: it is reported and planned
again on the next run, so a fixed file is picked up.

Each piece carries its file's identity (size, modification time, a hash of the Parquet footer):
a file rewritten after it was planned, even at the same size, is told apart (manifest/ledger.py
plans it again; the reader refuses to read a changed file under an old plan).

The persisted plan (which shards a run folder holds, and which were withdrawn) is the run
folder's: pipeline/ledger.py.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

_TAIL = 64 << 10  # bytes hashed at the end of a file that has no Parquet footer


@dataclass(frozen=True)
class FileId:
    """What tells one version of a file from another, read without reading its data."""

    size: int
    mtime_ns: int
    footer: str
    """sha256 (16 hex digits) of the Parquet footer (or of the last 64 KiB of another file)."""

    @classmethod
    def of(cls, f) -> FileId:
        """The identity of the open binary file `f` (its position is left at the end)."""
        st = os.fstat(f.fileno())
        tail = min(st.st_size, _TAIL)
        if st.st_size >= 12:
            f.seek(st.st_size - 8)
            end = f.read(8)
            n = int.from_bytes(end[:4], "little")
            if end[4:] == b"PAR1" and n + 12 <= st.st_size:
                tail = n + 8
        f.seek(st.st_size - tail)
        digest = hashlib.sha256(f.read(tail)).hexdigest()[:16]
        return cls(st.st_size, st.st_mtime_ns, digest)

    def change(self, now: FileId) -> str | None:
        """How `now` differs from this (planned) identity, in words; None when it does not."""
        if now.size != self.size:
            return f"its size changed ({self.size} -> {now.size} bytes)"
        if self.footer and now.footer != self.footer:  # (plans of FastServe <= 0.x lack it)
            return "its content changed (same size, another Parquet footer)"
        if self.mtime_ns and now.mtime_ns != self.mtime_ns:
            return "it was rewritten (another modification time)"
        return None


@dataclass(frozen=True)
class Piece:
    key: str
    """The file's path relative to the input root it was found under (posix)."""
    row_groups: tuple[int, int]
    """[start, stop) row groups."""
    rows: int
    file: FileId
    """The file as it was when planned: a changed file is planned again, never mixed."""
    path: str = ""
    """Where the file was when planned (read from there when a run does not name it)."""


@dataclass(frozen=True)
class Shard:
    id: str
    """Stable name of the shard: its output is part-<id>.parquet, its record <id>.json."""
    pieces: tuple[Piece, ...]
    paths: tuple[str, ...] = ()
    """Where each piece's file is now (filled in at run time from the current inputs)."""

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.pieces)

    @property
    def sources(self) -> str:
        return ", ".join(p.key for p in self.pieces)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.key for p in self.pieces))


def is_string_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def is_messages_type(t: pa.DataType) -> bool:
    """A chat: list<struct<role: string, content: string, ...>>."""
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return False
    item = t.value_type
    names = [item.field(k).name for k in range(item.num_fields)] if pa.types.is_struct(item) else []
    return all(n in names and is_string_type(item.field(n).type) for n in ("role", "content"))


def is_vector_type(t: pa.DataType) -> bool:
    """A vector: a list (fixed size or not) of floats."""
    listy = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    return listy and pa.types.is_floating(t.value_type)


def text_column_problem(
    schema: pa.Schema,
    text_column: str,
    where: str,
    task_columns: tuple[str, ...] | dict[str, str] = (),
    text_kind: str = "string",
) -> str | None:
    """Why a file with `schema` cannot be a corpus shard (no text column, or none of the columns
    the task's options name: `task_columns`), or None. `text_kind` messages: the text column is
    a chat (task.messages_column)."""
    from . import schemas

    ref = schemas.load("corpus").ref
    if text_column not in schema.names:
        return (
            f"input file {where} has no column {text_column!r} (columns: {', '.join(schema.names)}); "
            f"expected the text in a string column ({ref}); name it with --text-column"
        )
    t = schema.field(text_column).type
    if text_kind == "messages":
        if not is_messages_type(t):
            return (
                f"column {text_column!r} is {t} in {where}; task.messages_column expects a list "
                "of {role, content} structs (strings)"
            )
    elif text_kind == "vector":
        if not is_vector_type(t):
            return (
                f"column {text_column!r} is {t} in {where}; task.embedding_column expects a list "
                "of floats per row (an embed run's embedding column)"
            )
    elif not is_string_type(t):
        return (
            f"column {text_column!r} is {t} in {where}; expected string ({ref}); "
            "convert it or name the text column with --text-column"
        )
    lacking = [c for c in task_columns if c not in schema.names]
    if lacking:
        named = [task_columns[c] for c in lacking] if isinstance(task_columns, dict) else []
        return (
            f"input file {where} lacks the column(s) {', '.join(lacking)} that "
            f"{', '.join(dict.fromkeys(named)) or 'the task options'} name; columns: "
            f"{', '.join(schema.names)}"
        )
    return None


def file_pieces(
    key: str,
    path: str,
    text_column: str,
    shard_rows: int,
    task_columns: tuple[str, ...] | dict[str, str] = (),
    text_kind: str = "string",
) -> tuple[list[Piece], str | None]:
    """Split one file into row-group ranges of at most `shard_rows` rows (at least one group);
    or no pieces and the reason the file cannot be planned."""
    try:
        with open(path, "rb") as f:
            ident = FileId.of(f)  # before the footer is parsed: a later change is caught
            try:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
            except (pa.ArrowException, OSError, ValueError) as e:
                return [], f"input file {path} is not readable Parquet ({e})"
    except OSError as e:
        return [], f"input file {path} cannot be opened ({e.strerror or e})"
    problem = text_column_problem(schema, text_column, path, task_columns, text_kind)
    if problem:
        return [], problem
    pieces, start, rows = [], 0, 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if rows and rows + n > shard_rows:
            pieces.append(Piece(key, (start, g), rows, ident, path))
            start, rows = g, 0
        rows += n
    pieces.append(Piece(key, (start, meta.num_row_groups), rows, ident, path))
    return pieces, None


def pack(
    pieces: list[Piece], shard_rows: int, prefix: str, alone: frozenset[str] = frozenset()
) -> list[Shard]:
    """Consecutive pieces into shards of at most `shard_rows` rows (a bigger piece alone);
    a piece of a file in `alone` (one that failed at run time) always alone. Ids `<prefix>-<i>`."""
    groups: list[list[Piece]] = []
    current: list[Piece] = []
    for p in pieces:
        full = current and sum(q.rows for q in current) + p.rows > shard_rows
        if current and (full or p.key in alone or current[-1].key in alone):
            groups.append(current)
            current = []
        current.append(p)
    if current:
        groups.append(current)
    return [Shard(id=f"{prefix}-{i:05d}", pieces=tuple(g)) for i, g in enumerate(groups)]


def plan_files(
    files: dict[str, str],
    text_column: str,
    shard_rows: int,
    prefix: str,
    alone: frozenset[str] = frozenset(),
    task_columns: tuple[str, ...] | dict[str, str] = (),
    text_kind: str = "string",
) -> tuple[list[Shard], dict[str, str]]:
    """Shards for `files` ({key: path}), and {key: problem} for the files that cannot be planned."""
    pieces: list[Piece] = []
    problems: dict[str, str] = {}
    for key, path in files.items():
        got, problem = file_pieces(key, path, text_column, shard_rows, task_columns, text_kind)
        if problem:
            problems[key] = problem
        pieces += got
    return pack(pieces, shard_rows, prefix, alone), problems


def piece_to_json(p: Piece) -> dict:
    return {
        "key": p.key,
        "path": p.path,
        "row_groups": list(p.row_groups),
        "rows": p.rows,
        "size": p.file.size,
        "mtime_ns": p.file.mtime_ns,
        "footer": p.file.footer,
    }


def piece_from_json(d: dict) -> Piece:
    ident = FileId(d["size"], d.get("mtime_ns", 0), d.get("footer", ""))
    return Piece(d["key"], tuple(d["row_groups"]), d["rows"], ident, d.get("path", ""))  # type: ignore[arg-type]
