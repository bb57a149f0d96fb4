"""Invariant 1, nothing lost: every bad row kept aside with its reason; bad files fail alone."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from fastserve.pipeline.testing import infer_args, sample_texts

from conftest import read_sorted, run_cli

LONG = " ".join(["wonderful"] * 200)  # far over the tiny model's 64 tokens


def write(path, ids, texts, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())}),
        path,
        **kw,
    )


def test_every_bad_row_kind_is_accounted_for(tmp_path, classifier):
    c = tmp_path / "corpus"
    good = sample_texts(200, seed=9)
    expected = {}  # (source file, row) -> reason
    # a big file in several row groups, with bad rows sprinkled through it
    ids = [f"a{i}" for i in range(200)]
    texts = list(good)
    for r, (reason, value) in {
        3: ("null_text", None),
        50: ("empty_text", ""),
        51: ("empty_text", "   \n"),
        120: ("too_long", LONG),
        199: ("too_long", LONG),
    }.items():
        texts[r] = value
        expected[("a.parquet", r)] = reason
    ids[77] = None
    expected[("a.parquet", 77)] = "null_id"
    ids[150] = "a10"  # repeats an id of the same file
    expected[("a.parquet", 150)] = "duplicate_id"
    write(c / "a.parquet", ids, texts, row_group_size=40)
    # small files packed together; one repeats ids of file a and of each other
    write(c / "b.parquet", ["b0", "a5", "b2"], ["good", "fine", "bad"])
    expected[("b.parquet", 1)] = "duplicate_id"
    write(c / "c.parquet", ["c0", "b0", "c2"], ["ok", "bad", None])
    expected[("c.parquet", 1)] = "duplicate_id"
    expected[("c.parquet", 2)] = "null_text"
    # files that cannot be read fail alone, with their reason; the rest completes
    (c / "csv.parquet").write_text("id,text\n1,hello\n")
    truncated = (c / "a.parquet").read_bytes()[:300]
    (c / "truncated.parquet").write_bytes(truncated)
    (c / "readme.txt").write_text("not an input: only *.parquet files are")

    out = tmp_path / "out"
    proc = run_cli(
        *infer_args(classifier, out, c, workers=2),
        "--shard-rows",
        "50",
        "--on-long",
        "reject",
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "2 input file(s) and 0 shard(s) failed" in proc.stderr
    assert "csv.parquet is not readable Parquet" in proc.stderr
    assert "truncated.parquet is not readable Parquet" in proc.stderr
    assert not (out / "_SUCCESS").exists()

    rejected = read_sorted(out / "_rejected").to_pylist()
    for r in rejected:  # source_file is the file's real path
        assert r["source_file"] == os.path.realpath(c / os.path.basename(r["source_file"]))
        r["source_file"] = os.path.basename(r["source_file"])
    got = {(r["source_file"], r["row_number"]): r["reason"] for r in rejected}
    assert got == expected
    assert all(r["detail"] for r in rejected)
    dup = next(r for r in rejected if (r["source_file"], r["row_number"]) == ("b.parquet", 1))
    assert dup["id"] == "a5" and "a.parquet" in dup["detail"]

    written = read_sorted(out)
    n_in = 200 + 3 + 3
    assert written.num_rows + len(rejected) == n_in
    assert len(set(written.column("id").to_pylist())) == written.num_rows  # no duplicate id
    # per shard, and in the run's totals: rows in = rows written + rows rejected
    records = [json.loads(p.read_text()) for p in (out / "_manifest" / "shards").glob("*.json")]
    assert len(records) > 2  # the big file was split into several shards
    for r in records:
        assert r["rows_in"] == r["rows_out"] + r["rows_rejected"]
        assert pq.read_metadata(out / r["output"]).num_rows == r["rows_out"]
    (entry,) = [json.loads(p.read_text()) for p in (out / "_manifest" / "runs").glob("*.json")]
    totals = entry["totals"]
    assert totals["rows_in"] == n_in and totals["rows_out"] == written.num_rows
    assert totals["rejected_by_reason"] == {
        "null_text": 2,
        "empty_text": 2,
        "too_long": 2,
        "null_id": 1,
        "duplicate_id": 3,
    }


def test_long_text_truncated_by_default_and_flagged(tmp_path, classifier):
    write(tmp_path / "c" / "a.parquet", ["x", "y"], [LONG, "short"])
    run_cli(
        *infer_args(classifier, tmp_path / "out", tmp_path / "c"),
        check=True,
    )
    t = read_sorted(tmp_path / "out")
    assert t.column("truncated").to_pylist() == [True, False]
