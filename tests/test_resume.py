"""Invariants 2 and 3: exactly once across kills and reruns; one config per run folder."""

import json
import os
import signal
import stat

import psutil
import pytest

from fastserve.pipeline.testing import infer_args, write_corpus

from conftest import read_sorted, run_cli, start_cli, wait_for


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    c = tmp_path_factory.mktemp("corpus")
    write_corpus(c, n_files=6, rows=300)
    return c


def resume_args(model, corpus, out, *extra):
    return infer_args(model, out, corpus, workers=2, extra=["--shard-rows", "150", *extra])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus, classifier):
    out = tmp_path_factory.mktemp("ref") / "out"
    run_cli(*resume_args(classifier, corpus, out), check=True)
    return out


def records(out):
    return (
        list((out / "_manifest" / "shards").glob("*.json"))
        if (out / "_manifest" / "shards").is_dir()
        else []
    )


def assert_same_output(out, ref):
    got, want = read_sorted(out), read_sorted(ref)
    ids = got.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate ids"
    assert got.equals(want), "output differs from the uninterrupted run"
    assert (out / "_SUCCESS").exists()


def kill_tree(proc) -> list[psutil.Process]:
    """SIGKILL the command alone (as a node failure or OOM killer would); return its descendants."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return tree


def assert_no_workers_remain(tree):
    _, alive = psutil.wait_procs(tree, timeout=45)
    assert not alive, f"processes outlived their run: {[p.pid for p in alive]}"


@pytest.mark.parametrize("when", ["before_output", "mid_way", "before_success"])
def test_sigkill_then_rerun_equals_an_uninterrupted_run(
    tmp_path, corpus, classifier, uninterrupted, when
):
    out = tmp_path / "out"
    args = resume_args(classifier, corpus, out)
    if when == "before_success":
        # Everything written but the marker: the state a kill after the last record leaves.
        run_cli(*args, check=True)
        (out / "_SUCCESS").unlink()
    else:
        proc = start_cli(*args)
        if when == "before_output":
            wait_for(lambda: (out / "_manifest" / "run.json").exists(), what="the run folder")
        else:
            wait_for(lambda: len(records(out)) >= 2, what="two shards complete")
        tree = kill_tree(proc)
        assert not (out / "_SUCCESS").exists()
        assert_no_workers_remain(tree)
        if when == "mid_way":
            assert 2 <= len(records(out)) < 12
    rerun = run_cli(*args, check=True)
    assert "already complete" in rerun.stderr
    assert_same_output(out, uninterrupted)


def test_worker_killed_mid_shard_is_retried_and_written_once(tmp_path, classifier):
    from distributed import Client, LocalCluster

    c = tmp_path / "c"
    write_corpus(c, n_files=4, rows=2000)
    out = tmp_path / "out"
    with LocalCluster(
        n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        with Client(cluster) as client:
            proc = start_cli(
                *infer_args(classifier, out, c, extra=["--shard-rows", "2000"]),
                "--scheduler-address",
                cluster.scheduler_address,
            )

            def busy_worker():
                for addr, keys in client.processing().items():
                    if any(str(k).startswith("shard-") for k in keys):
                        return addr

            addr = wait_for(busy_worker, timeout=120, what="a worker processing a shard")
            pid = client.run(os.getpid, workers=[addr])[addr]
            os.kill(pid, signal.SIGKILL)
            stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    t = read_sorted(out)
    ids = t.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 8000
    assert len(records(out)) == 4


def test_sigterm_drains_and_exits_resumable(tmp_path, corpus, classifier, uninterrupted):
    out = tmp_path / "out"
    args = resume_args(classifier, corpus, out)
    proc = start_cli(*args)
    wait_for(lambda: len(records(out)) >= 1, what="a shard complete")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "rerun the same command" in stderr and "Traceback" not in stderr
    assert not (out / "_SUCCESS").exists()
    status = run_cli("status", out, check=True).stdout
    assert "incomplete" in status
    run_cli(*args, check=True)
    assert_same_output(out, uninterrupted)
    assert "complete (_SUCCESS)" in run_cli("status", out, check=True).stdout


def test_other_config_is_refused_unless_overwrite(tmp_path, corpus, classifier, uninterrupted):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    proc = run_cli(*resume_args(classifier, corpus, out, "--on-long", "reject"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "task.on_long: 'truncate' -> 'reject'" in proc.stderr and "--overwrite" in proc.stderr
    run_cli(*resume_args(classifier, corpus, out, "--on-long", "reject", "--overwrite"), check=True)
    run = json.loads((out / "_manifest" / "run.json").read_text())
    assert run["fingerprint"]["fields"]["task.on_long"] == "reject"
    assert len(list((out / "_manifest" / "runs").glob("*.json"))) == 1  # started afresh
    # batch size and worker count are not part of the fingerprint: a rerun with them resumes
    again = run_cli(
        *resume_args(classifier, corpus, out, "--on-long", "reject", "--batch-size", "3"),
        check=True,
    )
    assert "12 already complete, 0 to do" in again.stderr


def test_new_input_files_are_picked_up_incrementally(tmp_path, classifier):
    c = tmp_path / "c"
    write_corpus(c, n_files=2, rows=50)
    out = tmp_path / "out"
    args = infer_args(classifier, out, c)
    run_cli(*args, check=True)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    write_corpus(c / "day2", n_files=1, rows=50, seed=100, prefix="day2")  # day2/part-000.parquet
    proc = run_cli(*args, check=True)
    assert "1 already complete, 1 to do" in proc.stderr
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert {k: after[k] for k in before} == before  # finished shards were not redone
    assert len(after) == 2 and read_sorted(out).num_rows == 150
    assert (out / "_SUCCESS").exists()
    # a later file that repeats ids written by an earlier run: rejected, not written twice
    write_corpus(c / "day3", n_files=1, rows=50, prefix="day2")
    run_cli(*args, check=True)
    assert read_sorted(out).num_rows == 150
    rejected = read_sorted(out / "_rejected")
    assert (
        set(rejected.column("reason").to_pylist()) == {"duplicate_id"} and rejected.num_rows == 50
    )
    assert "written earlier into this folder" in rejected.column("detail")[0].as_py()


def test_output_files_follow_the_umask(tmp_path, classifier):
    c = tmp_path / "c"
    write_corpus(c, n_files=1, rows=5)
    out = tmp_path / "out"
    proc = start_cli(
        *infer_args(classifier, out, c),
        preexec_fn=lambda: os.umask(0o027),
    )
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    paths = [out, *out.rglob("*")]
    assert len(paths) > 5
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert not mode & 0o007, f"{p} is {oct(mode)}: the umask 027 was not honoured"
