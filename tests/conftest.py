from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# FastServe's own state (model hash cache, schedules) stays out of the tester's home
os.environ.setdefault("FASTSERVE_HOME", tempfile.mkdtemp(prefix="fastserve-home-"))
from fastserve.pipeline.testing.models import build_classifier  # noqa: E402

FASTSERVE = [sys.executable, "-m", "fastserve.jobs"]


@pytest.fixture(scope="session")
def classifier(tmp_path_factory) -> Path:
    return build_classifier(tmp_path_factory.mktemp("models") / "clf")


def run_cli(
    *args: str, check: bool = False, timeout: float = 300, env=None, cwd=None
) -> subprocess.CompletedProcess:
    """Run the real `fastserve` command in a subprocess."""
    proc = subprocess.run(
        [*FASTSERVE, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"fastserve {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def start_cli(*args: str, env=None, **popen) -> subprocess.Popen:
    """Start the real `fastserve` command without waiting for it."""
    return subprocess.Popen(
        [*FASTSERVE, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        **popen,
    )


def wait_for(cond, timeout: float = 60, every: float = 0.05, what: str = "condition"):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_sorted(folder: Path) -> pa.Table:
    """Every row a run folder holds (or its _rejected/ sidecar), sorted by id for comparison."""
    if not any(folder.glob("*.parquet")):
        return pa.table({})
    t = pq.read_table(folder)
    return t.sort_by(
        [("id", "ascending")]
        + ([("row_number", "ascending")] if "row_number" in t.column_names else [])
    )


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node Slurm (munge, slurmctld, slurmd on loopback) for this test session."""
    import shutil

    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(b) is None]
    if missing:
        pytest.skip(
            f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd slurm-client munge"
        )
    script = Path(__file__).resolve().parent.parent / "slurm" / "local-cluster.sh"
    folder = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run(
        [str(script), "start", str(folder)], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        raise RuntimeError(f"local Slurm did not start:\n{proc.stdout}\n{proc.stderr}")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    try:
        yield folder
    finally:
        subprocess.run([str(script), "stop", str(folder)], capture_output=True, timeout=120)
        os.environ.pop("SLURM_CONF", None)


# The longest files first: under `pytest -n N --dist loadfile` (`make test`) whole files are
# handed out in this order, so the two long, mostly waiting Slurm files start at once on two
# workers and the short files fill in at the end (longest processing time first).
SLOWEST_FIRST = (
    "test_multinode.py",
    "test_slurm.py",
    "test_training.py",
    "test_finetune.py",
    "test_nightly.py",
    "test_resume.py",
    "test_prompting.py",
    "test_demo.py",
    "test_recommend.py",
    "test_bench.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within


# Under `pytest -n N` (`make test`) tests are handed out file by file (--dist loadfile): every
# test that talks to the single-node Slurm is in test_slurm.py, every multi-node one in
# test_multinode.py, so each test cluster runs on one worker (the single-node daemons listen on
# fixed ports). (--dist loadgroup with xdist_group marks would be finer, but pytest 9.2 broke
# it: pytest-xdist#1386.)


LOCAL_CLUSTER = Path(__file__).resolve().parent.parent / "slurm" / "local-cluster.sh"


def namespaces_refused() -> str | None:
    """Why this machine cannot make the nodes of a multi-node test cluster, or None if it can."""
    import shutil

    missing = [
        b
        for b in ("munged", "slurmctld", "slurmd", "ip", "nsenter", "unshare")
        if not shutil.which(b)
    ]
    if missing:
        return f"{', '.join(missing)} missing: apt-get install slurmctld slurmd slurm-client munge iproute2 util-linux"
    if os.geteuid() != 0:
        return "multi-node test clusters need root (network namespaces, a bridge)"
    probe = f"fsprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if made.returncode != 0:
        return f"the kernel refuses network namespaces: {made.stderr.strip()}"
    return None


def cluster_leftovers(folder: Path) -> list[str]:
    """What a stopped test cluster in `folder` left behind: namespaces, links, processes."""
    tag = __import__("hashlib").md5(str(folder).encode()).hexdigest()[:5]
    left = [
        line.split()[0]
        for cmd in (["ip", "netns", "list"], ["ip", "-o", "link", "show"])
        for line in subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()
        if f"fs{tag}" in line
    ]
    # the daemons and what they started carry the marker; step daemons clear their environment
    # but work in DIR/log (as slurm/local-cluster.sh's own `ours` finds them)
    marker = f"FASTSERVE_LOCAL_SLURM={folder}".encode()
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            stat = (env.parent / "stat").read_text().split()[2]
            cwd = os.readlink(env.parent / "cwd")
            if stat not in "ZX" and (
                marker in env.read_bytes().split(b"\0") or cwd == str(folder / "log")
            ):
                left.append(f"pid {env.parent.name}")
        except OSError:
            continue
    return left


@pytest.fixture(scope="session")
def multinode_cluster(tmp_path_factory):
    """A real 3-node Slurm for this test session: each node a network + UTS + mount namespace on a
    bridge with its own slurmd (slurm/local-cluster.sh start DIR --nodes 3). Yields the folder;
    its slurm.conf is passed to each command (SLURM_CONF), the single-node cluster may run too."""
    why = namespaces_refused()
    if why:
        pytest.skip(f"MULTI-NODE TESTS NOT RUN: {why}")
    folder = tmp_path_factory.mktemp("multinode")
    proc = subprocess.run(
        [str(LOCAL_CLUSTER), "start", str(folder), "--nodes", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        subprocess.run([str(LOCAL_CLUSTER), "stop", str(folder)], capture_output=True, timeout=120)
        raise RuntimeError(f"local 3-node Slurm did not start:\n{proc.stdout}\n{proc.stderr}")
    try:
        yield folder
    finally:
        subprocess.run([str(LOCAL_CLUSTER), "stop", str(folder)], capture_output=True, timeout=120)
        left = cluster_leftovers(folder)
        assert not left, f"the 3-node test cluster left behind: {left}"
