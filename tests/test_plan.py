import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastserve.pipeline.batching import length_sorted_batches
from fastserve.pipeline.errors import InputError
from fastserve.pipeline.inputs import resolve_inputs
from fastserve.pipeline.ledger import extend, read_ledger
from fastserve.pipeline.manifest import RunDir
from fastserve.pipeline.plan import file_pieces, pack, plan_files


def plan_run(plan_dir, files, text_column, shard_rows):
    """The live shards for `files` after planning (the ledger of the run folder above plan_dir)."""
    return extend(RunDir(plan_dir.parent.parent), files, text_column, shard_rows).shards


def read_plan(plan_dir):
    return read_ledger(plan_dir).live


def touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    return p


def corpus_file(p, rows, row_group_size, text_type=None):
    text_type = text_type or pa.string()
    p.parent.mkdir(parents=True, exist_ok=True)
    values = [f"row {i}" for i in range(rows)] if text_type == pa.string() else list(range(rows))
    texts = pa.array(values, text_type)
    pq.write_table(pa.table({"text": texts}), p, row_group_size=row_group_size)
    return p


def test_folders_files_and_globs(tmp_path):
    a = touch(tmp_path / "c" / "a.parquet")
    touch(tmp_path / "c" / "sub" / "b.parquet")
    touch(tmp_path / "c" / "_skip.parquet")
    touch(tmp_path / "c" / "notes.txt")
    touch(tmp_path / "d" / "x.parquet")
    files = resolve_inputs([str(tmp_path / "c"), str(tmp_path / "d" / "*.parquet")])
    real = os.path.realpath(tmp_path)
    assert list(files) == [f"{real}/c/a.parquet", f"{real}/c/sub/b.parquet", f"{real}/d/x.parquet"]
    assert files[os.path.realpath(a)] == os.path.realpath(a)


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        resolve_inputs([str(tmp_path / "nope")])
    with pytest.raises(InputError, match="matches no file"):
        resolve_inputs([str(tmp_path / "*.parquet")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no"):
        resolve_inputs([str(tmp_path / "empty")])


def test_one_key_per_real_file_however_it_is_named(tmp_path):
    # the same name under two roots is two files; one file under two roots (or a link) is one
    x, y = touch(tmp_path / "a" / "x.parquet"), touch(tmp_path / "b" / "x.parquet")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    files = resolve_inputs(
        [str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path), str(tmp_path / "link")]
    )
    assert sorted(files) == sorted({os.path.realpath(x), os.path.realpath(y)})


def test_a_big_file_is_split_by_row_groups(tmp_path):
    f = corpus_file(tmp_path / "big.parquet", rows=1000, row_group_size=100)
    pieces, problem = file_pieces("big.parquet", str(f), "text", shard_rows=250)
    assert problem is None
    assert [p.row_groups for p in pieces] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert sum(p.rows for p in pieces) == 1000
    shards = pack(pieces, 250, "00000")
    assert len(shards) == 5 and all(s.rows == 200 for s in shards)


def test_small_files_are_packed_and_bad_files_are_problems_not_pieces(tmp_path):
    files = {}
    for i in range(10):
        f = corpus_file(tmp_path / f"s{i}.parquet", rows=30, row_group_size=30)
        files[f.name] = str(f)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    wrong = corpus_file(tmp_path / "wrong.parquet", rows=5, row_group_size=5, text_type=pa.int64())
    files.update({"bad.parquet": str(bad), "wrong.parquet": str(wrong)})
    shards, problems = plan_files(dict(sorted(files.items())), "text", 100, "00000")
    assert "not readable Parquet" in problems["bad.parquet"]
    assert "is int64" in problems["wrong.parquet"]
    for s in shards:
        assert s.rows <= 100
    assert len(shards) < 10
    assert sorted(p.key for s in shards for p in s.pieces) == [f"s{i}.parquet" for i in range(10)]
    # a file that failed at run time is packed alone when its shard is planned again
    pieces = [p for s in shards for p in s.pieces]
    alone = pack(pieces, 100, "00001", alone=frozenset({"s4.parquet"}))
    assert [s.keys for s in alone if "s4.parquet" in s.keys] == [("s4.parquet",)]


def test_plan_is_persisted_and_extended_for_new_files(tmp_path):
    corpus, plan_dir = tmp_path / "c", tmp_path / "out" / "_manifest" / "plan"
    for i in range(3):
        corpus_file(corpus / f"day1-{i}.parquet", rows=10, row_group_size=10)
    first = plan_run(plan_dir, resolve_inputs([str(corpus)]), "text", 20)
    assert [len(s.pieces) for s in first] == [2, 1]
    # a new file sorting *before* the others is planned anew; the old shards keep their ids and rows
    corpus_file(corpus / "day0-late.parquet", rows=10, row_group_size=10)
    corpus_file(corpus / "day2-0.parquet", rows=10, row_group_size=10)
    second = plan_run(plan_dir, resolve_inputs([str(corpus)]), "text", 20)
    assert second[: len(first)] == [s for s in second if s.id in {f.id for f in first}]
    assert [(s.id, s.pieces) for s in second[:2]] == [(s.id, s.pieces) for s in first]
    assert [s.id for s in second[2:]] == ["00001-00000"]
    assert {Path(p.key).name for p in second[2].pieces} == {"day0-late.parquet", "day2-0.parquet"}
    assert read_plan(plan_dir) == [type(s)(s.id, s.pieces) for s in second]
    # planning again changes nothing
    assert plan_run(plan_dir, resolve_inputs([str(corpus)]), "text", 20) == second


def test_concurrent_planners_agree(tmp_path):
    corpus, plan_dir = tmp_path / "c", tmp_path / "out" / "_manifest" / "plan"
    for i in range(120):
        corpus_file(corpus / f"f{i:03d}.parquet", rows=10, row_group_size=10)
    files = resolve_inputs([str(corpus)])
    results = [None] * 8

    def plan(k):
        time.sleep(0.004 * k)  # staggered, so a planner can start after another has finished
        results[k] = plan_run(plan_dir, files, "text", 25)

    threads = [threading.Thread(target=plan, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == results[0] for r in results)
    assert len(list(plan_dir.glob("*.json"))) == 1
    assert sorted(p.key for s in results[0] for p in s.pieces) == sorted(files)


def test_length_sorted_batches():
    lengths = [3, 10, 1, 10, 5, 2]
    batches = length_sorted_batches(lengths, batch_size=2)
    assert batches == [[1, 3], [4, 0], [5, 2]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))


def test_token_budget_counts_padding():
    lengths = [100, 10, 10, 10, 10]
    batches = length_sorted_batches(lengths, batch_size=64, max_tokens=40)
    assert batches[0] == [0]  # one row over budget still gets a batch
    for b in batches[1:]:
        assert max(lengths[i] for i in b) * len(b) <= 40


def test_encoder_batches_default_to_a_token_budget_per_device():
    from fastserve.pipeline.config import TaskConfig
    from fastserve.pipeline.tasks.encoding import batch_limits

    assert batch_limits(TaskConfig(), "cpu") == (256, 2048)
    assert batch_limits(TaskConfig(), "cuda:0") == (256, 16384)
    assert batch_limits(TaskConfig(batch_size=8, max_tokens=0), "cpu") == (8, 0)  # 0: no budget
    # unset, the budget decides: short rows fill big batches, long rows small ones
    lengths = [8] * 300 + [200] * 40
    rows, tokens = batch_limits(TaskConfig(), "cpu")
    batches = length_sorted_batches(lengths, rows, tokens)
    assert {len(b) for b in batches if lengths[b[0]] == 200} == {10}
    assert max(len(b) for b in batches if lengths[b[0]] == 8) == 256
