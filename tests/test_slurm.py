"""Against a real local Slurm (slurm/local-cluster.sh): submit, run inside the allocation, finish."""

import json

import pytest

from conftest import read_sorted, run_cli, write_corpus

pytestmark = pytest.mark.slurm


def test_infer_job_runs_on_dask_inside_the_allocation(tmp_path, classifier, slurm_cluster):
    write_corpus(tmp_path / "corpus", n_files=3, rows=30)
    (tmp_path / "job.toml").write_text(
        f'[input]\npaths = ["corpus"]\nshard_rows = 30\n[model]\npath = "{classifier}"\n[task]\nname = "sentiment"\n'
        '[output]\npath = "out"\n'
        '[slurm]\njob_name = "fs-infer"\ntime = "00:10:00"\novercommit = true\nntasks_per_node = 3\n'
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


def test_quoted_paths_stay_inert_in_a_real_job(tmp_path, classifier, slurm_cluster):
    odd = tmp_path / "a b;$(touch PWNED)"
    odd.mkdir()
    write_corpus(odd / "corpus", n_files=1, rows=5)
    (odd / "job.toml").write_text(
        f'[input]\npaths = ["corpus"]\n[model]\npath = "{classifier}"\n[output]\npath = "out"\n'
        '[slurm]\ntime = "00:05:00"\novercommit = true\n'
    )
    proc = run_cli("submit", "infer", odd / "job.toml", "--wait", timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.rglob("PWNED")) and not (tmp_path / "PWNED").exists()
    assert read_sorted(odd / "out").num_rows == 5
