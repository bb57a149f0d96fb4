"""The run folder's plan: generations of shards, each one adding shards or withdrawing earlier ones.

    _manifest/plan/<gen>.json   {"shards": [{"id", "pieces": [...]}, ...], "retracts": {id: why}}

Generation files are created exclusively (os.link) and never rewritten, so planners starting
together (array tasks) agree: the loser reads the winner's generation and plans what is left.
The live plan is every shard of every generation, in order, minus those a later generation
withdraws; plan order (generation, then shard) decides which of two rows with one id comes first.

A shard is withdrawn, and its files planned again into a new generation, when
- a file it reads changed since it was planned (even at the same size): its old rows go with it,
  so the folder never mixes two versions of a file;
- it failed at run time for one file's sake: its other files are packed again without that file
  (which is then planned alone), so they complete;
- rows of it were rejected as duplicates of rows in a withdrawn shard (recorded as `dup_of` in its
  completion record): the judgement no longer holds, so it is made again.
The generation that withdraws a shard is written before the shard's output, rejected rows and
record are removed; a crash between the two leaves files that the next planning removes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import RunStateError
from .manifest import RunDir, exclusive_write_json
from .plan import FileId, Piece, Shard, pack, piece_from_json, piece_to_json, plan_files


@dataclass
class Ledger:
    """What a run folder's plan holds: its live shards in plan order, and the withdrawn ones."""

    live: list[Shard]
    retracted: dict[str, str]
    """shard id -> why it was withdrawn."""
    generations: int

    @property
    def planned_keys(self) -> set[str]:
        return {p.key for s in self.live for p in s.pieces}


def read_ledger(plan_dir: Path) -> Ledger:
    gens = sorted(plan_dir.glob("[0-9]*.json"))
    shards: dict[str, Shard] = {}
    retracted: dict[str, str] = {}
    for g in gens:
        try:
            doc = json.loads(g.read_text())
            for sid, why in doc.get("retracts", {}).items():
                shards.pop(sid, None)
                retracted[sid] = why
            for s in doc["shards"]:
                shards[s["id"]] = Shard(s["id"], tuple(piece_from_json(p) for p in s["pieces"]))
        except (ValueError, KeyError, TypeError) as e:
            raise RunStateError(
                f"the run folder's plan file {g} is damaged ({type(e).__name__}: {e}); restore it, "
                "or start the folder afresh with --overwrite"
            ) from None
    return Ledger(list(shards.values()), retracted, len(gens))


@dataclass
class Plan:
    """One run's view of the plan, after it was extended for this run's inputs."""

    shards: list[Shard]
    """Live shards this run is responsible for (touching its inputs, or planned by it), with the
    path of each piece filled in."""
    ledger: Ledger
    problems: dict[str, str] = field(default_factory=dict)
    """Input files that could not be planned (file key -> why); planned again next run."""
    retracted: dict[str, str] = field(default_factory=dict)
    """Shards this planning withdrew (id -> why)."""
    dropped: dict[str, str] = field(default_factory=dict)
    """Files whose rows were withdrawn and that could not be planned again now (key -> why)."""


def _unchanged(piece: Piece, path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return piece.file.change(FileId.of(f)) is None
    except OSError:
        return False


def _current_id(path: str) -> tuple[FileId | None, str]:
    try:
        with open(path, "rb") as f:
            return FileId.of(f), ""
    except OSError as e:
        return None, f"input file {path} cannot be opened ({e.strerror or e})"


def _done(run: RunDir, shard_id: str, records: dict[str, dict]) -> bool:
    return shard_id in records and run.output_path(shard_id).exists()


def _cascade(retract: dict[str, str], ledger: Ledger, records: dict[str, dict]) -> dict[str, str]:
    """`retract` grown by every completed live shard that judged rows against a withdrawn one."""
    out = dict(retract)
    live = {s.id for s in ledger.live}
    grew = True
    while grew:
        grew = False
        for sid, rec in records.items():
            if sid in out or sid not in live:
                continue
            gone = [d for d in rec.get("dup_of", ()) if d in out or d in ledger.retracted]
            if gone:
                out[sid] = f"rows of it were judged duplicates of rows of withdrawn shard {gone[0]}"
                grew = True
    return out


def extend(
    run: RunDir,
    files: dict[str, str],
    text_column: str,
    shard_rows: int,
    retract: dict[str, str] | None = None,
    alone: frozenset[str] = frozenset(),
    task_columns: tuple[str, ...] = (),
    text_kind: str = "string",
) -> Plan:
    """Bring the plan up to date with `files` ({key: path}, this run's inputs); return this run's
    view. `retract`: shards to withdraw besides those of changed files; `alone`: file keys to plan
    one per shard (they failed at run time); `task_columns`: columns a file must have besides the
    text (what the task's options name)."""
    plan_dir = run.plan_dir
    while True:
        records = run.records()  # before the generations: a record only names shards before it
        ledger = read_ledger(plan_dir)
        live = {s.id: s for s in ledger.live}
        planned = {}  # key -> its first live piece
        for s in ledger.live:
            for p in s.pieces:
                planned.setdefault(p.key, p)
        changed: dict[str, str] = {}
        unreadable: dict[str, str] = {}  # reported, but its results stay: it may come back
        for key, path in files.items():
            if key in planned:
                now, err = _current_id(path)
                why = planned[key].file.change(now) if now else None
                if why:
                    changed[key] = why
                elif err:
                    unreadable[key] = err
        withdraw = {k: v for k, v in (retract or {}).items() if k in live}
        for s in ledger.live:
            hit = [k for k in s.keys if k in changed]
            if hit:
                withdraw.setdefault(s.id, f"input file {hit[0]} changed: {changed[hit[0]]}")
            elif not _done(run, s.id, records):  # never done, and a file of it is gone: forget
                gone = [p.key for p in s.pieces if not os.path.lexists(files.get(p.key, p.path))]
                if gone:
                    withdraw.setdefault(s.id, f"input file {gone[0]} is gone; it was never done")
        withdraw = _cascade(withdraw, ledger, records)

        # What is planned again: pieces of withdrawn shards whose file is as planned (re-packed as
        # they are), changed files in whole, and files never planned.
        kept: list[Piece] = []
        dropped: dict[str, str] = {}
        for sid in withdraw:
            for p in live[sid].pieces:
                if p.key in changed:
                    continue
                path = files.get(p.key, p.path)
                if _unchanged(p, path):
                    kept.append(replace(p, path=path))
                else:
                    dropped[p.key] = (
                        f"left out of the plan with shard {sid} ({withdraw[sid]}): it is no longer "
                        f"at {path} as planned; name it in --input to process it again"
                    )
        remaining = {p.key for s in ledger.live if s.id not in withdraw for p in s.pieces}
        kept_keys = {p.key for p in kept}
        whole = {
            k: v
            for k, v in files.items()
            if k in changed or (k not in remaining and k not in kept_keys and k not in unreadable)
        }
        gen = ledger.generations
        prefix = f"{gen:05d}"
        fresh, problems = plan_files(
            whole, text_column, shard_rows, prefix, alone, task_columns, text_kind
        )
        problems.update(unreadable)
        repacked = pack(kept, shard_rows, prefix, alone)
        new = [replace(s, id=f"{prefix}-{i:05d}") for i, s in enumerate([*repacked, *fresh])]
        if not new and not withdraw:
            break
        doc = {
            "shards": [{"id": s.id, "pieces": [piece_to_json(p) for p in s.pieces]} for s in new],
            "retracts": withdraw,
        }
        try:
            exclusive_write_json(plan_dir / f"{gen:05d}.json", doc)
        except FileExistsError:  # another planner was first: look again
            continue
        ledger = read_ledger(plan_dir)
        break

    remove_withdrawn(run, ledger)
    created = {s.id for s in ledger.live if s.id.startswith(f"{gen:05d}-")} if new else set()
    mine = [
        Shard(s.id, s.pieces, tuple(files.get(p.key, p.path) for p in s.pieces))
        for s in ledger.live
        if s.id in created or any(p.key in files for p in s.pieces)
    ]
    return Plan(mine, ledger, problems, withdraw, dropped)


def remove_withdrawn(run: RunDir, ledger: Ledger) -> None:
    """Delete what withdrawn shards wrote (output, rejected rows, record), if anything is left."""
    for sid in ledger.retracted:
        for p in (run.output_path(sid), run.rejected_path(sid), run.record_path(sid)):
            p.unlink(missing_ok=True)


def complete_records(run: RunDir, sha: str) -> dict[str, dict]:
    """The completion records of the folder's live shards done under fingerprint `sha` (with
    their output on disk), by shard id: what its totals are made of."""
    live = {s.id for s in read_ledger(run.plan_dir).live}
    return {
        sid: rec
        for sid, rec in run.records().items()
        if sid in live and rec.get("fingerprint") == sha and run.output_path(sid).exists()
    }
