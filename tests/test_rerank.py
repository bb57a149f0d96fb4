"""rerank: a cross-encoder's relevance per pair equals sentence_transformers.CrossEncoder.predict."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastserve.pipeline.testing import infer_args, sample_texts, toml_text
from fastserve.pipeline.testing.models import build_classifier, build_encoder

from conftest import read_sorted, run_cli


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    """A tiny random BERT with one relevance output, as ms-marco cross-encoders have."""
    return build_classifier(tmp_path_factory.mktemp("models") / "ce", num_labels=1, seed=5)


def write_pairs(folder, queries, passages, **more):
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"p{i:04d}" for i in range(len(queries))]
    table = pa.table({"id": ids, "query": queries, "passage": passages, **more})
    pq.write_table(table, folder / "pairs.parquet", row_group_size=16)
    return ids


def run_rerank(tmp_path, model, inputs, **task):
    (tmp_path / "job.toml").write_text(
        toml_text({"input": {"text_column": "query"},
                   "task": {"name": "rerank", "text_pair_column": "passage", **task},
                   "cluster": {"executor": "serial"}})
    )  # fmt: skip
    return run_cli(*infer_args(model, tmp_path / "out", inputs, task="rerank",
                               extra=["--config", tmp_path / "job.toml", "--batch-size", "5"]))  # fmt: skip


@pytest.mark.parametrize("identity", [False, True], ids=["sigmoid", "identity"])
def test_rerank_equals_the_cross_encoder(tmp_path, cross_encoder, identity):
    from sentence_transformers import CrossEncoder

    model = cross_encoder
    if identity:  # a folder whose config names its activation (as CrossEncoder.save writes it)
        model = tmp_path / "ce-identity"
        model.mkdir()
        for f in cross_encoder.iterdir():
            (model / f.name).write_bytes(f.read_bytes())
        config = json.loads((model / "config.json").read_text())
        config["sentence_transformers"] = {"activation_fn": "torch.nn.modules.linear.Identity"}
        (model / "config.json").write_text(json.dumps(config))
    # passages long enough that some pairs are cut to the model's 64 tokens
    queries = sample_texts(40, seed=1, max_words=12)
    passages = sample_texts(40, seed=2, min_words=5, max_words=60)
    ids = write_pairs(tmp_path / "c", queries, passages)
    proc = run_rerank(tmp_path, model, tmp_path / "c")
    assert proc.returncode == 0, proc.stderr
    got = read_sorted(tmp_path / "out")
    want = CrossEncoder(str(model), device="cpu").predict(list(zip(queries, passages, strict=True)))
    order = sorted(range(len(ids)), key=ids.__getitem__)
    assert got.column("id").to_pylist() == [ids[i] for i in order]
    assert got.column("score").to_pylist() == pytest.approx(
        [float(want[i]) for i in order], abs=1e-5
    )
    truncated = got.column("truncated").to_pylist()
    assert any(truncated) and not all(truncated)
    if not identity:
        assert all(0 < s < 1 for s in got.column("score").to_pylist())


def test_bad_pairs_are_rejected_with_a_reason(tmp_path, cross_encoder):
    ids = write_pairs(tmp_path / "c", ["q one", "q two", "q three", "  "],
                      ["a passage", None, "   ", "a passage"])  # fmt: skip
    proc = run_rerank(tmp_path, cross_encoder, tmp_path / "c")
    assert proc.returncode == 0, proc.stderr
    assert read_sorted(tmp_path / "out").column("id").to_pylist() == [ids[0]]
    rejected = read_sorted(tmp_path / "out" / "_rejected")
    assert dict(zip(rejected.column("id").to_pylist(), rejected.column("reason").to_pylist(),
                    strict=True)) == {ids[1]: "null_pair", ids[2]: "empty_pair", ids[3]: "empty_text"}  # fmt: skip


def test_rerank_options_are_checked(tmp_path, cross_encoder, classifier):
    write_pairs(tmp_path / "c", ["q"], ["p"])
    (tmp_path / "job.toml").write_text(toml_text({"task": {"name": "rerank"}}))
    proc = run_cli(*infer_args(cross_encoder, tmp_path / "o", tmp_path / "c", task="rerank",
                               extra=["--config", tmp_path / "job.toml"]))  # fmt: skip
    assert proc.returncode == 2 and "needs the second text of each pair" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    # a three-label classifier is no cross-encoder: said before any row is scored
    proc = run_rerank(tmp_path, classifier, tmp_path / "c")
    assert proc.returncode != 0 and "needs a cross-encoder with one relevance output" in proc.stderr
    assert "Traceback" not in proc.stderr
    # an option of another task
    (tmp_path / "job.toml").write_text(
        toml_text({"task": {"name": "sentiment", "text_pair_column": "passage"}}))  # fmt: skip
    proc = run_cli(*infer_args(cross_encoder, tmp_path / "o", tmp_path / "c",
                               extra=["--config", tmp_path / "job.toml"]))  # fmt: skip
    assert proc.returncode == 2 and "task.text_pair_column is for task rerank" in proc.stderr


def test_rerank_a_recommend_runs_candidates(tmp_path, cross_encoder):
    """Retrieve, then rerank: each query's top-k items of a recommend run, scored again by the
    cross-encoder; equal to CrossEncoder.predict on those (query, item text) pairs."""
    from sentence_transformers import CrossEncoder

    encoder = build_encoder(tmp_path / "enc", seed=2)
    items = sample_texts(30, seed=3, max_words=20)
    (tmp_path / "items").mkdir()
    item_ids = [f"item{i:02d}" for i in range(30)]
    pq.write_table(pa.table({"id": item_ids, "text": items}), tmp_path / "items" / "i.parquet")
    queries = sample_texts(6, seed=4, max_words=10)
    (tmp_path / "q").mkdir()
    qids = [f"q{i}" for i in range(6)]
    pq.write_table(pa.table({"id": qids, "text": queries}), tmp_path / "q" / "q.parquet")
    (tmp_path / "rec.toml").write_text(toml_text({"task": {
        "name": "recommend", "k": 4, "catalogue": str(tmp_path / "items")},
        "cluster": {"executor": "serial"}}))  # fmt: skip
    proc = run_cli(*infer_args(encoder, tmp_path / "recs", tmp_path / "q", task="recommend",
                               extra=["--config", tmp_path / "rec.toml"]))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "job.toml").write_text(toml_text({"task": {
        "name": "rerank", "candidates": str(tmp_path / "recs"),
        "catalogue": str(tmp_path / "items")}, "cluster": {"executor": "serial"}}))  # fmt: skip
    proc = run_cli(*infer_args(cross_encoder, tmp_path / "out", tmp_path / "q", task="rerank",
                               extra=["--config", tmp_path / "job.toml"]))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    recs = read_sorted(tmp_path / "recs").to_pylist()
    got = read_sorted(tmp_path / "out").sort_by([("id", "ascending"), ("rank", "ascending")])
    model = CrossEncoder(str(cross_encoder), device="cpu")
    text = dict(zip(item_ids, items, strict=True))
    want = []
    for qid, q in zip(qids, queries, strict=True):
        mine = [r["item_id"] for r in recs if r["id"] == qid]
        assert len(mine) == 4
        scores = model.predict([(q, text[i]) for i in mine])
        ranked = sorted(zip(mine, scores, strict=True), key=lambda p: (-p[1], p[0]))
        want += [(qid, r + 1, i, float(s)) for r, (i, s) in enumerate(ranked)]
    rows = [(r["id"], r["rank"], r["item_id"], r["score"]) for r in got.to_pylist()]
    assert [r[:3] for r in rows] == [w[:3] for w in want]
    assert [r[3] for r in rows] == pytest.approx([w[3] for w in want], abs=1e-5)

    # the next night: new queries, recommended then reranked; only they are done
    pq.write_table(pa.table({"id": ["n0", "n1"], "text": sample_texts(2, seed=9)}),
                   tmp_path / "q" / "night2.parquet")  # fmt: skip
    proc = run_cli(*infer_args(encoder, tmp_path / "recs", tmp_path / "q", task="recommend",
                               extra=["--config", tmp_path / "rec.toml"]))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    before = {p.name for p in (tmp_path / "out").glob("part-*.parquet")}
    proc = run_cli(*infer_args(cross_encoder, tmp_path / "out", tmp_path / "q", task="rerank",
                               extra=["--config", tmp_path / "job.toml"]))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    new = {p.name for p in (tmp_path / "out").glob("part-*.parquet")} - before
    assert len(new) == 1
    assert sorted(
        pq.read_table(tmp_path / "out" / new.pop()).column("id").unique().to_pylist()
    ) == ["n0", "n1"]
    # queries the recommend run never saw: rejected, the shard complete
    pq.write_table(pa.table({"id": ["x0", "x1"], "text": ["a", "b"]}), tmp_path / "x.parquet")
    proc = run_cli(*infer_args(cross_encoder, tmp_path / "out2", tmp_path / "x.parquet",
                               task="rerank", extra=["--config", tmp_path / "job.toml"]))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert read_sorted(tmp_path / "out2" / "_rejected").column("reason").to_pylist() == [
        "no_candidates",
        "no_candidates",
    ]


def test_a_shard_of_only_bad_pairs_completes(tmp_path, cross_encoder):
    ids = write_pairs(tmp_path / "c", ["q one", "q two"], [None, None])
    proc = run_rerank(tmp_path, cross_encoder, tmp_path / "c")
    assert proc.returncode == 0, proc.stderr
    rejected = read_sorted(tmp_path / "out" / "_rejected")
    assert rejected.column("id").to_pylist() == ids
    assert rejected.column("reason").to_pylist() == ["null_pair", "null_pair"]
