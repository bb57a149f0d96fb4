"""`fastserve infer` end to end: the real command, a real Dask cluster, real Parquet."""

import itertools
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastserve.pipeline import schemas
from fastserve.pipeline.manifest import RunDir
from fastserve.pipeline.testing import infer_args, write_corpus

from conftest import run_cli
from reference import pipeline_sentiment


def output_by_id(out) -> dict[str, dict]:
    rows = pq.read_table(out, schema=None).to_pylist()
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows), "duplicate ids in the output"
    return by_id


def test_sentiment_over_a_folder_equals_the_reference(tmp_path, classifier):
    files = write_corpus(tmp_path / "corpus", n_files=3, rows=40)
    out = tmp_path / "out"
    proc = run_cli(
        *infer_args(classifier, out, tmp_path / "corpus", workers=2),
        "--batch-size",
        "8",
        "--keep-column",
        "lang",
        "--shard-rows",
        "40",
        check=True,
    )
    assert "rows in 120 = out 120 + rejected 0" in proc.stdout
    assert (out / "_SUCCESS").exists()

    declared = schemas.load("sentiment").arrow
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 3  # one output file per input file of shard_rows rows
    for part in parts:
        result = pq.read_table(part)
        assert result.schema.names == [*declared.names, "lang"]
        assert result.schema.field("probabilities").type == declared.field("probabilities").type
        assert result.schema.field("label").type == pa.string()
    by_id = output_by_id(out)
    for f in files:
        source = pq.read_table(f)
        ref = pipeline_sentiment(classifier, source.column("text").to_pylist())
        got = [by_id[i] for i in source.column("id").to_pylist()]
        assert [g["label"] for g in got] == [r[0] for r in ref]
        assert [g["score"] for g in got] == pytest.approx([r[1] for r in ref], abs=1e-5)
        assert [g["lang"] for g in got] == ["en"] * 40
    records = [json.loads(p.read_text()) for p in (out / "_manifest" / "shards").glob("*.json")]
    assert sorted(r["source"] for r in records) == [os.path.realpath(f) for f in files]
    assert all(r["rows_in"] == 40 == r["rows_out"] and r["rows_rejected"] == 0 for r in records)


def test_job_file_and_generated_ids(tmp_path, classifier):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"body": ["good", "bad", "fine"]}), corpus / "a.parquet")
    job = tmp_path / "job.toml"
    job.write_text(
        f'[input]\npaths = ["corpus"]\ntext_column = "body"\n[model]\npath = "{classifier}"\n'
        '[task]\nname = "sentiment"\n[output]\npath = "out"\n[cluster]\nworkers = 1\n'
    )
    run_cli("infer", "--config", job, check=True)
    result = pq.read_table(tmp_path / "out")
    key = os.path.realpath(corpus / "a.parquet")  # the file's real path: unique in any folder
    assert result.column("id").to_pylist() == [f"{key}:0", f"{key}:1", f"{key}:2"]


def test_integer_ids_are_written_as_strings(tmp_path, classifier):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"id": [7, 8], "text": ["good", "bad"]}), corpus / "a.parquet")
    run_cli(
        *infer_args(classifier, tmp_path / "out", corpus),
        check=True,
    )
    assert pq.read_table(tmp_path / "out").column("id").to_pylist() == ["7", "8"]


def test_running_scheduler_is_used(tmp_path, classifier):
    from distributed import Client, LocalCluster

    write_corpus(tmp_path / "corpus", n_files=2, rows=10)
    with LocalCluster(
        n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        with Client(cluster) as client:
            run_cli(
                *infer_args(classifier, tmp_path / "out", tmp_path / "corpus"),
                "--scheduler-address",
                cluster.scheduler_address,
                check=True,
            )
            # the shards ran on that cluster's worker
            assert (
                client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.task_prefixes))
                >= 1
            )
    assert (tmp_path / "out" / "_SUCCESS").exists()


# -- clear errors: one message naming the file/column, non-zero exit, no traceback ----------------


def assert_clear_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert str(n) in proc.stderr, proc.stderr


def infer(tmp_path, classifier, corpus, **extra):
    args = [
        *infer_args(extra.pop("model", classifier), tmp_path / "out", corpus),
    ]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", v]
    return run_cli(*args)


