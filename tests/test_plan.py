import pytest

from pipeline.batching import length_sorted_batches
from pipeline.errors import InputError
from pipeline.plan import plan_shards


def touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    return p


def test_folders_files_and_globs(tmp_path):
    a = touch(tmp_path / "c" / "a.parquet")
    touch(tmp_path / "c" / "sub" / "b.parquet")
    touch(tmp_path / "c" / "_skip.parquet")
    touch(tmp_path / "c" / "notes.txt")
    touch(tmp_path / "d" / "x.parquet")
    shards = plan_shards([str(tmp_path / "c"), str(tmp_path / "d" / "*.parquet")])
    assert [s.key for s in shards] == ["a.parquet", "sub/b.parquet", "x.parquet"]
    assert [s.id for s in shards] == ["a", "sub__b", "x"]
    assert shards[0].path == str(a)
    # adding a file does not rename the others' shards (incremental runs rely on it)
    touch(tmp_path / "c" / "0first.parquet")
    again = plan_shards([str(tmp_path / "c"), str(tmp_path / "d" / "*.parquet")])
    assert {s.id for s in shards} < {s.id for s in again}


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        plan_shards([str(tmp_path / "nope")])
    with pytest.raises(InputError, match="matches no file"):
        plan_shards([str(tmp_path / "*.parquet")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no"):
        plan_shards([str(tmp_path / "empty")])


def test_name_clash_between_inputs(tmp_path):
    touch(tmp_path / "a" / "x.parquet")
    touch(tmp_path / "b" / "x.parquet")
    with pytest.raises(InputError, match="share the name"):
        plan_shards([str(tmp_path / "a"), str(tmp_path / "b")])


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
