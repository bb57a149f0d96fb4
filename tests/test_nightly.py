"""The nightly routine against the run folder: reruns that name only new files, files rewritten or
fixed between runs, retrained models, array tasks side by side, hostile inputs and a full disk.
Each test is one way a folder could lose, duplicate or mix rows and still exit 0."""

import json
import os
import resource
import shutil
import signal
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastserve.pipeline.testing import infer_args, sample_texts, write_corpus
from fastserve.pipeline.testing.models import build_classifier

from conftest import read_sorted, run_cli, start_cli, wait_for


def infer(model, out, *inputs, extra=(), dask=False, **kw):
    """`fastserve infer`: in its own process (--executor serial: the same run_shard, no cluster
    start per command), as these tests are about the run folder; `dask`: on a LocalCluster."""
    serial = () if dask else ("--executor", "serial")
    return run_cli(*infer_args(model, out, *inputs, extra=(*serial, *extra)), **kw)


def write(path, ids, texts, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())}),
        path,
        **kw,
    )
    return path


def assert_accounted(out, n_in):
    """Each id once; rows in = rows written + rows rejected."""
    written = read_sorted(out)
    ids = written.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id was written twice"
    rejected = read_sorted(out / "_rejected") if (out / "_rejected").is_dir() else pa.table({})
    assert written.num_rows + rejected.num_rows == n_in
    return written, rejected


def assert_same_results(out, ref):
    """The same rows and labels; scores to float tolerance (batches pad differently)."""
    got, want = read_sorted(out), read_sorted(ref)
    assert got.select(["id", "label", "truncated"]).equals(
        want.select(["id", "label", "truncated"])
    )
    for g, w in zip(got.column("score").to_pylist(), want.column("score").to_pylist(), strict=True):
        assert g == pytest.approx(w, abs=1e-5)


def reasons(rejected) -> dict:
    if not rejected.num_rows:
        return {}
    return dict(
        zip(rejected.column("id").to_pylist(), rejected.column("reason").to_pylist(), strict=True)
    )


def corrupt_text_pages(path):
    """Overwrite the text column's pages (the footer stays whole: planning reads it fine)."""
    data = bytearray(path.read_bytes())
    meta = pq.read_metadata(path)
    col = meta.schema.to_arrow_schema().get_field_index("text")
    cc = meta.row_group(0).column(col)
    start = cc.dictionary_page_offset or cc.data_page_offset
    data[start : start + cc.total_compressed_size] = b"\xab" * cc.total_compressed_size
    path.write_bytes(bytes(data))


# -- 1: reruns that name only the new files; array tasks -------------------------------------


def test_a_rerun_naming_only_new_files_never_writes_an_id_twice(tmp_path, classifier):
    c, out = tmp_path / "c", tmp_path / "out"
    files = write_corpus(c, n_files=3, rows=20)
    infer(classifier, out, *files, check=True)
    # tonight's file repeats 5 ids written from f0 and adds 15 new ones
    f3 = write(c / "f3.parquet", [f"doc-0-{i}" for i in range(5)] + [f"new-{i}" for i in range(15)],
               sample_texts(20, seed=7))  # fmt: skip
    proc = infer(classifier, out, f3, check=True)
    assert "1 to do" in proc.stderr
    _, rejected = assert_accounted(out, 80)
    assert reasons(rejected) == {f"doc-0-{i}": "duplicate_id" for i in range(5)}
    assert "complete (_SUCCESS)" in run_cli("status", out, check=True).stdout


