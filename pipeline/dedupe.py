"""Ids unique across the corpus: a row whose id was seen earlier is rejected as duplicate_id.

"Earlier" is fixed, so that a run killed and rerun decides exactly as an uninterrupted one: ids
already written by completed shards come first, then the pending shards in plan order, then rows in
shard order. Workers hash the ids (16-byte BLAKE2b: collisions are out of reach at any corpus
size); the client holds 16 bytes per row while it compares them, nothing more.
"""

from __future__ import annotations

import hashlib

import numpy as np
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


def written_hashes(output_path: str) -> np.ndarray:
    """Hashes of the ids a completed shard wrote."""
    return _hash(pq.read_table(output_path, columns=["id"]).column(0).to_pylist())


def find_duplicates(
    written: list[np.ndarray], pending: list[tuple[Shard, np.ndarray | None]]
) -> dict[str, dict[int, str]]:
    """{shard id: {row: detail}} for every pending row whose id appeared before it."""
    taken = np.concatenate(written) if written else np.array([], dtype="S16")
    parts = [(s, h) for s, h in pending if h is not None]
    if not parts:
        return {}
    allh = np.concatenate([h for _, h in parts])
    owner = np.concatenate([np.full(len(h), i) for i, (_, h) in enumerate(parts)])
    offset = np.concatenate([np.arange(len(h)) for _, h in parts])
    _, first, inverse = np.unique(allh, return_index=True, return_inverse=True)
    dup = np.ones(len(allh), dtype=bool)
    dup[first] = False
    dup |= np.isin(allh, taken)
    dup &= allh != _NULL
    out: dict[str, dict[int, str]] = {}
    for i in np.flatnonzero(dup):  # few, normally: details only for them
        j = first[inverse[i]]
        if j != i:
            shard, _ = parts[owner[j]]
            detail = f"the same id is at row {offset[j]} of shard {shard.id} ({shard.sources})"
        else:
            detail = "the same id was written by an earlier run into this folder"
        out.setdefault(parts[owner[i]][0].id, {})[int(offset[i])] = detail
    return out
