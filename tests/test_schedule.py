"""`fastserve schedule` without Slurm: times, errors, the scrontab entry, the rendered job.
(The schedule running for real, twice, against a local Slurm: tests/test_slurm.py.)"""

from datetime import datetime

import pytest

from fastserve.jobs.schedule import next_time, parse_every, scron_entry
from fastserve.pipeline.errors import ConfigError

from conftest import run_cli


def test_cron_gives_the_next_time_of_day():
    entry = {"cron": "0 2 * * *"}
    assert next_time(entry, datetime(2026, 11, 28, 15, 0)) == datetime(2026, 11, 29, 2, 0)
    assert next_time(entry, datetime(2026, 11, 29, 1, 59, 59)) == datetime(2026, 11, 29, 2, 0)


def test_a_period_counts_from_the_last_planned_start_and_skips_missed_ones():
    entry = {"every_s": 30, "begin": "2026-11-28T10:00:00"}
    assert next_time(entry, datetime(2026, 11, 28, 10, 0, 5)) == datetime(2026, 11, 28, 10, 0, 30)
    # a run that overran two periods: the next starts at the next slot, not three at once
    assert next_time(entry, datetime(2026, 11, 28, 10, 1, 10)) == datetime(2026, 11, 28, 10, 1, 30)
    assert next_time({"every_s": 60}, datetime(2026, 1, 1, 0, 0)) == datetime(2026, 1, 1, 0, 1)


@pytest.mark.parametrize("text", ["0s", "5", "1w", "-3m", "three hours", "99999999999d", "367d"])
def test_bad_periods_are_refused(text):
    with pytest.raises(ConfigError, match="expected a period"):
        parse_every(text)


@pytest.mark.parametrize(
    "expr", ["0 2 * * *\n* * * * * rm -rf ~", "*/1 * * * * *", "0 2 * *", " 0 2 * * *", "@reboot"]
)
def test_cron_lines_are_five_fields_on_one_line(expr):
    from fastserve.jobs.schedule import check_cron

    with pytest.raises(ConfigError, match="expected five fields"):
        check_cron(expr)
    assert check_cron("0 2 * * 1-5") == "0 2 * * 1-5"


def test_scrontab_entry_carries_the_job_options_but_not_those_scrontab_manages():
    script = "#!/bin/bash\n#SBATCH --job-name=n\n#SBATCH --requeue\n#SBATCH --time=01:00:00\necho\n"
    entry = scron_entry("nightly", "0 2 * * *", script, "/x/a b.sbatch")
    assert entry.splitlines() == [
        "# fastserve schedule nightly",
        "#SCRON --job-name=n",
        "#SCRON --time=01:00:00",
        "0 2 * * * bash '/x/a b.sbatch'",
    ]


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "job.toml").write_text(
        '[input]\npaths = ["c"]\n[model]\npath = "m"\n[output]\npath = "o"\n'
    )
    env = {"FASTSERVE_HOME": str(tmp_path / "home")}
    bad = run_cli("schedule", tmp_path / "job.toml", "--cron", "0 25 * * *", env=env)
    assert bad.returncode == 2 and "--cron '0 25 * * *'" in bad.stderr
    assert "Traceback" not in bad.stderr
    both = run_cli("schedule", tmp_path / "job.toml", env=env)
    assert both.returncode == 2 and "one of --cron or --every" in both.stderr
    gone = run_cli("schedule", "--remove", "nope", env=env)
    assert gone.returncode == 2 and "no schedule named 'nope'" in gone.stderr


def test_dry_run_shows_the_job_resubmitting_itself(tmp_path, classifier):
    (tmp_path / "c").mkdir()
    (tmp_path / "job.toml").write_text(
        f'[input]\npaths = ["c"]\n[model]\npath = "{classifier}"\n[output]\npath = "o"\n'
    )
    env = {"FASTSERVE_HOME": str(tmp_path / "home")}
    out = run_cli(
        "schedule", tmp_path / "job.toml", "--every", "1d", "--dry-run", env=env, check=True
    )
    assert f"schedule --resubmit job --home {tmp_path / 'home'}" in out.stdout
    assert out.stdout.index("--resubmit") > out.stdout.index("scontrol requeue")
    assert not (tmp_path / "home").exists()  # nothing installed
