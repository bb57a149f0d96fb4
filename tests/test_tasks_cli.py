"""Every task end to end on Dask over Parquet: the real command, real workers, real files."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from fastserve.pipeline import schemas
from fastserve.pipeline.testing import sample_texts, toml_text
from fastserve.pipeline.testing.models import build_bart, build_encoder, build_fastserve_gpt

from conftest import read_sorted, run_cli
from reference import hf_embed, hf_translate


def corpus(folder, n_files=3, rows=20, **columns):
    folder.mkdir(parents=True, exist_ok=True)
    texts = sample_texts(n_files * rows, seed=21, max_words=12)
    for f in range(n_files):
        part = {"id": [f"d{f}-{i}" for i in range(rows)], "text": texts[f * rows : (f + 1) * rows]}
        part.update({k: v[f * rows : (f + 1) * rows] for k, v in columns.items()})
        pq.write_table(pa.table(part), folder / f"{f}.parquet", row_group_size=10)
    return texts


def infer(task, model, c, out, *extra, check=True):
    return run_cli(
        "infer",
        "--task",
        task,
        "--model",
        model,
        "--input",
        c,
        "--output",
        out,
        *extra,
        check=check,
    )


def assert_declared_schema(out, task, **sizes):
    declared = schemas.load(task).sized(**sizes).arrow
    for part in out.glob("part-*.parquet"):
        schema = pq.read_schema(part)
        assert schema.names == declared.names
        assert [f.type for f in schema] == [f.type for f in declared]


def test_generate_on_a_fastserve_checkpoint_is_the_same_for_any_workers_and_shards(tmp_path):
    ckpt = build_fastserve_gpt(tmp_path / "gpt")
    c = tmp_path / "c"
    corpus(c, n=pa.array([(i % 6) * 3 for i in range(60)], pa.int64()).to_pylist())
    job = tmp_path / "job.toml"
    job.write_text(
        '[task]\nname = "generate"\nmax_new_tokens_column = "n"\ndo_sample = true\n'
        "temperature = 0.8\ntop_p = 0.95\nseed = 3\n"
    )
    infer(
        "generate",
        ckpt,
        c,
        tmp_path / "a",
        "--config",
        job,
        "--workers",
        "1",
        "--shard-rows",
        "60",
        "--batch-size",
        "64",
    )
    infer(
        "generate",
        ckpt,
        c,
        tmp_path / "b",
        "--config",
        job,
        "--workers",
        "2",
        "--shard-rows",
        "10",
        "--batch-size",
        "3",
    )
    a, b = read_sorted(tmp_path / "a"), read_sorted(tmp_path / "b")
    assert a.num_rows == 60 and a.equals(b)
    assert_declared_schema(tmp_path / "a", "generate")
    lengths = dict(
        zip(a.column("id").to_pylist(), a.column("generated_tokens").to_pylist(), strict=True)
    )
    assert all(lengths[f"d{f}-{i}"] <= ((f * 20 + i) % 6) * 3 for f in range(3) for i in range(20))
    assert set(a.column("finish_reason").to_pylist()) <= {"length", "eos"}


def test_translate_end_to_end_equals_the_reference(tmp_path):
    bart = build_bart(tmp_path / "bart")
    c = tmp_path / "c"
    texts = corpus(c)
    infer(
        "translate",
        bart,
        c,
        tmp_path / "out",
        "--workers",
        "2",
        "--config",
        _task_file(tmp_path, num_beams=2, max_new_tokens=10),
    )
    got = read_sorted(tmp_path / "out")
    assert_declared_schema(tmp_path / "out", "translate")
    order = sorted(range(60), key=lambda k: f"d{k // 20}-{k % 20}")
    ref = hf_translate(bart, [texts[k] for k in order], num_beams=2, max_new_tokens=10)
    tok = AutoTokenizer.from_pretrained(bart)
    assert got.column("translation").to_pylist() == tok.batch_decode(ref, skip_special_tokens=True)


def test_embed_end_to_end_equals_the_reference(tmp_path):
    import numpy as np

    enc = build_encoder(tmp_path / "enc")
    c = tmp_path / "c"
    texts = corpus(c)
    infer(
        "embed",
        enc,
        c,
        tmp_path / "out",
        "--workers",
        "2",
        "--config",
        _task_file(tmp_path, normalize=True),
    )
    got = read_sorted(tmp_path / "out")
    assert_declared_schema(tmp_path / "out", "embed", embedding=32)
    assert got.schema.field("embedding").type == pa.list_(pa.float32(), 32)  # fixed-size
    order = sorted(range(60), key=lambda k: f"d{k // 20}-{k % 20}")
    ref = hf_embed(enc, [texts[k] for k in order], "mean", True)
    np.testing.assert_allclose(
        np.array(got.column("embedding").to_pylist()), np.array(ref), atol=1e-5
    )


def test_a_folder_started_with_an_earlier_schema_version_keeps_it(tmp_path):
    """output.schema = 1 writes embed.v1 (list<float32>); a rerun that names no version, with a
    new input file, writes v1 too (one folder, one schema); its vectors are v2's; asking for v2
    there is refused, an unknown version is a config error."""
    import numpy as np
    import pyarrow.dataset as ds

    enc = build_encoder(tmp_path / "enc")
    c = tmp_path / "c"
    corpus(c, n_files=2, rows=10)
    old, new = tmp_path / "old", tmp_path / "new"
    serial = ("--executor", "serial")
    infer("embed", enc, c, old, *serial, "--output-schema", "1")
    extra = sample_texts(5, seed=99, max_words=8)
    pq.write_table(pa.table({"id": [f"x{i}" for i in range(5)], "text": extra}), c / "x.parquet")
    infer("embed", enc, c, old, *serial)  # nightly: the same command, no version named
    infer("embed", enc, c, new, *serial)
    parts = sorted(old.glob("part-*.parquet"))
    assert len(parts) == 2  # the first run's shard and the new file's
    for part in parts:
        s = pq.read_schema(part)
        assert s.metadata[b"fastserve.schema"] == b"embed.v1"
        assert s.field("embedding").type == pa.list_(pa.float32())
    assert pq.read_schema(next(new.glob("part-*.parquet"))).metadata[b"fastserve.schema"] == (
        b"embed.v2"
    )
    a, b = read_sorted(old), read_sorted(new)
    assert a.column("id").to_pylist() == b.column("id").to_pylist() and a.num_rows == 25
    np.testing.assert_array_equal(
        np.array(a.column("embedding").to_pylist()), np.array(b.column("embedding").to_pylist())
    )
    assert ds.dataset(old).to_table().num_rows == 25  # the folder reads as one dataset
    proc = infer("embed", enc, c, old, *serial, "--output-schema", "2", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "schema: 'embed.v1' -> 'embed.v2'" in proc.stderr
    proc = infer("embed", enc, c, old, *serial, "--output-schema", "7", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "output.schema is 7; task embed writes embed.v1, embed.v2" in proc.stderr


def test_a_missing_per_row_column_is_a_clear_error(tmp_path):
    ckpt = build_fastserve_gpt(tmp_path / "gpt")
    c = tmp_path / "c"
    corpus(c, n_files=1)
    proc = infer(
        "generate",
        ckpt,
        c,
        tmp_path / "out",
        "--config",
        _task_file(tmp_path, max_new_tokens_column="limit"),
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        "lacks the column(s) limit" in proc.stderr and "task.max_new_tokens_column" in proc.stderr
    )


@pytest.mark.parametrize("task", ["generate", "translate", "embed"])
def test_a_model_of_the_wrong_kind_is_a_clear_error(tmp_path, classifier, task):
    c = tmp_path / "c"
    corpus(c, n_files=1)
    proc = infer(
        task,
        classifier if task != "embed" else build_bart(tmp_path / "b"),
        c,
        tmp_path / "o",
        check=False,
    )
    assert (
        proc.returncode == 2 and "Traceback" not in proc.stderr and "the task needs" in proc.stderr
    )


def _task_file(tmp_path, **task):
    p = tmp_path / "task.toml"
    p.write_text(toml_text({"task": task}))
    return p
