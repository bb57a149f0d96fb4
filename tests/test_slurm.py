"""Against a real local Slurm (slurm/local-cluster.sh): submit, run inside the allocation, finish."""

import json

import pytest

from conftest import read_sorted, run_cli, write_corpus

pytestmark = pytest.mark.slurm

FLAKY_MPI_START = pytest.mark.xfail(
    strict=False,
    reason="Dask started by dask-mpi under `srun --mpi=pmi2` sometimes hangs at start on the single-node "
    "test cluster (all ranks spinning, no output); under investigation (issue 6 notes). The job's "
    "time limit bounds the hang.",
)


@FLAKY_MPI_START
@pytest.mark.timeout(240)  # a hung start is requeued by the job script: bound the wait
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


@FLAKY_MPI_START
@pytest.mark.timeout(240)  # a hung start is requeued by the job script: bound the wait
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


def scontrol_state(job_id: str) -> str:
    import re
    import subprocess

    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True
    ).stdout
    m = re.search(r"JobState=(\S+)", out)
    return m.group(1) if m else ""


@FLAKY_MPI_START
@pytest.mark.timeout(240)  # a hung start is requeued by the job script: bound the wait
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
    import time

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and scontrol_state(second) in ("PENDING", ""):
        time.sleep(1)
    assert scontrol_state(first) == "FAILED"
    assert scontrol_state(second) == "CANCELLED"  # not pending forever
    assert not (tmp_path / "gen").exists()


@FLAKY_MPI_START
@pytest.mark.timeout(240)  # a hung start is requeued by the job script: bound the wait
def test_array_job_writes_every_row_once(tmp_path, classifier, slurm_cluster):
    write_corpus(tmp_path / "corpus", n_files=4, rows=20)
    (tmp_path / "job.toml").write_text(
        f'[input]\npaths = ["corpus"]\nshard_rows = 20\n[model]\npath = "{classifier}"\n[output]\npath = "out"\n'
        '[slurm]\ntime = "00:03:00"\novercommit = true\narray = 2\narray_parallel = 1\noutput = "slurm-%A_%a.out"\n'
    )
    proc = run_cli("submit", "infer", tmp_path / "job.toml", "--wait", timeout=600, cwd=tmp_path)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert proc.returncode == 0, proc.stderr + logs
    out = read_sorted(tmp_path / "out")
    ids = out.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 80
    assert (tmp_path / "out" / "_SUCCESS").exists()
    run = json.loads((tmp_path / "out" / "_manifest" / "run.json").read_text())
    assert sorted(tuple(r["share"]) for r in run["runs"]) == [(0, 2), (1, 2)]