def test_array_tasks_judge_duplicates_over_every_pending_shard(tmp_path, classifier):
    c, out = tmp_path / "c", tmp_path / "out"
    # file k repeats 3 ids of file k-1: with one shard per file, neighbours often have two owners
    for k in range(6):
        ids = [f"f{k}-{i}" for i in range(10)] + ([f"f{k - 1}-{i}" for i in range(3)] if k else [])
        write(c / f"f{k}.parquet", ids, sample_texts(len(ids), seed=k))
    owner = [zlib.crc32(f"00000-{k:05d}".encode()) % 2 for k in range(6)]
    assert any(a != b for a, b in zip(owner, owner[1:], strict=False))  # the test's premise
    procs = [
        start_cli(
            *infer_args(classifier, out, c, extra=["--shard-rows", "10"]),
            env={
                "SLURM_ARRAY_TASK_ID": str(k),
                "SLURM_ARRAY_TASK_COUNT": "2",
                "SLURM_ARRAY_TASK_MIN": "0",
            },
        )  # fmt: skip
        for k in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    _, rejected = assert_accounted(out, 6 * 10 + 5 * 3)
    assert set(reasons(rejected).values()) == {"duplicate_id"} and rejected.num_rows == 15
    assert (out / "_SUCCESS").exists()
    entries = [json.loads(p.read_text()) for p in (out / "_manifest" / "runs").glob("*.json")]
    assert sorted(e["share"] for e in entries) == [[0, 2], [1, 2]]  # one history file per run


# -- 2: a retrained model of the same size ----------------------------------------------------


def test_model_identity_is_the_bytes_of_every_file_even_big_ones(tmp_path, monkeypatch):
    from fastserve.pipeline.fingerprint import model_identity

    monkeypatch.setenv("FASTSERVE_HOME", str(tmp_path / "home"))
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text("{}")
    weights = m / "model.safetensors"
    weights.write_bytes(os.urandom(17 << 20))  # over the old 16 MiB "hash by size" limit
    v1 = model_identity(str(m))
    assert model_identity(str(m)) == v1  # and now from the cache
    assert (tmp_path / "home" / "cache" / "file-hashes.json").exists()
    st = weights.stat()
    weights.write_bytes(os.urandom(17 << 20))  # retrained: same size...
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # ...even the same mtime
    assert weights.stat().st_size == st.st_size
    assert model_identity(str(m)) != v1


def test_a_retrained_model_is_refused_not_mixed(tmp_path):
    c, out, model = tmp_path / "c", tmp_path / "out", tmp_path / "model"
    write_corpus(c, n_files=1, rows=10)
    build_classifier(model, seed=0)
    size = (model / "model.safetensors").stat().st_size
    infer(model, out, c, check=True)
    build_classifier(model, seed=1)
    assert (model / "model.safetensors").stat().st_size == size
    write_corpus(c / "day2", n_files=1, rows=10, prefix="day2")
    proc = infer(model, out, c)
    assert proc.returncode == 2 and "model:" in proc.stderr and "--overwrite" in proc.stderr


# -- 3 and 4: files rewritten or fixed between runs ------------------------------------------


def versions(rows):
    """Two versions of one file at the same size: the same ids, each text reversed."""
    texts = sample_texts(rows, seed=3, min_words=3)
    ids = [f"r{i}" for i in range(rows)]
    return ids, texts, [t[::-1] for t in texts]


def test_a_file_rewritten_at_the_same_size_mid_run_is_redone_not_mixed(tmp_path, classifier):
    c, out, ref = tmp_path / "c", tmp_path / "out", tmp_path / "ref"
    ids, a, b = versions(1200)
    same = {"row_group_size": 100, "compression": "none", "write_statistics": ["id"]}
    f = write(c / "a.parquet", ids, a, **same)
    write(tmp_path / "b" / "a.parquet", ids, b, **same)
    assert (tmp_path / "b" / "a.parquet").stat().st_size == f.stat().st_size
    args = infer_args(classifier, out, c, workers=2, extra=["--shard-rows", "100"])
    proc = start_cli(*args)
    wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 2, timeout=120, what="2 shards")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shutil.copyfile(tmp_path / "b" / "a.parquet", f)  # version B, same name, same size
    rerun = run_cli(*args, check=True)
    assert "changed" in rerun.stderr  # the old version's shards were withdrawn, and said so
    run_cli(*args[:6], tmp_path / "b", *args[7:], "--output", ref, check=True)
    assert_same_results(out, ref)  # no row of the old version
    assert (out / "_SUCCESS").exists()


