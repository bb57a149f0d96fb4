"""recommend: two-tower retrieval, the k items of a catalogue closest to each query.

Queries are texts, embedded with the job's model as the catalogue's items were, or vectors
already (task.embedding_column). Every query is scored against the whole catalogue, a block of
items at a time (pipeline/catalogue.py reads them from Parquet; tasks/topk.py keeps the running
top-k): exact, by cosine or inner product, ties broken by item id. A query's output is up to k
rows (rank, item_id, score); a query left with no item (all excluded or filtered out) is a
rejected row, no_items.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .. import schemas
from ..catalogue import Catalogue
from ..config import ModelConfig, TaskConfig
from .base import TaskOutput
from .topk import RunningTopK, query_block

DEFAULT_K = 10


class RecommendTask:
    name = "recommend"

    def __init__(self, model_cfg: ModelConfig, task_cfg: TaskConfig):
        from .embed import EmbedTask

        self.schema = schemas.load("recommend")
        self.cfg = task_cfg
        self.k = task_cfg.k or DEFAULT_K
        self.embedder = (
            None
            if task_cfg.embedding_column
            else EmbedTask(model_cfg, dataclasses.replace(task_cfg, name="embed"))
        )
        self.catalogue = Catalogue.of(task_cfg)
        self.item_ids = self.catalogue.ids()  # ids only; vectors are read block by block
        rank = np.empty(len(self.item_ids), dtype=np.int64)
        rank[pc.sort_indices(self.item_ids).to_numpy()] = np.arange(len(self.item_ids))
        self.tie_rank = rank

    def queries(self, texts) -> tuple[np.ndarray, dict[int, tuple[int, str, str]], int]:
        """(query vectors (n, d), rejected rows by index, tokens read)."""
        if self.embedder is None:
            bad, dims = {}, {len(v) for v in texts}
            dim = max(dims, key=lambda d: sum(len(v) == d for v in texts))
            for i, v in enumerate(texts):
                if len(v) != dim:
                    bad[i] = (i, "bad_vector", f"{len(v)} values; the other queries have {dim}")
                elif not np.isfinite(v).all():
                    bad[i] = (i, "bad_vector", "the vector holds null, NaN or infinite values")
            good = [v if i not in bad else np.zeros(dim, np.float32) for i, v in enumerate(texts)]
            return np.stack(good).astype(np.float32), bad, 0
        vectors, kept, rows_in = self.embedder.vectors(texts)
        bad = {i: (i, r, d) for i, r, d in rows_in.rejected}
        return vectors, bad, sum(rows_in.enc.lengths[i] for i in kept)

    def process(self, texts, ids=None, extra=None) -> TaskOutput:
        cfg, extra = self.cfg, extra or {}
        vectors, bad, tokens = self.queries(texts)
        q = torch.from_numpy(vectors)
        if cfg.metric == "cosine":
            norms = q.norm(dim=1)
            for i in (norms == 0).nonzero().flatten().tolist():
                bad.setdefault(i, (i, "bad_vector", "a zero vector has no direction (cosine)"))
            q = torch.nn.functional.normalize(q, dim=1)
        top = RunningTopK(len(texts), self.k, self.tie_rank)
        dim_checked = False
        excluded = self._excluded(extra.get(cfg.exclude_column)) if cfg.exclude_column else None
        wanted = self._filter_codes(extra[cfg.filter_column]) if cfg.filter_column else None
        item0 = 0
        for items, filters in self.catalogue.blocks(cfg.block_items):
            if not dim_checked:
                if items.shape[1] != q.shape[1]:
                    from ..errors import InputError

                    raise InputError(
                        f"the queries have {q.shape[1]} dimensions and the catalogue's items "
                        f"{items.shape[1]}: they come from different models"
                    )
                dim_checked = True
            v = torch.from_numpy(np.require(items, requirements="W"))  # mmap pages: a copy
            if cfg.metric == "cosine":
                v = torch.nn.functional.normalize(v, dim=1)
            step = query_block(len(items))
            for q0 in range(0, len(q), step):
                scores = q[q0 : q0 + step] @ v.T
                if wanted is not None:
                    codes = pc.index_in(filters.cast(pa.string()), value_set=wanted[1])
                    codes = codes.fill_null(-1)
                    item_codes = torch.from_numpy(np.array(codes.to_numpy(zero_copy_only=False)))
                    mine = wanted[0][q0 : q0 + step, None]
                    scores[(mine >= 0) & (mine != item_codes[None, :])] = -torch.inf
                if excluded is not None:
                    self._exclude(scores, excluded, q0, item0, len(items))
                for i in bad:
                    if q0 <= i < q0 + step:
                        scores[i - q0] = -torch.inf
                top.offer(q0, scores, item0)
            item0 += len(items)
        return self._output(top, texts, bad, tokens)

    def _excluded(self, lists) -> tuple[np.ndarray, np.ndarray]:
        """(query row, item number) of every exclusion naming an item of the catalogue, by item."""
        rows = [i for i, ids in enumerate(lists) for _ in (ids or ())]
        flat = pa.array([str(x) for ids in lists for x in (ids or ())], type=pa.string())
        items = pc.index_in(flat, value_set=self.item_ids).fill_null(-1).to_numpy()
        rows = np.asarray(rows, dtype=np.int64)
        found = items >= 0
        order = np.argsort(items[found], kind="stable")
        return rows[found][order], items[found][order]

    @staticmethod
    def _exclude(scores: torch.Tensor, excluded, q0: int, item0: int, n: int) -> None:
        rows, items = excluded
        lo, hi = np.searchsorted(items, [item0, item0 + n])
        r, i = rows[lo:hi], items[lo:hi]
        inside = (r >= q0) & (r < q0 + scores.shape[0])
        scores[torch.from_numpy(r[inside] - q0), torch.from_numpy(i[inside] - item0)] = -torch.inf

    @staticmethod
    def _filter_codes(values) -> tuple[torch.Tensor, pa.Array]:
        """Each query's filter value as a code into the distinct values (-1: null, any item)."""
        arr = pa.array(values).cast(pa.string())
        distinct = pc.unique(arr.drop_null())
        codes = pc.index_in(arr, value_set=distinct).fill_null(-1).to_numpy(zero_copy_only=False)
        return torch.from_numpy(codes.astype(np.int64)), distinct

    def _output(self, top: RunningTopK, texts, bad: dict, tokens: int) -> TaskOutput:
        counts = (top.items >= 0).sum(axis=1)
        for i in np.flatnonzero(counts == 0).tolist():
            bad.setdefault(
                i, (i, "no_items", "every item of the catalogue was excluded or filtered out")
            )
        kept = [i for i in range(len(texts)) if i not in bad]
        held = top.items[kept] >= 0
        items = top.items[kept][held]
        return TaskOutput(
            kept=kept,
            columns={
                "rank": np.tile(np.arange(1, self.k + 1), (len(kept), 1))[held],
                "item_id": self.item_ids.take(pa.array(items, type=pa.int64())),
                "score": top.scores[kept][held],
            },
            rejected=sorted(bad.values()),
            tokens=tokens,
            per_row=counts[kept].tolist(),
        )
