"""Several nodes, for real: a 3-node Slurm on this machine (slurm/local-cluster.sh --nodes 3), each
node a network namespace with its own address and hostname, so Dask's scheduler, client and workers
and the MPI ranks of a training job talk TCP across nodes. Jobs go through `fastserve submit`
unchanged; then nodes are cut off or crash mid-run."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from fastserve.jobs import demo_data
from fastserve.pipeline.testing import write_corpus

from conftest import LOCAL_CLUSTER, read_sorted, run_cli

pytestmark = [pytest.mark.slurm, pytest.mark.multinode]

ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@pytest.fixture
def cluster(multinode_cluster):
    """The session's 3-node cluster; a node a test cut off (cut) comes back, as after a reboot."""
    yield multinode_cluster
    for name in CUT.pop(multinode_cluster, set()):
        node("up", multinode_cluster, name)


CUT: dict = {}


def cut(cluster, name: str, *flags: str) -> None:
    """Cut `name` off (its link down), or with --kill crash it; it comes back after the test."""
    CUT.setdefault(cluster, set()).add(name)
    node("down", cluster, name, *flags)


def env(cluster) -> dict:
    return {"SLURM_CONF": str(cluster / "slurm.conf")}


def node(what: str, cluster, name: str, *flags: str) -> None:
    proc = subprocess.run(
        [str(LOCAL_CLUSTER), f"node-{what}", str(cluster), name, *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def job_fields(cluster, job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id],
        capture_output=True,
        text=True,
        env={**os.environ, **env(cluster)},
    ).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def wait_for_job(cluster, job_id: str, until, timeout: float, logs) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = job_fields(cluster, job_id)
        if until(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id}: {job_fields(cluster, job_id)} after {timeout} s\n{logs()}")


def logs_of(folder, pattern="slurm-*.out"):
    return lambda: "".join(p.read_text() for p in sorted(folder.glob(pattern)))


def slurm_table(nodes: int, per_node: int, time_limit: str = "00:08:00") -> str:
    return (
        f'[slurm]\ntime = "{time_limit}"\novercommit = true\nnodes = {nodes}\n'
        f'ntasks_per_node = {per_node}\noutput = "slurm-%j.out"\n'
    )


def workers_hosts(out) -> set[str]:
    return {
        json.loads(p.read_text())["worker"].split(":")[0]
        for p in (out / "_manifest" / "shards").glob("*.json")
    }


# -- inference across nodes ------------------------------------------------------------------


def test_a_demo_sized_infer_job_on_three_nodes_equals_a_one_node_run(tmp_path, classifier, cluster):
    bad = demo_data.write_corpus(tmp_path / "reviews", rows=3000, shards=6)
    (tmp_path / "job.toml").write_text(
        f'[input]\npaths = ["reviews"]\nshard_rows = 250\n[model]\npath = "{classifier}"\n'
        '[task]\nname = "sentiment"\n[output]\npath = "out"\n' + slurm_table(nodes=3, per_node=2)
        # 2 tasks a node: the scheduler and the client on node1, two workers on node2 and node3
    )
    proc = run_cli(
        "submit",
        "infer",
        tmp_path / "job.toml",
        "--wait",
        timeout=600,
        cwd=tmp_path,
        env=env(cluster),
    )
    logs = logs_of(tmp_path)()
    assert proc.returncode == 0, proc.stderr + logs
    assert workers_hosts(tmp_path / "out") == {"node2", "node3"}, logs  # the work crossed nodes
    # real addresses: the client reports the scheduler's dashboard on node1's own address
    assert re.search(r"Dask dashboard: http://198\.18\.\d+\.11:", logs), logs
    assert "defaulting to hostname" not in logs
    run_cli(
        "infer", "--config", tmp_path / "job.toml", "--output", tmp_path / "one",
        "--executor", "serial", check=True,
    )  # fmt: skip
    assert read_sorted(tmp_path / "out").equals(read_sorted(tmp_path / "one"))
    rejected = read_sorted(tmp_path / "out" / "_rejected")
    assert read_sorted(tmp_path / "out").num_rows + rejected.num_rows == 3000 + bad


def slow_job(folder, model, nodes=2, per_node=3):
    """16 shards of generation, about a second each: slow enough to cut a node off mid-run."""
    write_corpus(folder / "corpus", n_files=16, rows=10)
    (folder / "job.toml").write_text(
        f'[input]\npaths = ["corpus"]\nshard_rows = 10\n[model]\npath = "{model}"\n'
        '[task]\nname = "generate"\nmax_new_tokens = 48\nbatch_size = 2\n[output]\npath = "out"\n'
        + slurm_table(nodes, per_node)
    )
    return folder / "job.toml"


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from fastserve.pipeline.testing.models import build_gpt2

    return build_gpt2(tmp_path_factory.mktemp("models") / "gpt2")


def assert_equals_an_uninterrupted_run(job_file):
    folder = job_file.parent
    out = read_sorted(folder / "out")
    ids = out.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 160, "a row lost or written twice"
    run_cli(
        "infer", "--config", job_file, "--output", folder / "one", "--executor", "serial",
        check=True,
    )  # fmt: skip
    assert out.equals(read_sorted(folder / "one"))
    assert (folder / "out" / "_SUCCESS").exists()


def submit_and_wait_for_a_shard(cluster, job_file) -> str:
    folder = job_file.parent
    proc = run_cli("submit", "infer", job_file, cwd=folder, env=env(cluster), check=True)
    job_id = proc.stdout.strip()
    deadline = time.monotonic() + 180
    while not list((folder / "out").glob("part-*.parquet")):
        state = job_fields(cluster, job_id).get("JobState")
        assert time.monotonic() < deadline and state not in ENDED, logs_of(folder)()
        time.sleep(0.2)
    return job_id


def test_a_worker_node_cut_off_mid_run_loses_and_repeats_nothing(tmp_path, gpt2, cluster):
    job_file = slow_job(tmp_path, gpt2)
    job_id = submit_and_wait_for_a_shard(cluster, job_file)
    cut(cluster, "node2")  # its link down: three workers unreachable, still running
    job = wait_for_job(
        cluster, job_id, lambda j: j.get("JobState") in ENDED, 300, logs_of(tmp_path)
    )
    logs = logs_of(tmp_path)()
    # Dask gives the lost workers' shards to the survivors; if Slurm declares the node dead
    # first, it requeues the job, and the rerun resumes on the nodes left. Either way: complete.
    assert job["JobState"] == "COMPLETED", logs
    assert "Removing worker" in logs or int(job["Restarts"]) >= 1, logs
    assert_equals_an_uninterrupted_run(job_file)


def test_losing_the_schedulers_node_ends_the_job_fast_and_the_rerun_resumes(
    tmp_path, gpt2, cluster
):
    job_file = slow_job(tmp_path, gpt2)
    job_id = submit_and_wait_for_a_shard(cluster, job_file)
    t0 = time.monotonic()
    cut(cluster, "node1", "--kill")  # scheduler, client and the batch script: crashed
    # Slurm sees the node gone (SlurmdTimeout = 20 s here) and requeues the job: not at its
    # 8-minute time limit
    wait_for_job(cluster, job_id, lambda j: int(j.get("Restarts", 0)) >= 1, 90, logs_of(tmp_path))
    assert time.monotonic() - t0 < 90
    job = wait_for_job(
        cluster, job_id, lambda j: j.get("JobState") in ENDED, 300, logs_of(tmp_path)
    )
    assert job["JobState"] == "COMPLETED", logs_of(tmp_path)()
    assert "node1" not in job.get("NodeList", "")  # the rerun ran on the nodes left
    runs = list((tmp_path / "out" / "_manifest" / "runs").glob("*.json"))
    assert len(runs) >= 2  # it resumed the same run folder
    assert_equals_an_uninterrupted_run(job_file)


# -- training across nodes -------------------------------------------------------------------

TRAIN = (
    '[model]\narch = "gpt"\nn_layer = 4\nn_head = 4\nn_embd = 32\nblock_size = 64\n'
    '[data]\npaths = ["corpus"]\nvocab_size = 320\nseq_len = 32\n'
    "[train]\nsteps = {steps}\nbatch_size = 8\nlr = {lr}\nwarmup_steps = 2\neval_every = 0\n"
    "grad_clip = 0.5\n"
    "[parallel]\nmicrobatches = 2\ntimeout_s = 15\n{parallel}\n"
    "[checkpoint]\nevery = 10\n"
    '[output]\npath = "{name}"\n'
)


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    write_corpus(d / "corpus", n_files=2, rows=300)
    return d


def train_file(folder, name, parallel="", steps=6, lr=3e-3, slurm="") -> object:
    path = folder / f"{name}.toml"
    path.write_text(TRAIN.format(name=name, parallel=parallel, steps=steps, lr=lr) + slurm)
    return path


def on_this_node(job_file, ranks: int = 1) -> list[float]:
    """The same training, uninterrupted, on this machine: one process, or `ranks` MPI ranks."""
    mpi = [os.path.join(os.path.dirname(sys.executable), "mpiexec"), "-n", str(ranks)]
    subprocess.run(
        [
            *(mpi if ranks > 1 else []),
            sys.executable,
            "-m",
            "fastserve.jobs",
            "train",
            "--config",
            str(job_file),
        ],
        cwd=job_file.parent,
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return losses(job_file.parent / job_file.stem)


@pytest.mark.parametrize(
    "name, parallel, per_node",
    [("pp2", "pp = 2", 1), ("pp2xdp2", "pp = 2\ndp = 2", 2)],
)
def test_training_across_two_nodes_equals_one_process(train_dir, cluster, name, parallel, per_node):
    reference = on_this_node(train_file(train_dir, f"{name}-ref"))
    job_file = train_file(train_dir, name, parallel, slurm=slurm_table(nodes=2, per_node=per_node))
    proc = run_cli(
        "submit", "train", job_file, "--wait", timeout=600, cwd=train_dir, env=env(cluster)
    )
    logs = logs_of(train_dir)()
    assert proc.returncode == 0, proc.stderr + logs
    assert losses(train_dir / name) == pytest.approx(reference, abs=1e-5)
    assert reference[-1] < reference[0]


def test_a_rank_whose_node_is_cut_off_is_named_and_the_rerun_resumes(train_dir, cluster):
    # the same layout uninterrupted on this machine (over 120 steps, another layout's sums drift)
    reference = on_this_node(train_file(train_dir, "long-ref", "pp = 2", steps=120, lr=1e-3), 2)
    job_file = train_file(
        train_dir, "long", "pp = 2", steps=120, lr=1e-3, slurm=slurm_table(nodes=2, per_node=1)
    )
    proc = run_cli("submit", "train", job_file, cwd=train_dir, env=env(cluster), check=True)
    job_id = proc.stdout.strip()
    run, logs = train_dir / "long", logs_of(train_dir, f"slurm-{job_id}.out")
    deadline = time.monotonic() + 180
    while not (run / "metrics.jsonl").exists() or len(losses(run)) < 25:
        assert time.monotonic() < deadline, logs()
        time.sleep(0.2)
    t0 = time.monotonic()
    cut(cluster, "node2")  # rank 1's node: its link down
    while "lost contact" not in logs():
        assert time.monotonic() - t0 < 15 + 30, logs()  # parallel.timeout_s + 30 s
        time.sleep(0.2)
    assert "[rank 0] lost contact with rank 1 on node2: no rank on node2 answers" in logs()
    job = wait_for_job(cluster, job_id, lambda j: j.get("JobState") in ENDED, 400, logs)
    text = logs()
    assert re.search(r"the step ended with exit code [1-9]", text), text  # the lost attempt
    assert job["JobState"] == "COMPLETED" and int(job["Restarts"]) >= 1, text
    assert re.search(r"steps [1-9]\d* -> 120 \(resumed\)", text), text  # from a checkpoint
    assert losses(run) == pytest.approx(reference, abs=1e-5)


# -- the test cluster itself -----------------------------------------------------------------


def test_a_node_that_never_comes_up_is_named_with_its_log(tmp_path, multinode_cluster):
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(LOCAL_CLUSTER), "start", str(tmp_path / "c"), "--nodes", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FASTSERVE_LOCAL_SLURM_DEAD_NODE": "node2"},
    )
    assert proc.returncode != 0 and time.monotonic() - t0 < 45
    assert "1 of 2 nodes did not become idle within 30 s" in proc.stderr
    assert "node2 is" in proc.stderr and "slurmd.node2.log" in proc.stderr
    from conftest import cluster_leftovers

    assert cluster_leftovers(tmp_path / "c") == []  # a failed start cleans up after itself


def test_a_job_asking_for_more_nodes_than_exist_is_refused_before_sbatch(
    tmp_path, classifier, multinode_cluster
):
    write_corpus(tmp_path / "corpus", n_files=1, rows=5)
    (tmp_path / "job.toml").write_text(
        f'[input]\npaths = ["corpus"]\n[model]\npath = "{classifier}"\n[output]\npath = "out"\n'
        + slurm_table(nodes=4, per_node=3)
    )
    proc = run_cli(
        "submit", "infer", tmp_path / "job.toml", cwd=tmp_path, env=env(multinode_cluster)
    )
    assert proc.returncode == 2, proc.stderr
    assert "slurm.nodes = 4, but this cluster has 3 nodes (sinfo)" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.glob("slurm-*.out"))
