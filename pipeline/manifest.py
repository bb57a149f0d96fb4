"""The run folder: what is done, what each shard produced, and the config it is bound to.

    out/
      part-<shard>.parquet           results, one file per shard (see plan.py)
      _rejected/part-<shard>.parquet rows that could not be processed, with the reason
      _manifest/plan/<gen>.json      the shards: which row groups of which files each one reads
      _manifest/run.json             fingerprint, versions, start/end, totals
      _manifest/shards/<shard>.json  one record per completed shard (written after its output)
      _SUCCESS                       written last, when every shard is complete

Every file is written under a temporary name in its final folder and renamed into place, so a
reader (or a rerun) sees either nothing or the whole file. A shard's record is written after its
output; a shard with a record is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import RunStateError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def exclusive_write_json(path: Path, obj: Any) -> None:
    """Create `path` with `obj`, complete, or raise FileExistsError if another writer was first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(obj, sort_keys=True) + "\n")
    try:
        os.link(tmp, path)  # atomic, and fails when the name exists
    finally:
        tmp.unlink()


def atomic_write_parquet(path: Path, table: pa.Table) -> str:
    """Write `table` to `path` atomically; return the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex}"
    pq.write_table(table, tmp, compression="zstd")
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, path)
    return digest


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike) -> RunDir:
        return cls(Path(path))

    @property
    def manifest(self) -> Path:
        return self.root / "_manifest"

    @property
    def run_json(self) -> Path:
        return self.manifest / "run.json"

    @property
    def success(self) -> Path:
        return self.root / "_SUCCESS"

    @property
    def summaries_dir(self) -> Path:
        """One dated JSON per run of the command (what that run did), for reports."""
        return self.manifest / "summaries"

    @property
    def plan_dir(self) -> Path:
        return self.manifest / "plan"

    def output_path(self, shard_id: str) -> Path:
        return self.root / f"part-{shard_id}.parquet"

    def rejected_path(self, shard_id: str) -> Path:
        return self.root / "_rejected" / f"part-{shard_id}.parquet"

    def record_path(self, shard_id: str) -> Path:
        return self.manifest / "shards" / f"{shard_id}.json"

    # -- reading --------------------------------------------------------------------------------

    def read_run(self) -> dict | None:
        try:
            return json.loads(self.run_json.read_text())
        except FileNotFoundError:
            return None

    def read_record(self, shard_id: str) -> dict | None:
        try:
            return json.loads(self.record_path(shard_id).read_text())
        except FileNotFoundError:
            return None

    def records(self) -> dict[str, dict]:
        """Every completion record, by shard id."""
        folder = self.manifest / "shards"
        if not folder.is_dir():
            return {}
        out = {}
        for p in sorted(folder.glob("*.json")):
            rec = json.loads(p.read_text())
            out[rec["shard"]] = rec
        return out

    # -- binding a folder to one config -----------------------------------------------------------

    def bind(self, fingerprint: dict, overwrite: bool) -> dict:
        """Bind the folder to `fingerprint` (a dict; its `sha` is the identity), or refuse.

        Returns the run record (new, or the existing one when resuming).
        """
        existing = self.read_run()
        foreign = (
            [p for p in self.root.iterdir() if not p.name.startswith(("_", "."))]
            if self.root.is_dir()
            else []
        )
        if existing is None and foreign:
            raise RunStateError(
                f"output folder {self.root} is not empty and holds no FastServe run "
                "(_manifest/run.json); choose an empty or new folder"
            )
        if existing is not None and existing["fingerprint"]["sha"] != fingerprint["sha"]:
            if not overwrite:
                old = existing["fingerprint"]["fields"]
                new = fingerprint["fields"]
                diffs = [
                    f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
                    for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)
                ]
                raise RunStateError(
                    f"output folder {self.root} holds a run with another config "
                    f"({'; '.join(diffs)}). Use a new --output folder, or --overwrite to replace it"
                )
            self.clear()
            existing = None
        if existing is None:
            existing = {"fingerprint": fingerprint, "runs": []}
            try:  # several processes may start one run folder at once (array tasks): one wins
                exclusive_write_json(self.run_json, existing)
            except FileExistsError:
                return self.bind(fingerprint, overwrite=False)
        return existing

    def clear(self) -> None:
        """Remove what a run writes here (results, temporaries, sidecars, manifest, marker)."""
        for p in [*self.root.glob("*.parquet"), *self.root.glob(".tmp-*")]:
            p.unlink(missing_ok=True)
        for name in ("_rejected", "_manifest"):
            shutil.rmtree(self.root / name, ignore_errors=True)
        self.success.unlink(missing_ok=True)

    def update_run(self, **fields: Any) -> dict:
        run = self.read_run() or {}
        run.update(fields)
        atomic_write_json(self.run_json, run)
        return run
