"""Which shards exist: input paths resolved into files, files into pieces, pieces into shards.

A piece is a range of row groups of one file; a shard is a run of pieces of about `shard_rows`
rows: one 50 GB file becomes many shards, a thousand tiny files a few. Planning reads only
Parquet footers. A file that cannot be planned (not Parquet, no text column, text of the wrong
type) becomes a shard of its own, which fails alone with the reason and takes no other file down.

Plans are persisted in the run folder (see manifest.RunDir.plan): a file, once planned, keeps its
shard for the life of the run folder, so a rerun, an orphaned worker and an array task all mean
the same rows by the same shard id. New files found by a rerun are planned into new shards.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError


@dataclass(frozen=True)
class Piece:
    key: str
    """The file's path relative to the input root it was found under (posix)."""
    row_groups: tuple[int, int] | None
    """[start, stop) row groups; None: the whole file (one that could not be planned)."""
    rows: int
    size: int
    """File size in bytes when planned: a changed file is refused rather than half-redone."""
    problem: str | None = None
    """Why the file could not be planned; the shard holding it fails with this reason."""


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


def _has_magic(p: str) -> bool:
    return any(c in p for c in "*?[")


def _glob_root(pattern: str) -> str:
    root = []
    for part in Path(pattern).parts:
        if _has_magic(part):
            break
        root.append(part)
    return str(Path(*root)) if root else "."


def resolve_inputs(paths: tuple[str, ...] | list[str]) -> dict[str, str]:
    """{key: absolute path} of every Parquet file named by `paths`, sorted by key.

    A folder contributes every `*.parquet` below it (names starting with '_' or '.' are skipped,
    as pyarrow does); a glob its matches; a file itself. Keys are paths relative to the folder or
    the glob's fixed prefix (a bare file: its name), so they do not change when files are added.
    """
    found: dict[str, str] = {}

    def add(path: str, root: str) -> None:
        key = Path(os.path.relpath(path, root)).as_posix() if root else Path(path).name
        absolute = os.path.abspath(path)
        if key in found and found[key] != absolute:
            raise InputError(
                f"input files {found[key]} and {absolute} would share the name {key!r}; "
                "pass their common parent folder instead of both"
            )
        found[key] = absolute

    for spec in paths:
        if _has_magic(spec):
            matches = sorted(m for m in glob.glob(spec, recursive=True) if os.path.isfile(m))
            if not matches:
                raise InputError(f"input pattern {spec!r} matches no file; check the path")
            for m in matches:
                add(m, _glob_root(spec))
        elif os.path.isdir(spec):
            files = []
            for dirpath, dirnames, filenames in os.walk(spec):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(("_", ".")))
                files += [
                    os.path.join(dirpath, f)
                    for f in filenames
                    if f.endswith(".parquet") and not f.startswith(("_", "."))
                ]
            if not files:
                raise InputError(f"input folder {spec} holds no *.parquet file")
            for f in files:
                add(f, spec)
        elif os.path.isfile(spec):
            add(spec, "")
        else:
            raise InputError(
                f"input {spec} does not exist; pass a Parquet file, a folder or a glob"
            )
    return dict(sorted(found.items()))


def is_string_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def text_column_problem(schema: pa.Schema, text_column: str, where: str) -> str | None:
    """Why a file with `schema` cannot be a corpus shard, or None."""
    from . import schemas

    ref = schemas.load("corpus").ref
    if text_column not in schema.names:
        return (
            f"input file {where} has no column {text_column!r} (columns: {', '.join(schema.names)}); "
            f"expected the text in a string column ({ref}); name it with --text-column"
        )
    t = schema.field(text_column).type
    if not is_string_type(t):
        return (
            f"column {text_column!r} is {t} in {where}; expected string ({ref}); "
            "convert it or name the text column with --text-column"
        )
    return None


