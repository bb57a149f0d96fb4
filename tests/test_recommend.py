"""recommend: exact top-k over a catalogue scored block by block, equal to a brute-force sort."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastserve.pipeline.testing import infer_args, toml_text

from conftest import read_sorted, run_cli


def write_vectors(path, ids, vectors, **more):
    path.parent.mkdir(parents=True, exist_ok=True)
    col = pa.array([list(map(float, v)) for v in vectors], type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"id": ids, "embedding": col, **more}), path, row_group_size=40)


def brute_force(queries, items, item_ids, k, metric="dot", allowed=None):
    """Per query: [(item_id, score)] best first, ties by item id; `allowed(q, j)` filters."""
    q, v = np.asarray(queries, np.float64), np.asarray(items, np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
    scores = q @ v.T
    out = []
    for a in range(len(q)):
        cand = [j for j in range(len(v)) if allowed is None or allowed(a, j)]
        cand.sort(key=lambda j: (-scores[a, j], item_ids[j]))
        out.append([(item_ids[j], scores[a, j]) for j in cand[:k]])
    return out


def by_query(table):
    rows = {}
    for r in table.sort_by([("id", "ascending"), ("rank", "ascending")]).to_pylist():
        rows.setdefault(r["id"], []).append(r)
    return rows


def run_recommend(tmp_path, queries, model=None, out="out", extra=(), **task):
    (tmp_path / "job.toml").write_text(toml_text({"task": {"name": "recommend", **task}}))
    args = infer_args(model or "", tmp_path / out, queries, task="recommend",
                      extra=["--config", tmp_path / "job.toml", *extra])  # fmt: skip
    if model is None:
        i = args.index("--model")
        del args[i : i + 2]
    return run_cli(*args)


@pytest.fixture(scope="module")
def integer_world(tmp_path_factory):
    """Small integer vectors: every score exact in float32 whatever the summation order, and
    many exact ties (items repeat), so the tie order is tested for real."""
    root = tmp_path_factory.mktemp("vectors")
    rng = np.random.default_rng(7)
    base = rng.integers(-2, 3, size=(120, 6))
    items = np.concatenate([base, base[:60], base[:30]])  # 210 items, 90 exact duplicates
    item_ids = [f"item-{x:04d}" for x in rng.permutation(len(items))]
    queries = rng.integers(-2, 3, size=(45, 6))
    query_ids = [f"q{i:03d}" for i in range(len(queries))]
    cats = [["a", "b", "c"][j % 3] for j in range(len(items))]
    write_vectors(root / "catalogue" / "items.parquet", item_ids, items, category=cats)
    best = brute_force(queries, items, item_ids, 3, "cosine")  # exclusions that matter
    seen = [[i for i, _ in best[a][: a % 4]] + ["not-an-item"] for a in range(len(queries))]
    want_cat = [None if a % 5 == 0 else ["a", "b", "c"][a % 3] for a in range(len(queries))]
    write_vectors(root / "queries" / "q.parquet", query_ids, queries, seen=seen, category=want_cat)
    return root, items, item_ids, queries, query_ids, seen, cats, want_cat


@pytest.mark.parametrize("block_items", [16, 1000])
def test_top_k_equals_a_brute_force_sort(tmp_path, integer_world, block_items):
    root, items, item_ids, queries, query_ids, *_ = integer_world
    proc = run_recommend(tmp_path, root / "queries", k=7, metric="dot", block_items=block_items,
                         catalogue=str(root / "catalogue"), catalogue_embedding_column="embedding",
                         embedding_column="embedding")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = by_query(read_sorted(tmp_path / "out"))
    want = brute_force(queries, items, item_ids, 7)
    assert sorted(got) == query_ids
    for a, qid in enumerate(query_ids):
        assert [(r["item_id"], r["score"]) for r in got[qid]] == want[a], qid
        assert [r["rank"] for r in got[qid]] == list(range(1, 8))


def test_exclusions_and_a_filter(tmp_path, integer_world):
    root, items, item_ids, queries, query_ids, seen, cats, want_cat = integer_world
    proc = run_recommend(tmp_path, root / "queries", k=5, metric="cosine", block_items=50,
                         catalogue=str(root / "catalogue"), catalogue_embedding_column="embedding",
                         embedding_column="embedding", exclude_column="seen",
                         filter_column="category")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = by_query(read_sorted(tmp_path / "out"))

    def allowed(a, j):
        return item_ids[j] not in seen[a] and want_cat[a] in (None, cats[j])

    want = brute_force(queries, items, item_ids, 5, "cosine", allowed)
    for a, qid in enumerate(query_ids):
        rows = got[qid]
        assert all(allowed(a, item_ids.index(r["item_id"])) for r in rows)
        assert [r["score"] for r in rows] == pytest.approx([s for _, s in want[a]], abs=1e-6)
        # cosine rounds: ids agree wherever the score is not a tie within rounding
        for r, (wid, ws) in zip(rows, want[a], strict=True):
            near = [s for _, s in want[a] if abs(s - ws) < 1e-6]
            assert r["item_id"] == wid or len(near) > 1
