"""Against a real local Slurm (slurm/local-cluster.sh): submit, run inside the allocation, finish."""

import json
import re
import subprocess
import time

import pytest

from fastserve.jobs.slurm_job import submit_script
from fastserve.pipeline.testing import write_corpus

from conftest import read_sorted, run_cli

pytestmark = pytest.mark.slurm


def test_infer_job_runs_on_dask_inside_the_allocation(tmp_path, classifier, slurm_cluster):
    write_corpus(tmp_path / "corpus", n_files=3, rows=30)
    (tmp_path / "job.toml").write_text(
        f'[input]\npaths = ["corpus"]\nshard_rows = 30\n[model]\npath = "{classifier}"\n[task]\nname = "sentiment"\n'
        '[output]\npath = "out"\n'
        '[slurm]\njob_name = "fs-infer"\ntime = "00:03:00"\novercommit = true\nntasks_per_node = 3\n'
        'output = "slurm-%j.out"\n'
    )
    proc = run_cli("submit", "infer", tmp_path / "job.toml", "--wait", timeout=600, cwd=tmp_path)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert proc.returncode == 0, proc.stderr + logs
    assert proc.stdout.strip().isdigit()  # the job id
    # the same rows and values as a run on this machine's LocalCluster
    run_cli(
        "infer",
        "--config",
        tmp_path / "job.toml",
        "--output",
        tmp_path / "local",
        "--workers",
        "1",
        check=True,
    )
    assert read_sorted(tmp_path / "out").equals(read_sorted(tmp_path / "local"))
    assert "complete: 3/3 shards" in logs


def test_a_client_that_fails_at_once_ends_its_step_with_its_exit_code(tmp_path, slurm_cluster):
    write_corpus(tmp_path / "corpus", n_files=1, rows=5)
    (tmp_path / "job.toml").write_text(  # the model folder does not exist: the client exits 2
        '[input]\npaths = ["corpus"]\n[model]\npath = "no-such-model"\n[output]\npath = "out"\n'
        '[slurm]\ntime = "00:05:00"\novercommit = true\noutput = "slurm-%j.out"\n'
    )
    t0 = time.monotonic()
    proc = run_cli("submit", "infer", tmp_path / "job.toml", "--wait", timeout=600, cwd=tmp_path)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert proc.returncode == 2, proc.stderr + logs  # the client's code, not the time limit's
    assert time.monotonic() - t0 < 150, logs  # the scheduler and worker ended with the client
    assert "model folder" in logs and "does not exist" in logs
    assert "the step ended with exit code 2" in logs


