"""What installing FastServe adds to an environment: one import name, `fastserve`."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_installing_adds_one_top_level_import_name(tmp_path):
    target = tmp_path / "site"
    # from a copy of the sources: a build/ folder an earlier build left in the checkout would
    # otherwise be installed along (setuptools does not clean it)
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__"),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".pth"))}
    names.discard("bin")  # the console script
    assert names == {"fastserve"}, f"installed top-level names: {sorted(names)}"
    assert sorted(p.name for p in (target / "fastserve").iterdir() if p.name != "__pycache__") == [
        "data_schemas",
        "jobs",
        "pipeline",
        "slurm",
    ]
    # every module of the checkout is installed (a subpackage left out of pyproject's list would
    # work in an editable install and be missing from a wheel)
    for folder in ("pipeline", "jobs", "slurm", "data_schemas"):
        source = {p.relative_to(ROOT / folder) for p in (ROOT / folder).rglob("*.py")}
        installed = {p.relative_to(target / "fastserve" / folder)
                     for p in (target / "fastserve" / folder).rglob("*.py")}  # fmt: skip
        assert source == installed, (
            f"{folder}: not installed: {sorted(map(str, source - installed))}"
        )
    # and it works from there, away from the checkout: schemas and templates are package data
    probe = (
        "from fastserve.pipeline import schemas; from fastserve.jobs.sbatch import render, SlurmConfig;"
        "print(schemas.load('sentiment').version, render('infer', SlurmConfig(), 'j.toml')[:2])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert out.returncode == 0 and out.stdout.strip() == "1 #!", out.stderr
