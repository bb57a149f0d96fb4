"""Small helpers shared by the tests, the benchmarks and the demo: corpora written as Parquet,
job files written as TOML, `fastserve infer` argument lists. Tiny models built from configs (no
hub) are in `fastserve.pipeline.testing.models`.

    files = write_corpus(tmp / "c", n_files=3, rows=20)
    args = infer_args(model, tmp / "out", tmp / "c", "--shard-rows", "10")
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the movie was great terrible plot and bad acting i loved it not good at all wonderful "
    "boring product arrived late works fine would buy again broken on day one excellent value "
    "cheap poor quality happy with this purchase disappointed never again five stars"
).split()


def sample_texts(n: int, seed: int = 0, min_words: int = 1, max_words: int = 30) -> list[str]:
    """`n` review-like texts of `min_words`..`max_words` words, the same for the same seed."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(min_words, max_words))) for _ in range(n)]


def write_texts(
    folder: Path, texts: list[str], files: int = 1, row_group_size: int | None = None
) -> list[Path]:
    """`texts` split over `files` Parquet files (part-00000.parquet, ...) with ids r0000000, ..."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(texts) // files)
    paths = []
    for f in range(files):
        part = texts[f * per : (f + 1) * per]
        ids = [f"r{f * per + i:07d}" for i in range(len(part))]
        path = folder / f"part-{f:05d}.parquet"
        pq.write_table(pa.table({"id": ids, "text": part}), path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def write_corpus(
    folder: Path, n_files: int, rows: int, seed: int = 0, prefix: str = "doc"
) -> list[Path]:
    """n_files Parquet files of `rows` rows each: id (`<prefix>-<file>-<row>`), text, and a
    `lang` column; two row groups per file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(n_files):
        table = pa.table(
            {
                "id": [f"{prefix}-{f}-{i}" for i in range(rows)],
                "text": sample_texts(rows, seed=seed + f),
                "lang": ["en"] * rows,
            }
        )
        p = folder / f"part-{f:03d}.parquet"
        pq.write_table(table, p, row_group_size=max(1, rows // 2))
        paths.append(p)
    return paths


def toml_value(v) -> str:
    """A TOML value: strings, numbers and booleans as JSON spells them, lists as arrays, dicts
    as inline tables."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


def toml_text(tables: dict[str, dict]) -> str:
    """A job file from {table: {key: value}}."""
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def infer_args(
    model, output, *inputs, task: str = "sentiment", workers: int = 1, extra=()
) -> list[str]:
    """`fastserve infer` arguments: one --input per input, then `extra` flags."""
    args = ["infer", "--task", task, "--model", str(model), "--output", str(output)]
    args += ["--workers", str(workers)]
    for i in inputs:
        args += ["--input", str(i)]
    return [*args, *map(str, extra)]