def test_a_layout_no_node_can_hold_is_refused_not_left_pending(tmp_path, slurm_cluster):
    cpus = int(re.search(r"CPUs=(\d+)", (slurm_cluster / "slurm.conf").read_text()).group(1))
    write_corpus(tmp_path / "corpus", n_files=1, rows=5)
    toml = TRAIN_TOML.replace("batch_size = 4", f"batch_size = {2 * cpus}")
    (tmp_path / "train.toml").write_text(toml + f"[parallel]\ndp = {2 * cpus}\n")  # no [slurm]
    proc = run_cli("submit", "train", tmp_path / "train.toml", "--wait", timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "would stay pending" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_job_runs_two_ranks_under_srun(tmp_path, slurm_cluster):
    write_corpus(tmp_path / "corpus", n_files=1, rows=200)
    (tmp_path / "train.toml").write_text(
        "[model]\nn_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 32\n"
        '[data]\npaths = ["corpus"]\nvocab_size = 300\nseq_len = 32\n'
        "[train]\nsteps = 3\nbatch_size = 4\neval_every = 0\n[parallel]\npp = 2\nmicrobatches = 2\n"
        '[output]\npath = "run"\n'
        '[slurm]\njob_name = "fs-train"\ntime = "00:10:00"\novercommit = true\nntasks_per_node = 2\n'
    )
    proc = run_cli("submit", "train", tmp_path / "train.toml", "--wait", timeout=600, cwd=tmp_path)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert proc.returncode == 0, proc.stderr + logs
    assert (tmp_path / "run" / "checkpoints" / "step-000003" / "COMPLETE").exists()
    assert json.loads((tmp_path / "run" / "export" / "fastserve.json").read_text())["arch"] == "gpt"
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_quoted_paths_stay_inert_in_a_real_job(tmp_path, classifier, slurm_cluster):
    odd = tmp_path / "a b;$(touch PWNED)"
    odd.mkdir()
    write_corpus(odd / "corpus", n_files=1, rows=5)
    (odd / "job.toml").write_text(
        f'[input]\npaths = ["corpus"]\n[model]\npath = "{classifier}"\n[output]\npath = "out"\n'
        '[slurm]\ntime = "00:03:00"\novercommit = true\n'
    )
    proc = run_cli("submit", "infer", odd / "job.toml", "--wait", timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.rglob("PWNED")) and not (tmp_path / "PWNED").exists()
    assert read_sorted(odd / "out").num_rows == 5


TRAIN_TOML = (
    "[model]\nn_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 32\n"
    '[data]\npaths = ["corpus"]\nvocab_size = 320\nseq_len = 32\n'
    '[train]\nsteps = 3\nbatch_size = 4\neval_every = 0\n[output]\npath = "run"\n'
)


def scontrol_job(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def scontrol_state(job_id: str) -> str:
    return scontrol_job(job_id).get("JobState", "")


def wait_until_ended(job_id: str, timeout: float = 240) -> dict[str, str]:
    """The job's fields once it has ended for good (a requeued job passes through PENDING)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = scontrol_job(job_id)
        if job.get("JobState") in ENDED:
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {scontrol_state(job_id)} after {timeout} s")


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def test_chain_train_then_infer_on_its_export(tmp_path, slurm_cluster):
    write_corpus(tmp_path / "corpus", n_files=1, rows=200)
    (tmp_path / "train.toml").write_text(
        TRAIN_TOML + '[slurm]\ntime = "00:10:00"\novercommit = true\nntasks_per_node = 1\n'
    )
    (tmp_path / "infer.toml").write_text(
        '[input]\npaths = ["corpus"]\n[model]\npath = "run/export"\n[task]\nname = "generate"\nmax_new_tokens = 4\n'
        '[output]\npath = "gen"\n[slurm]\ntime = "00:04:00"\novercommit = true\n'
    )
    proc = run_cli(
        "submit",
        "pipeline",
        tmp_path / "train.toml",
        tmp_path / "infer.toml",
        "--wait",
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.split()
    assert int(second) > int(first)
    assert read_sorted(tmp_path / "gen").num_rows == 200
    status = run_cli("status", tmp_path / "gen", check=True).stdout
    assert f"slurm job   {second}: COMPLETED" in status


def test_a_failing_first_job_cancels_the_rest_of_the_chain(tmp_path, slurm_cluster):
    write_corpus(tmp_path / "corpus", n_files=1, rows=50)
    (tmp_path / "train.toml").write_text(
        TRAIN_TOML
        + '[slurm]\ntime = "00:05:00"\novercommit = true\nntasks_per_node = 1\nsetup = ["exit 3"]\n'
    )
    (tmp_path / "infer.toml").write_text(
        '[input]\npaths = ["corpus"]\n[model]\npath = "run/export"\n[task]\nname = "generate"\n'
        '[output]\npath = "gen"\n[slurm]\ntime = "00:05:00"\novercommit = true\n'
    )
    proc = run_cli(
        "submit",
        "pipeline",
        tmp_path / "train.toml",
        tmp_path / "infer.toml",
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.split()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and scontrol_state(second) in ("PENDING", ""):
        time.sleep(1)
    assert scontrol_state(first) == "FAILED"
    assert scontrol_state(second) == "CANCELLED"  # not pending forever
    assert not (tmp_path / "gen").exists()


def test_array_job_writes_every_row_once(tmp_path, classifier, slurm_cluster):
    write_corpus(tmp_path / "corpus", n_files=4, rows=20)
    (tmp_path / "job.toml").write_text(
        f'[input]\npaths = ["corpus"]\nshard_rows = 20\n[model]\npath = "{classifier}"\n[output]\npath = "out"\n'
        '[slurm]\ntime = "00:03:00"\novercommit = true\narray = 2\noutput = "slurm-%A_%a.out"\n'
    )
    proc = run_cli("submit", "infer", tmp_path / "job.toml", "--wait", timeout=600, cwd=tmp_path)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert proc.returncode == 0, proc.stderr + logs
    out = read_sorted(tmp_path / "out")
    ids = out.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 80
    assert (tmp_path / "out" / "_SUCCESS").exists()
    runs = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_manifest" / "runs").glob("*")]
    assert sorted(tuple(r["share"]) for r in runs) == [(0, 2), (1, 2)]


@pytest.fixture
def slow_job(tmp_path, tmp_path_factory, slurm_cluster):
    """A generation job of 16 one-second shards: slow enough to interrupt mid-way."""
    from fastserve.pipeline.testing.models import build_gpt2

    model = build_gpt2(tmp_path_factory.mktemp("models") / "gpt2")
    write_corpus(tmp_path / "corpus", n_files=16, rows=10)
    (tmp_path / "job.toml").write_text(
        f'[input]\npaths = ["corpus"]\nshard_rows = 10\n[model]\npath = "{model}"\n'
        '[task]\nname = "generate"\nmax_new_tokens = 48\nbatch_size = 2\n[output]\npath = "out"\n'
        '[cluster]\nworkers = 1\n[slurm]\ntime = "00:05:00"\novercommit = true\n'
    )
    return tmp_path / "job.toml"


def interrupt_mid_run(job_file, signal_it) -> dict[str, str]:
    """Submit, wait for the first finished shard, call signal_it(job_id), wait for the end."""
    folder = job_file.parent
    proc = run_cli("submit", "infer", job_file, cwd=folder, check=True)
    job_id = proc.stdout.strip()
    deadline = time.monotonic() + 180
    while not list((folder / "out").glob("part-*.parquet")):
        assert time.monotonic() < deadline and scontrol_state(job_id) not in ENDED, "".join(
            p.read_text() for p in folder.glob("slurm-*.out")
        )
        time.sleep(0.2)
    signal_it(job_id)
    job = wait_until_ended(job_id)
    logs = "".join(p.read_text() for p in folder.glob("slurm-*.out"))
    assert job["JobState"] == "COMPLETED", logs
    assert int(job["Restarts"]) >= 1, logs
    return job


def assert_equals_an_uninterrupted_run(job_file):
    folder = job_file.parent
    run_cli("infer", "--config", job_file, "--output", folder / "local", check=True)
    got, want = read_sorted(folder / "out"), read_sorted(folder / "local")
    assert got.num_rows == 160 and got.equals(want)
    assert (folder / "out" / "_SUCCESS").exists()


def test_time_limit_warning_drains_requeues_and_the_rerun_resumes(slow_job):
    # What Slurm sends the batch shell <grace> seconds before the time limit (--signal=B:USR1@grace)
    def warn(job_id):
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)

    interrupt_mid_run(slow_job, warn)
    logs = "".join(p.read_text() for p in slow_job.parent.glob("slurm-*.out"))
    assert "requeueing job" in logs and "finishing running shards" in logs
    assert_equals_an_uninterrupted_run(slow_job)
    runs = list((slow_job.parent / "out" / "_manifest" / "runs").glob("*.json"))
    assert len(runs) >= 2  # the requeued job resumed the same run folder


def test_scontrol_requeue_mid_run_equals_an_uninterrupted_run(slow_job):
    def requeue(job_id):
        subprocess.run(["scontrol", "requeue", job_id], check=True)

    interrupt_mid_run(slow_job, requeue)
    assert_equals_an_uninterrupted_run(slow_job)


def test_a_schedule_runs_again_and_the_next_run_takes_only_new_files(
    tmp_path, classifier, slurm_cluster
):
    write_corpus(tmp_path / "corpus", n_files=2, rows=20)
    (tmp_path / "job.toml").write_text(
        f'[input]\npaths = ["corpus"]\nshard_rows = 20\n[model]\npath = "{classifier}"\n'
        '[output]\npath = "out"\n[slurm]\ntime = "00:03:00"\novercommit = true\n'
    )
    env = {"FASTSERVE_HOME": str(tmp_path / "home")}
    proc = run_cli("schedule", tmp_path / "job.toml", "--every", "30s", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "schedule job: job" in proc.stdout
    runs = tmp_path / "out" / "_manifest" / "runs"

    def finished() -> list[dict]:
        entries = [json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))]
        return [e for e in entries if "finished" in e]

    def wait_for_summaries(n: int) -> list[dict]:
        deadline = time.monotonic() + 150
        while len(finished()) < n:
            logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
            assert time.monotonic() < deadline, f"no run {n} of the schedule:\n{logs}"
            time.sleep(0.5)
        return finished()

    first = wait_for_summaries(1)[0]
    assert first["processed"]["shards"] == 2 and first["processed"]["rows_out"] == 40
    # files that arrive between two runs: the next run does them, and only them
    (late,) = write_corpus(tmp_path / "late", n_files=1, rows=20, prefix="late")
    late.rename(tmp_path / "corpus" / "late-000.parquet")
    second = wait_for_summaries(2)[1]
    assert second["processed"]["shards"] == 1 and second["processed"]["rows_out"] == 20
    assert second["totals"]["rows_out"] == 60 and second["complete"]
    assert second["started"] - first["started"] >= 25  # the period, not back to back
    listing = run_cli("schedule", "--list", env=env, check=True).stdout
    assert listing.startswith("job ") and "every 30s" in listing
    entry = tmp_path / "home" / "schedules" / "job.json"
    deadline = time.monotonic() + 60  # the second run submits the third as it ends
    while json.loads(entry.read_text())["job_id"] == second["slurm_job_id"]:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    pending = json.loads(entry.read_text())["job_id"]
    assert scontrol_state(pending) == "PENDING"
    run_cli("schedule", "--remove", "job", env=env, check=True)
    assert "no schedules" in run_cli("schedule", "--list", env=env, check=True).stdout
    assert scontrol_state(pending) == "CANCELLED"
    assert read_sorted(tmp_path / "out").num_rows == 60


def test_a_slurm_job_has_a_state_can_be_waited_for_and_cancelled(tmp_path, slurm_cluster):
    def script(name: str, body: str) -> str:
        path = tmp_path / f"{name}.sbatch"
        path.write_text(
            f"#!/bin/bash\n#SBATCH --time=00:05:00\n#SBATCH --output={tmp_path}/{name}.out\n{body}\n"
        )
        return str(path)

    failing, code = submit_script(script("fails", "exit 3"))
    assert code == 0  # submitted, not waited for
    ended = failing.wait(timeout=120, every=0.5)
    assert (ended.name, ended.exit_code, ended.ended) == ("FAILED", "3:0", True)
    assert str(failing.state()).startswith("FAILED (exit 3:0)")
    sleeper, _ = submit_script(script("sleeps", "sleep 300"))
    assert not sleeper.state().ended
    with pytest.raises(TimeoutError):
        sleeper.wait(timeout=1, every=0.2)
    sleeper.cancel()
    assert sleeper.wait(timeout=120, every=0.5).name == "CANCELLED"
