"""Ids unique across the corpus: a row whose id was seen earlier is rejected as duplicate_id.

"Earlier" is fixed, so that a run killed and rerun decides exactly as an uninterrupted one: ids
already written by any completed shard of the folder come first (whatever this run's inputs are),
then the pending shards in plan order, then rows in shard order. Each judgement names the shard
holding the first occurrence; the completion record keeps those names (`dup_of`), so that when that
shard is withdrawn the judgement is made again (pipeline/ledger.py). Workers hash the ids (16-byte
BLAKE2b: collisions are out of reach at any corpus size); the client holds 16 bytes per row while
it compares them, nothing more.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import InputConfig
from .errors import UserError
from .plan import Shard
from .reader import read_ids

_NULL = b"\0" * 16  # no id: rejected as null_id by the runner, never a duplicate


def _hash(ids: list[str | None]) -> np.ndarray:
    return np.array(
        [
            hashlib.blake2b(i.encode(), digest_size=16).digest() if i is not None else _NULL
            for i in ids
        ],
        dtype="S16",
    )


def pending_hashes(shard: Shard, cfg: InputConfig) -> np.ndarray | None:
    """Hashes of a pending shard's input ids in row order; None when none come from a column
    (generated ids are unique by construction) or the shard cannot be read (it will fail)."""
    out, any_column = [], False
    try:
        for piece, path in zip(shard.pieces, shard.paths, strict=True):
            ids = read_ids(piece, path, cfg)
            if ids is None:
                out.append(np.full(piece.rows, _NULL, dtype="S16"))
            else:
                any_column = True
                out.append(_hash(ids))
    except UserError:
        return None
    return np.concatenate(out) if any_column and out else None


def written_hashes(output_path: str) -> np.ndarray | str:
    """Hashes of the ids a completed shard wrote, or why they cannot be read (the run must then
    stop: a duplicate check that skips a file is no check)."""
    try:
        return _hash(pq.read_table(output_path, columns=["id"]).column(0).to_pylist())
    except (OSError, pa.ArrowException, KeyError) as e:
        return f"{type(e).__name__}: {e}"


def find_duplicates(
    written: list[tuple[str, np.ndarray]], pending: list[tuple[Shard, np.ndarray | None]]
) -> dict[str, dict[int, tuple[str, str]]]:
    """{shard id: {row: (detail, id of the shard with the first occurrence)}} for every pending
    row whose id appeared before it. `written`: (shard id, hashes) of completed shards."""
    parts = [(s, h) for s, h in pending if h is not None]
    if not parts:
        return {}
    if written:
        taken = np.concatenate([h for _, h in written])
        taken_owner = np.concatenate([np.full(len(h), i) for i, (_, h) in enumerate(written)])
        order = np.argsort(taken, kind="stable")
        taken, taken_owner = taken[order], taken_owner[order]
    else:
        taken, taken_owner = np.array([], dtype="S16"), np.array([], dtype=int)
    allh = np.concatenate([h for _, h in parts])
    owner = np.concatenate([np.full(len(h), i) for i, (_, h) in enumerate(parts)])
    offset = np.concatenate([np.arange(len(h)) for _, h in parts])
    _, first, inverse = np.unique(allh, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    dup = np.ones(len(allh), dtype=bool)
    dup[first] = False
    at = np.searchsorted(taken, allh)
    in_taken = at < len(taken)
    in_taken[in_taken] = taken[at[in_taken]] == allh[in_taken]
    dup |= in_taken
    dup &= allh != _NULL
    out: dict[str, dict[int, tuple[str, str]]] = {}
    for i in np.flatnonzero(dup):  # few, normally: details only for them
        if in_taken[i]:
            src = written[taken_owner[at[i]]][0]
            detail = f"the same id was written earlier into this folder (shard {src})"
        else:
            j = first[inverse[i]]
            shard, _ = parts[owner[j]]
            src = shard.id
            detail = f"the same id is at row {offset[j]} of shard {shard.id} ({shard.sources})"
        out.setdefault(parts[owner[i]][0].id, {})[int(offset[i])] = (detail, src)
    return out
