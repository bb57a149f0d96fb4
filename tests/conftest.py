from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_classifier, sample_texts  # noqa: E402

FASTSERVE = [sys.executable, "-m", "jobs"]


@pytest.fixture(scope="session")
def classifier(tmp_path_factory) -> Path:
    return build_classifier(tmp_path_factory.mktemp("models") / "clf")


def write_corpus(folder: Path, n_files: int, rows: int, seed: int = 0, **extra) -> list[Path]:
    """n_files Parquet files of `rows` rows each: id (string), text, and a `lang` column."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(n_files):
        texts = sample_texts(rows, seed=seed + f)
        table = pa.table(
            {
                "id": [f"doc-{f}-{i}" for i in range(rows)],
                "text": texts,
                "lang": ["en"] * rows,
            }
        )
        p = folder / f"part-{f:03d}.parquet"
        pq.write_table(table, p, row_group_size=max(1, rows // 2))
        paths.append(p)
    return paths


def run_cli(
    *args: str, check: bool = False, timeout: float = 300, env=None
) -> subprocess.CompletedProcess:
    """Run the real `fastserve` command in a subprocess."""
    proc = subprocess.run(
        [*FASTSERVE, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"fastserve {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc
