"""The run folder: what is done, what each shard produced, and the config it is bound to.

    out/
      part-<shard>.parquet           results, one file per shard (see plan.py)
      _rejected/part-<shard>.parquet rows that could not be processed, with the reason
      _manifest/plan/<gen>.json      the shards: which row groups of which files each one reads,
                                     and which earlier shards are withdrawn (ledger.py)
      _manifest/run.json             the config fingerprint the folder is bound to (written once)
      _manifest/runs/<start>-<pid>.json  one file per run of the command: what it did, its totals
      _manifest/shards/<shard>.json  one record per completed shard (written after its output)
      _SUCCESS                       written last, when every shard is complete

Every file is written under a temporary name in its final folder and renamed into place, so a
reader (or a rerun) sees either nothing or the whole file; a write that fails (a full disk)
leaves no temporary behind. A shard's record is written after its output; a shard with a record
is complete. Each run holds a shared lock on `_manifest/lock` while it runs; `--overwrite` needs it
exclusively, so it cannot pull a folder from under a running command.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import RunStateError


def _tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent / f".tmp-{path.name}-{uuid.uuid4().hex}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def exclusive_write_json(path: Path, obj: Any) -> None:
    """Create `path` with `obj`, complete, or raise FileExistsError if another writer was first."""
    tmp = _tmp(path)
    try:
        tmp.write_text(json.dumps(obj, sort_keys=True) + "\n")
        os.link(tmp, path)  # atomic, and fails when the name exists
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_parquet(path: Path, table: pa.Table) -> str:
    """Write `table` to `path` atomically; return the file's sha256."""
    tmp = _tmp(path)
    try:
        pq.write_table(table, tmp, compression="zstd")
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


# What a change of a fingerprint field that is a hash means, in words.
CHANGE_HINTS = {
    "model": "the model folder's files changed",
    "catalogue": "the catalogue's files changed: added, removed or rewritten",
    "candidates": "the recommend run was redone with another config",
}


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
    def runs_dir(self) -> Path:
        """One JSON per run of the command (what that run did, its totals), named by its start."""
        return self.manifest / "runs"

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
            run = json.loads(self.run_json.read_text())
            run["fingerprint"]["sha"]
            return run
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            raise RunStateError(
                f"output {self.root} is a file, not a folder; choose a folder for --output"
            ) from None
        except (ValueError, KeyError, TypeError) as e:
            raise RunStateError(
                f"{self.run_json} is damaged ({type(e).__name__}: {e}); restore it, or start the "
                "folder afresh with --overwrite"
            ) from None

    def read_record(self, shard_id: str) -> dict | None:
        """The shard's completion record; None when there is none or it is damaged (the shard
        is then done again, which rewrites both its output and its record)."""
        try:
            rec = json.loads(self.record_path(shard_id).read_text())
            return rec if isinstance(rec, dict) and rec.get("shard") == shard_id else None
        except (FileNotFoundError, ValueError):
            return None

    def records(self) -> dict[str, dict]:
        """Every readable completion record, by shard id."""
        folder = self.manifest / "shards"
        if not folder.is_dir():
            return {}
        out = {}
        for p in sorted(folder.glob("*.json")):
            rec = self.read_record(p.stem)
            if rec is not None:
                out[p.stem] = rec
        return out

    def run_entries(self) -> list[dict]:
        """Every run's entry (see pipeline/infer.py), oldest first; damaged ones skipped."""
        out = []
        for p in sorted(self.runs_dir.glob("*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except ValueError:
                continue
        return out

    # -- one lock per folder: shared by runs, exclusive to replace the folder ---------------------

    @contextmanager
    def lock(self, exclusive: bool = False):
        """Hold the folder's lock (flock: released when the process dies, also by kill -9)."""
        import fcntl

        self.manifest.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.manifest / "lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunStateError(
                    f"another FastServe command is using {self.root} (it holds _manifest/lock); "
                    "wait for it to end, or stop it, before replacing the folder with --overwrite"
                ) from None
            yield
        finally:
            os.close(fd)

    # -- binding a folder to one config -----------------------------------------------------------

    def bind(self, fingerprint: dict, overwrite: bool) -> dict:
        """Bind the folder to `fingerprint` (a dict; its `sha` is the identity), or refuse.

        Returns the run record (new, or the existing one when resuming). To replace a folder bound
        to another fingerprint (`overwrite`), no other command may hold its lock.
        """
        if self.root.exists() and not self.root.is_dir():
            raise RunStateError(
                f"output {self.root} is a file, not a folder; choose a folder for --output"
            )
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
            # a folder bound to a config that never completed a shard (a typo in a column name,
            # a broken model) has nothing to protect: the corrected command takes it over
            if not overwrite and self.holds_results():
                old = existing["fingerprint"]["fields"]
                new = fingerprint["fields"]
                diffs = [
                    f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
                    + (f" ({CHANGE_HINTS[k]})" if k in CHANGE_HINTS else "")
                    for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)
                ]
                raise RunStateError(
                    f"output folder {self.root} holds a run with another config "
                    f"({'; '.join(diffs)}). Use a new --output folder, or --overwrite to replace it"
                )
            with self.lock(exclusive=True):
                self.clear()
            existing = None
        if existing is None:
            existing = {"fingerprint": fingerprint}
            try:  # several processes may start one run folder at once (array tasks): one wins
                exclusive_write_json(self.run_json, existing)
            except FileExistsError:
                return self.bind(fingerprint, overwrite=False)
        return existing

    def remove_stale_temporaries(self, older_than_s: float = 3600) -> int:
        """Remove temporaries a killed writer left (kill -9 mid-write). Only old ones: a young
        one may be an array task's write in progress. Returns how many were removed."""
        import time

        now, n = time.time(), 0
        for folder in (
            self.root,
            self.root / "_rejected",
            *self.manifest.glob("*/"),
            self.manifest,
        ):
            for p in folder.glob(".tmp-*") if folder.is_dir() else ():
                try:
                    if now - p.stat().st_mtime > older_than_s:
                        p.unlink()
                        n += 1
                except FileNotFoundError:
                    pass
        return n

    def holds_results(self) -> bool:
        """Whether any shard was ever completed here (outputs or records)."""
        return any(self.root.glob("part-*.parquet")) or any(
            (self.manifest / "shards").glob("*.json")
        )

    def clear(self) -> None:
        """Remove what a run writes here (results, temporaries, sidecars, manifest, marker)."""
        self.success.unlink(missing_ok=True)  # first: a half-cleared folder never looks complete
        self.run_json.unlink(missing_ok=True)  # then: it is no longer bound to the old config
        for p in [*self.root.glob("*.parquet"), *self.root.glob(".tmp-*")]:
            p.unlink(missing_ok=True)
        if (self.root / "_rejected").exists():  # a failure surfaces: half-cleared is not clear
            shutil.rmtree(self.root / "_rejected")
        for p in self.manifest.iterdir() if self.manifest.is_dir() else ():
            if p.name != "lock":  # held by the clearing command itself
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