def test_a_file_rewritten_after_a_complete_run_replaces_its_rows(tmp_path, classifier):
    c, out, ref = tmp_path / "c", tmp_path / "out", tmp_path / "ref"
    ids, a, b = versions(30)
    write(c / "a.parquet", ids, a)
    write(c / "z.parquet", ["z0", "z1"], ["fine", "good"])
    infer(classifier, out, c, check=True)
    write(c / "a.parquet", ids, b)  # fixed upstream: the same ids, other texts
    proc = infer(classifier, out, c, check=True)
    assert "/a.parquet changed" in proc.stderr
    infer(classifier, ref, c, check=True)
    assert_same_results(out, ref)  # as if the folder had only ever seen b
    assert (out / "_SUCCESS").exists()


def test_a_fixed_bad_file_is_planned_again_and_a_removed_one_is_forgotten(tmp_path, classifier):
    c, out = tmp_path / "c", tmp_path / "out"
    write(c / "a.parquet", ["a0", "a1"], ["good", "fine"])
    (c / "b.parquet").write_text("id,text\nb0,hello\n")  # a CSV with the wrong name
    (c / "d.parquet").write_text("not parquet either")
    first = infer(classifier, out, c)
    assert first.returncode == 1 and "b.parquet is not readable Parquet" in first.stderr
    again = infer(classifier, out, c)  # unfixed: the same report, nothing redone
    assert again.returncode == 1 and "b.parquet is not readable Parquet" in again.stderr
    write(c / "b.parquet", ["b0"], ["hello"])  # fixed
    (c / "d.parquet").unlink()  # and removed
    fixed = infer(classifier, out, c)
    assert fixed.returncode == 0, fixed.stderr
    assert_accounted(out, 3)
    assert (out / "_SUCCESS").exists()


# -- 5: one unreadable file among packed neighbours --------------------------------------------


def test_an_unreadable_file_fails_alone_and_its_neighbours_complete(tmp_path, classifier):
    c, out = tmp_path / "c", tmp_path / "out"
    for name in "abcd":
        write(
            c / f"{name}.parquet", [f"{name}{i}" for i in range(5)], sample_texts(5, seed=ord(name))
        )
    corrupt_text_pages(c / "b.parquet")  # found only at run time: the footer is fine
    first = infer(classifier, out, c, extra=["--shard-rows", "100"])  # all four in one shard
    assert first.returncode == 1 and "Traceback" not in first.stderr
    assert "b.parquet could not be read" in first.stderr
    written, _ = assert_accounted(out, 15)
    assert {i[0] for i in written.column("id").to_pylist()} == set("acd")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    again = infer(classifier, out, c, extra=["--shard-rows", "100"])
    assert again.returncode == 1  # b alone fails again; the others are not redone
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == before
    write(c / "b.parquet", [f"b{i}" for i in range(5)], sample_texts(5, seed=1))  # fixed
    infer(classifier, out, c, extra=["--shard-rows", "100"], check=True)
    assert_accounted(out, 20)


def test_text_that_is_not_utf8_is_rejected_by_row(tmp_path, classifier):
    c, out = tmp_path / "c", tmp_path / "out"
    data, offsets = b"goodokay\xff\xfebad", pa.array([0, 4, 8, 13], pa.int32()).buffers()[1]
    texts = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(data)])
    c.mkdir()
    pq.write_table(pa.table({"id": ["u0", "u1", "u2"], "text": texts}), c / "u.parquet")
    infer(classifier, out, c, check=True)
    _, rejected = assert_accounted(out, 3)
    assert reasons(rejected) == {"u2": "invalid_text"}


# -- 6, 7, 9: checked on the client before any worker starts ------------------------------------