def file_pieces(key: str, path: str, text_column: str, shard_rows: int) -> list[Piece]:
    """Split one file into row-group ranges of at most `shard_rows` rows (at least one group)."""
    size = os.path.getsize(path)
    try:
        meta = pq.ParquetFile(path).metadata
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as e:
        return [Piece(key, None, 0, size, f"input file {path} is not readable Parquet ({e})")]
    problem = text_column_problem(schema, text_column, path)
    if problem:
        return [Piece(key, None, meta.num_rows, size, problem)]
    pieces, start, rows = [], 0, 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if rows and rows + n > shard_rows:
            pieces.append(Piece(key, (start, g), rows, size))
            start, rows = g, 0
        rows += n
    pieces.append(Piece(key, (start, meta.num_row_groups), rows, size))
    return pieces


def pack(pieces: list[Piece], shard_rows: int, prefix: str) -> list[Shard]:
    """Consecutive pieces into shards of at most `shard_rows` rows (a bigger piece alone);
    a piece with a problem always alone. Ids are `<prefix>-<index>`."""
    groups: list[list[Piece]] = []
    current: list[Piece] = []
    for p in pieces:
        full = current and sum(q.rows for q in current) + p.rows > shard_rows
        if current and (full or p.problem or current[-1].problem):
            groups.append(current)
            current = []
        current.append(p)
    if current:
        groups.append(current)
    return [Shard(id=f"{prefix}-{i:05d}", pieces=tuple(g)) for i, g in enumerate(groups)]


def plan_new(files: dict[str, str], text_column: str, shard_rows: int, prefix: str) -> list[Shard]:
    """Shards for `files` ({key: path}, none of them planned before)."""
    pieces: list[Piece] = []
    for key, path in files.items():
        pieces += file_pieces(key, path, text_column, shard_rows)
    return pack(pieces, shard_rows, prefix)


# -- the persisted plan: _manifest/plan/<generation>.json -------------------------------------


def _piece_to_json(p: Piece) -> dict:
    return {
        "key": p.key,
        "row_groups": p.row_groups,
        "rows": p.rows,
        "size": p.size,
        "problem": p.problem,
    }


def _piece_from_json(d: dict) -> Piece:
    rg = tuple(d["row_groups"]) if d["row_groups"] is not None else None
    return Piece(d["key"], rg, d["rows"], d["size"], d.get("problem"))  # type: ignore[arg-type]


def read_plan(plan_dir: Path, generations: list[Path] | None = None) -> list[Shard]:
    """Every planned shard of a run folder (or of the given generation files), oldest first."""
    import json

    shards: list[Shard] = []
    for p in generations if generations is not None else sorted(plan_dir.glob("[0-9]*.json")):
        for s in json.loads(p.read_text())["shards"]:
            shards.append(Shard(s["id"], tuple(_piece_from_json(x) for x in s["pieces"])))
    return shards


def plan_run(
    plan_dir: Path, files: dict[str, str], text_column: str, shard_rows: int
) -> list[Shard]:
    """The run folder's plan, extended with shards for `files` not planned before.

    Each extension is a new generation file created exclusively, so concurrent planners (array
    tasks starting together) agree: the loser re-reads the winner's plan and plans what is left.
    Returns the shards touching `files`, with the current path of each piece filled in.
    """
    from .manifest import exclusive_write_json

    while True:
        # One snapshot gives both what is planned and the next generation's number: if another
        # planner adds that generation meanwhile, our exclusive create fails and we look again.
        generations = sorted(plan_dir.glob("[0-9]*.json"))
        shards = read_plan(plan_dir, generations)
        planned = {p.key for s in shards for p in s.pieces}
        new = {k: v for k, v in files.items() if k not in planned}
        if not new:
            break
        gen = len(generations)
        fresh = plan_new(new, text_column, shard_rows, prefix=f"{gen:05d}")
        doc = {
            "shards": [{"id": s.id, "pieces": [_piece_to_json(p) for p in s.pieces]} for s in fresh]
        }
        try:
            exclusive_write_json(plan_dir / f"{gen:05d}.json", doc)
        except FileExistsError:
            continue
    return [
        Shard(s.id, s.pieces, tuple(files.get(p.key, "") for p in s.pieces))
        for s in shards
        if any(p.key in files for p in s.pieces)
    ]
