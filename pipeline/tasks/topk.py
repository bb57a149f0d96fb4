"""Exact top-k over a catalogue scored block by block: a running top-k per query.

Each block of scores (queries x items, one matmul) gives its k best per query from one cheap
pass (the maximum of each chunk of 64 items; then only the k best chunks are searched), merged
with the running k best; where an item left out may tie with the k-th, every tied item of that
query joins the merge, so order is exactly score descending, ties broken by item id ascending
(`tie_rank`: each item's place in id order), the answer a full sort gives, whatever the block
size.
"""

from __future__ import annotations

import numpy as np
import torch

# Items per chunk of a block's row, for the cheap pass over it (_offer_chunked)
CHUNK = 64


class RunningTopK:
    def __init__(self, n_queries: int, k: int, tie_rank: np.ndarray):
        self.k = k
        self.scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
        self.items = np.full((n_queries, k), -1, dtype=np.int64)
        # -1 (an empty slot) ranks after every item
        self.rank = np.append(tie_rank.astype(np.int64), np.iinfo(np.int64).max)

    def offer(self, q0: int, scores: torch.Tensor, item0: int) -> None:
        """Scores (a float32 block: queries q0.. x items item0..; -inf: not a candidate)."""
        n = scores.shape[1]
        main = n - n % CHUNK if n // CHUNK >= 4 * self.k else 0
        if main:
            self._offer_chunked(q0, scores[:, :main], item0)
        if main < n:  # a narrow block, or the end of one: searched whole
            self._offer_whole(q0, scores[:, main:], item0 + main)

    def _offer_chunked(self, q0: int, scores: torch.Tensor, item0: int) -> None:
        """The best of a wide block without sorting it: the maximum of each chunk of CHUNK
        items (one cheap pass), and of the k chunks with the highest maxima, the items not below
        the k-th of those maxima (nor below the query's k-th so far): every item that can be in
        the top-k is among them, with every tie of its k-th, unless another chunk ties the k-th
        chunk's maximum (`crowded`: then that query's whole row is searched)."""
        k = self.k
        chunks = scores.unflatten(1, (-1, CHUNK))  # (queries, chunks, CHUNK), a view
        best = chunks.amax(dim=2)
        top, which = torch.topk(best, k, dim=1)
        running = torch.from_numpy(self.scores[q0 : q0 + len(scores), k - 1].copy())
        cut = torch.maximum(top[:, k - 1], running)
        crowded = ((best >= top[:, k - 1 : k]).sum(dim=1) > k).nonzero().flatten().tolist()
        cand = chunks[torch.arange(len(scores))[:, None], which].flatten(1)  # (queries, k x CHUNK)
        rows, cols = (cand >= cut[:, None]).nonzero(as_tuple=True)
        s, i = cand[rows, cols].numpy(), (which[rows, cols // CHUNK] * CHUNK + cols % CHUNK).numpy()
        rows = rows.numpy() + q0
        if crowded:
            out = np.isin(rows - q0, crowded)
            rows, s, i = rows[~out], s[~out], i[~out]
            for r in crowded:
                at = (scores[r] >= cut[r]).nonzero().flatten()
                rows = np.concatenate([rows, np.full(len(at), q0 + r)])
                s, i = np.concatenate([s, scores[r, at].numpy()]), np.concatenate([i, at.numpy()])
        keep = ~np.isneginf(s)
        if keep.any():
            self._merge(rows[keep], s[keep], i[keep] + item0)

    def _offer_whole(self, q0: int, scores: torch.Tensor, item0: int) -> None:
        """The k best of each row and the next one, which says whether an item left out ties
        with the k-th (then, for that query alone, every tied item of the row joins)."""
        k, n = self.k, scores.shape[1]
        vals, idx = torch.topk(scores, min(k + 1, n), dim=1)
        take = min(k, n)
        rows = np.repeat(np.arange(q0, q0 + len(vals)), take)
        s, i = vals[:, :take].numpy().ravel(), idx[:, :take].numpy().ravel()
        if n > k:
            kth = vals[:, k - 1]
            tied = ((vals[:, k] == kth) & ~torch.isneginf(kth)).nonzero().flatten().tolist()
            if tied:
                drop = np.isin(rows - q0, tied) & (s == np.repeat(kth.numpy(), take))
                rows, s, i = rows[~drop], s[~drop], i[~drop]
                for r in tied:
                    at = (scores[r] == kth[r]).nonzero().flatten().numpy()
                    rows = np.concatenate([rows, np.full(len(at), q0 + r)])
                    s = np.concatenate([s, np.full(len(at), kth[r].item(), dtype=np.float32)])
                    i = np.concatenate([i, at])
        # only what can still enter a top-k: finite, and not below the query's k-th so far
        keep = (s >= self.scores[rows, k - 1]) & ~np.isneginf(s)
        if keep.any():
            self._merge(rows[keep], s[keep], i[keep] + item0)

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


def query_block(n_items_per_block: int, budget: int = 4 << 20) -> int:
    """Queries scored at once against a block: `budget` scores (16 MiB of float32) at most; a
    block of scores that stays in cache is scored and searched faster than a larger one
    (measured: bench/recommend.py)."""
    return max(1, budget // max(1, n_items_per_block))
