"""Exact top-k over a catalogue scored block by block: a running top-k per query.

Each block of scores (queries x items, one matmul) is cut against the queries' current k-th
score, so after the first block only the few items that can still enter a top-k are merged: the
cost is the matmul and one comparison. Order is score descending, ties broken by item id
ascending (`tie_rank`: each item's place in id order), so the result is one exact answer, the one
a full sort gives, whatever the block size.
"""

from __future__ import annotations

import numpy as np
import torch


class RunningTopK:
    def __init__(self, n_queries: int, k: int, tie_rank: np.ndarray):
        self.k = k
        self.scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
        self.items = np.full((n_queries, k), -1, dtype=np.int64)
        # -1 (an empty slot) ranks after every item
        self.rank = np.append(tie_rank.astype(np.int64), np.iinfo(np.int64).max)

    def offer(self, q0: int, scores: torch.Tensor, item0: int) -> None:
        """Scores (a float32 block: queries q0.. x items item0..; -inf: not a candidate)."""
        k, n_items = self.k, scores.shape[1]
        cut = torch.from_numpy(self.scores[q0 : q0 + scores.shape[0], k - 1].copy())
        filling = torch.isneginf(cut)  # fewer than k so far: this block's own k-th decides
        if bool(filling.any()) and n_items > k:
            cut[filling] = torch.topk(scores[filling], k, dim=1).values[:, -1]
        rows, cols = ((scores >= cut[:, None]) & ~torch.isneginf(scores)).nonzero(as_tuple=True)
        if len(rows):
            self._merge(rows.numpy() + q0, scores[rows, cols].numpy(), cols.numpy() + item0)

    def _merge(self, rows: np.ndarray, scores: np.ndarray, items: np.ndarray) -> None:
        k = self.k
        touched = np.unique(rows)
        old_items = self.items[touched].ravel()
        held = old_items >= 0
        r = np.concatenate([np.repeat(touched, k)[held], rows])
        s = np.concatenate([self.scores[touched].ravel()[held], scores])
        i = np.concatenate([old_items[held], items])
        order = np.lexsort((self.rank[i], -s, r))
        r, s, i = r[order], s[order], i[order]
        pos = np.arange(len(r)) - np.searchsorted(r, r, side="left")
        keep = pos < k
        self.scores[touched], self.items[touched] = -np.inf, -1
        self.scores[r[keep], pos[keep]] = s[keep]
        self.items[r[keep], pos[keep]] = i[keep]


def query_block(n_items_per_block: int, budget: int = 8 << 20) -> int:
    """Queries scored at once against a block: `budget` scores (32 MiB of float32) at most."""
    return max(1, budget // max(1, n_items_per_block))