def test_a_kept_column_named_like_an_output_column_is_refused(tmp_path, classifier):
    write_corpus(tmp_path / "c", n_files=1, rows=5)
    proc = infer(classifier, tmp_path / "out", tmp_path / "c", extra=["--keep-column", "id"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'id' is also an output column" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_unreadable_output_fails_the_duplicate_check_loudly(tmp_path, classifier):
    c, out = tmp_path / "c", tmp_path / "out"
    write_corpus(c, n_files=1, rows=10)
    infer(classifier, out, c, check=True)
    (part,) = out.glob("part-*.parquet")
    part.write_bytes(part.read_bytes()[:50])  # damaged
    write_corpus(c / "day2", n_files=1, rows=10, prefix="day2")
    proc = infer(classifier, out, c)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"cannot read the ids of {part}" in proc.stderr and "delete it" in proc.stderr
    part.unlink()  # as the message says: the shard is done again
    infer(classifier, out, c, check=True)
    assert_accounted(out, 20)


def test_a_model_folder_without_tokenizer_files_is_refused(tmp_path, classifier):
    model = tmp_path / "model"
    shutil.copytree(classifier, model)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    write_corpus(tmp_path / "c", n_files=1, rows=5)
    proc = infer(model, tmp_path / "out", tmp_path / "c")
    assert proc.returncode == 2 and "has no tokenizer files" in proc.stderr
    (model / "model.safetensors").write_bytes(b"\x00" * 4)  # and with weights that are not
    shutil.copy(classifier / "tokenizer.json", model)
    proc = infer(model, tmp_path / "out", tmp_path / "c")
    assert proc.returncode == 2 and "not readable safetensors" in proc.stderr


def test_an_output_inside_its_input_is_refused(tmp_path, classifier):
    c = tmp_path / "c"
    write_corpus(c, n_files=1, rows=5)
    proc = infer(classifier, c / "out", c)
    assert proc.returncode == 2 and "lies inside input" in proc.stderr
    proc = infer(classifier, tmp_path / "o2", f"{tmp_path}/**/*.parquet")  # output under the glob
    assert proc.returncode == 2 and "lies inside input" in proc.stderr
    infer(classifier, c / "_out", c, check=True)  # a folder the walk skips is fine


# -- 8: symbolic-link loops --------------------------------------------------------------------


def test_symlink_loops_neither_hang_nor_crash(tmp_path, classifier):
    c = tmp_path / "c"
    write_corpus(c / "sub", n_files=1, rows=5)
    (c / "loop").symlink_to(c)  # c/loop/loop/loop/...
    (c / "sub" / "up").symlink_to(c)
    for spec in (c, f"{c}/**/*.parquet"):
        out = tmp_path / f"out{len(str(spec))}"
        infer(classifier, out, spec, check=True, timeout=120)
        assert_accounted(out, 5)
    (c / "self.parquet").symlink_to(c / "self.parquet")
    proc = infer(classifier, tmp_path / "o3", c, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "self.parquet cannot be opened" in proc.stderr


def test_the_glob_walker_matches_what_python_glob_matches(tmp_path):
    import glob

    from fastserve.pipeline.inputs import glob_files

    for rel in ["a.parquet", "x/b.parquet", "x/y/c.parquet", ".h/d.parquet", "x/.e.parquet",
                "_u/f.parquet", "x/y/z/g.txt", "k.parquet.bak"]:  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    for pattern in ["*.parquet", "**/*.parquet", "x/**/*.parquet", "*/*.parquet", "x/*/c.*",
                    "**", "**/y/*", "[ax]*", "x/?/*.parquet", ".h/*"]:  # fmt: skip
        full = f"{tmp_path}/{pattern}"
        want = sorted(m for m in glob.glob(full, recursive=True) if os.path.isfile(m))
        assert sorted(glob_files(full, None)) == want, pattern


def test_planning_gives_way_to_a_stop(tmp_path):
    from fastserve.pipeline.errors import Stopped
    from fastserve.pipeline.inputs import resolve_inputs

    (tmp_path / "a").mkdir()
    with pytest.raises(Stopped):
        resolve_inputs([str(tmp_path)], should_stop=lambda: True)


# -- 10: generate's room for the prompt ---------------------------------------------------------


def test_generate_leaves_room_for_new_tokens_under_max_length(tmp_path):
    from fastserve.pipeline.testing.models import build_gpt2

    model = build_gpt2(tmp_path / "gpt2")  # 128 positions
    write(tmp_path / "c" / "p.parquet", ["p0"], [" ".join(["the movie was great"] * 60)])
    (tmp_path / "job.toml").write_text('[task]\nname = "generate"\nmax_new_tokens = 40\n')
    proc = run_cli("infer", "--config", tmp_path / "job.toml", "--model", model, "--input",
                   tmp_path / "c", "--output", tmp_path / "out", "--workers", "1",
                   "--max-length", "120", check=True)  # fmt: skip
    (row,) = read_sorted(tmp_path / "out").to_pylist()
    assert row["truncated"] and row["prompt_tokens"] == 128 - 40
    assert proc.returncode == 0


# -- 11: a clear message, never a traceback -----------------------------------------------------


def test_run_folder_trouble_is_one_clear_message(tmp_path, classifier):
    c = tmp_path / "c"
    write_corpus(c, n_files=2, rows=5)
    (tmp_path / "file").write_text("")
    proc = infer(classifier, tmp_path / "file", c)
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr
    proc = infer(classifier, tmp_path / "o", c, extra=["--scheduler-address", "tcp://x:1"])
    assert proc.returncode == 2 and "executor 'serial' would not use it" in proc.stderr
    proc = infer(
        classifier, tmp_path / "o", c, extra=["--scheduler-address", "localhost:nope"], dask=True
    )
    assert proc.returncode == 2 and "cannot reach the Dask scheduler" in proc.stderr
    out = tmp_path / "out"
    infer(classifier, out, c, check=True)
    ref = read_sorted(out)
    (rec, *_) = sorted((out / "_manifest" / "shards").glob("*.json"))
    rec.write_text('{"shard": ')  # a damaged record: that shard is done again
    infer(classifier, out, c, check=True)
    assert read_sorted(out).equals(ref)  # the same shard, the same batches: the same bytes
    (out / "_manifest" / "run.json").write_text("{not json")
    proc = infer(classifier, out, c)
    assert proc.returncode == 2 and "run.json is damaged" in proc.stderr
    for p in (proc,):
        assert "Traceback" not in p.stderr


def test_a_full_disk_fails_cleanly_and_a_rerun_finishes(tmp_path, classifier):
    c, out = tmp_path / "c", tmp_path / "out"
    write_corpus(c, n_files=3, rows=200)
    args = infer_args(classifier, out, c, extra=["--shard-rows", "200"])

    def small_files():  # every file this process tree writes stops at 4 KB: a full disk's EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))

    proc = start_cli(*args, preexec_fn=small_files)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "Traceback" not in err
    assert "cannot write" in err and "rerun the same command" in err
    assert not [p for p in out.rglob(".tmp-*")], "temporaries left behind"
    assert list((out / "_manifest" / "runs").glob("*.json")), "the run left no history entry"
    stale = out / ".tmp-part-x.parquet-dead"  # what a writer killed mid-write leaves
    stale.write_bytes(b"half")
    os.utime(stale, (1, 1))
    run_cli(*args, check=True)
    assert_accounted(out, 600)
    assert not stale.exists()  # an hour old: no writer is still at it


# -- 12: a concurrent --overwrite ------------------------------------------------------------------


def test_overwrite_is_refused_while_another_run_uses_the_folder(tmp_path):
    from fastserve.pipeline.testing.models import build_gpt2

    model = build_gpt2(tmp_path / "gpt2")
    c, out = tmp_path / "c", tmp_path / "out"
    write_corpus(c, n_files=12, rows=10)  # a generation job of 12 slow shards
    (tmp_path / "job.toml").write_text(
        '[task]\nname = "generate"\nmax_new_tokens = 48\nbatch_size = 2\n'
        "[input]\nshard_rows = 10\n[cluster]\nworkers = 1\n"
    )
    args = ["infer", "--config", tmp_path / "job.toml", "--model", model, "--input", c,
            "--output", out]  # fmt: skip
    first = start_cli(*args)
    wait_for(lambda: list(out.glob("part-*.parquet")), timeout=120, what="a first shard")
    other = run_cli(*args, "--on-long", "reject", "--overwrite")
    assert other.returncode == 2 and "another FastServe command is using" in other.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert_accounted(out, 120)
    assert (out / "_SUCCESS").exists()


# -- found by trying it as a stranger would ------------------------------------------------------


def test_day_folders_with_the_same_file_names_are_different_files(tmp_path, classifier):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    for day in (1, 2):  # every night's files are named part-000.parquet ... in their own folder
        write_corpus(corpus / f"day-{day}", n_files=2, rows=10, prefix=f"d{day}")
        proc = infer(classifier, out, corpus / f"day-{day}", check=True)
        assert "withdrew" not in proc.stderr
    assert_accounted(out, 40)
    assert read_sorted(out).num_rows == 40  # night 1 kept
    again = infer(classifier, out, corpus, check=True)  # the whole corpus: nothing new
    assert "0 to do" in again.stderr and not (out / "_rejected").exists()


def test_one_file_reached_twice_is_done_once(tmp_path, classifier):
    c, out = tmp_path / "c", tmp_path / "out"
    (c / "day-1").mkdir(parents=True)
    pq.write_table(pa.table({"text": sample_texts(10)}), c / "day-1" / "a.parquet")
    (tmp_path / "link").symlink_to(c)
    infer(classifier, out, c, c / "day-1", tmp_path / "link", check=True)  # no id column
    infer(classifier, out, c / "day-1", check=True)
    assert_accounted(out, 10)
    assert read_sorted(out).num_rows == 10


def test_success_means_the_whole_folder_is_done(tmp_path, classifier):
    c, out = tmp_path / "c", tmp_path / "out"
    a = write(c / "a.parquet", [f"a{i}" for i in range(5)], sample_texts(5))
    b = write(c / "b.parquet", [f"b{i}" for i in range(5)], sample_texts(5, seed=2))
    corrupt_text_pages(a)
    assert infer(classifier, out, a).returncode == 1  # a's shard stays pending
    (out / "_manifest" / "runs" / "0000-killed.json").write_text(
        '{"started": 1, "pid": 1, "host": "h"}'
    )
    proc = infer(classifier, out, b, check=True)  # only b: its inputs are done, the folder is not
    assert "no _SUCCESS" in proc.stderr and not (out / "_SUCCESS").exists()
    status = run_cli("status", out, check=True).stdout
    assert "incomplete" in status and "running" not in status  # the last run, not a dead one
    write(c / "a.parquet", [f"a{i}" for i in range(5)], sample_texts(5))  # fixed
    infer(classifier, out, c, check=True)
    assert (out / "_SUCCESS").exists()
    assert "complete (_SUCCESS)" in run_cli("status", out, check=True).stdout


def test_an_output_a_plain_glob_would_read_is_refused_on_the_first_night(tmp_path, classifier):
    write_corpus(tmp_path / "data" / "day-1", n_files=1, rows=5)
    proc = infer(classifier, tmp_path / "data" / "out", f"{tmp_path}/data/*/*.parquet")
    assert proc.returncode == 2 and "lies inside input" in proc.stderr
    assert not (tmp_path / "data" / "out").exists()


def test_a_config_mistake_found_at_run_time_does_not_hold_the_folder(tmp_path, classifier):
    c, out = tmp_path / "c", tmp_path / "out"
    write_corpus(c, n_files=2, rows=5)
    typo = infer(classifier, out, c, extra=["--keep-column", "lnag"])
    assert typo.returncode == 1 and "fix --keep-column" in typo.stderr
    fixed = infer(classifier, out, c, extra=["--keep-column", "lang"])  # no --overwrite needed:
    assert fixed.returncode == 0, fixed.stderr  # nothing was written under the mistaken config
    assert_accounted(out, 10)


def test_a_model_that_cannot_load_ends_the_run_at_once_with_one_message(tmp_path, classifier):
    model = tmp_path / "model"
    shutil.copytree(classifier, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "hidden_size": 48}))  # weights are 32
    weights = model / "model.safetensors"
    write_corpus(tmp_path / "c", n_files=3, rows=5)
    args = ["--shard-rows", "5"]
    proc = infer(model, tmp_path / "out", tmp_path / "c", extra=args, dask=True)  # in a worker
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot load the checkpoint" in proc.stderr and "input file" not in proc.stderr
    (model / "config.json").write_text(json.dumps(cfg))
    shutil.copyfile(classifier / "model.safetensors", weights)
    infer(model, tmp_path / "out", tmp_path / "c", extra=args, check=True)  # takes the folder over
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated: its header still parses
    proc = infer(model, tmp_path / "o2", tmp_path / "c")
    assert proc.returncode == 2 and "not readable safetensors" in proc.stderr
