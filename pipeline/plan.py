"""Which shards exist: input paths (files, folders, globs) resolved into a deterministic plan.

A shard is named after its input file's path relative to the root it was found under, so the
name does not change when other files are added: that is what lets a nightly rerun pick up new
files and skip finished ones.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError


@dataclass(frozen=True)
class Shard:
    id: str
    """Stable name, used for the output file and the completion record."""
    path: str
    """Absolute path of the input Parquet file."""
    key: str
    """The file's path relative to its input root (posix), used in generated ids."""


def _has_magic(p: str) -> bool:
    return any(c in p for c in "*?[")


def _glob_root(pattern: str) -> str:
    parts = Path(pattern).parts
    root = []
    for part in parts:
        if _has_magic(part):
            break
        root.append(part)
    return str(Path(*root)) if root else "."


def resolve_inputs(paths: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """(absolute path, key) of every Parquet file named by `paths`, sorted by key.

    A folder contributes every `*.parquet` below it (names starting with '_' or '.' are skipped,
    as pyarrow does); a glob contributes its matches; a file itself.
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
    return sorted(((p, k) for k, p in found.items()), key=lambda pk: pk[1])


def shard_id(key: str) -> str:
    """A file-name-safe, stable id for the input file `key`."""
    stem = key[: -len(".parquet")] if key.endswith(".parquet") else key
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", stem.replace("/", "__"))


def plan_shards(paths: tuple[str, ...] | list[str]) -> list[Shard]:
    """One shard per input file, in a deterministic order."""
    shards = [Shard(id=shard_id(k), path=p, key=k) for p, k in resolve_inputs(paths)]
    seen: dict[str, str] = {}
    for s in shards:
        if s.id in seen:
            raise InputError(
                f"input files {seen[s.id]} and {s.key} map to one shard name {s.id!r}; rename one"
            )
        seen[s.id] = s.key
    return shards