def test_next_shard_is_read_while_the_model_runs_one_shard_at_a_time(tmp_path, classifier):
    """A worker reads (and writes) one shard while another is in the model, but never runs the
    model on two at once: per-shard read/wait/model times from the records, on 1 worker."""
    write_corpus(tmp_path / "corpus", n_files=6, rows=60)
    proc = infer(tmp_path, classifier, tmp_path / "corpus", batch_size=1, shard_rows=60)
    assert proc.returncode == 0, proc.stderr
    spans = []  # (model start, model end, read end) per shard, on one clock
    for r in RunDir.at(tmp_path / "out").records().values():
        s = r["seconds"]
        begin = r["started"] + s["read"] + s["wait"] + s["load"]
        spans.append((begin, begin + s["model"], r["started"] + s["read"]))
    spans.sort()
    assert len(spans) == 6
    for (_, end, _), (begin, _, _) in itertools.pairwise(spans):
        assert begin >= end - 0.01, "two shards were in the model at once"
    # every later shard had been read before the one ahead of it left the model
    read_ahead = [nxt[2] < cur[1] for cur, nxt in itertools.pairwise(spans)]
    assert sum(read_ahead) >= 4, spans
    # start-up: the worker started and loaded the model while the client planned, so no shard
    # paid the load itself; the run says where its start-up went, and status shows it
    run = RunDir.at(tmp_path / "out")
    records = list(run.records().values())
    assert max(r["seconds"]["load"] for r in records) < 0.5, [r["seconds"] for r in records]
    entry = [e for e in run.run_entries() if "finished" in e][-1]
    st = entry["startup"]
    assert 0 < st["config"] < st["planned"] and st["config"] < st["cluster"] and st["load"] > 0
    assert st["first_batch"] >= max(st["planned"], st["cluster"])
    first = min(r["model_started"] for r in records)  # on the run's clock: from its start
    assert abs((first - entry["started"]) - (st["first_batch"] - st["config"])) < 0.01
    shown = run_cli("status", tmp_path / "out").stdout
    assert f"start-up     {st['first_batch']:.1f}s from the command to the first batch" in shown


@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_dask_started_by_dask_mpi_over_mpiexec_ranks(tmp_path, classifier):
    import subprocess
    import sys
    from pathlib import Path

    from conftest import FASTSERVE, read_sorted

    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("mpiexec (the mpich wheel) is not installed")
    write_corpus(tmp_path / "corpus", n_files=3, rows=20)
    args = ["infer", "--task", "sentiment", "--model", str(classifier)]
    args += ["--input", str(tmp_path / "corpus"), "--shard-rows", "20"]
    proc = subprocess.run(
        [str(mpiexec), "-n", "3", *FASTSERVE, *args, "--output", str(tmp_path / "mpi")]
        + ["--executor", "mpi"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert "complete: 3/3 shards" in proc.stdout + proc.stderr
    run_cli(*args, "--output", tmp_path / "local", "--workers", "1", check=True)
    assert read_sorted(tmp_path / "mpi").equals(read_sorted(tmp_path / "local"))


def test_text_column_of_the_wrong_type(tmp_path, classifier):
    write_corpus(tmp_path / "c", 1, 5)
    pq.write_table(pa.table({"id": ["x"], "text": [3]}), tmp_path / "c" / "bad.parquet")
    proc = infer(tmp_path, classifier, tmp_path / "c")
    assert_clear_error(proc, "column 'text' is int64", "bad.parquet", "expected string")
    # the good file was still processed, and the run says it is incomplete
    assert pq.read_table(tmp_path / "out").num_rows == 5
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_missing_text_column(tmp_path, classifier):
    (tmp_path / "c").mkdir()
    pq.write_table(pa.table({"id": ["x"], "body": ["hi"]}), tmp_path / "c" / "a.parquet")
    assert_clear_error(
        infer(tmp_path, classifier, tmp_path / "c"),
        "has no column 'text'",
        "a.parquet",
        "--text-column",
    )


def test_unreadable_file(tmp_path, classifier):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.parquet").write_bytes(b"this is not parquet at all")
    assert_clear_error(
        infer(tmp_path, classifier, tmp_path / "c"), "a.parquet", "not readable Parquet"
    )


def test_missing_model_folder(tmp_path, classifier):
    write_corpus(tmp_path / "c", 1, 5)
    proc = infer(tmp_path, classifier, tmp_path / "c", model=tmp_path / "nope")
    assert_clear_error(proc, "model folder", "nope", "does not exist")
    assert proc.returncode == 2


def test_model_of_the_wrong_kind(tmp_path, classifier):
    import shutil

    write_corpus(tmp_path / "c", 1, 5)
    wrong = tmp_path / "lm"
    shutil.copytree(classifier, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (wrong / "config.json").write_text(json.dumps(cfg))
    assert_clear_error(
        infer(tmp_path, classifier, tmp_path / "c", model=wrong),
        "BertForMaskedLM",
        "ForSequenceClassification",
    )


def test_config_error_from_the_command_line(tmp_path, classifier):
    write_corpus(tmp_path / "c", 1, 5)
    assert_clear_error(
        infer(tmp_path, classifier, tmp_path / "c", batch_size=0), "task.batch_size must be > 0"
    )
    job = tmp_path / "job.toml"
    job.write_text("[task]\nbatchsize = 3\n")
    assert_clear_error(
        run_cli("infer", "--config", job), "unknown key 'task.batchsize'", "task.batch_size"
    )


def test_version_and_help():
    assert run_cli("--version", check=True).stdout.startswith("fastserve, version ")
    assert "infer" in run_cli("--help", check=True).stdout
