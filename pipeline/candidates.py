"""rerank's candidates: each query's items in a complete recommend run folder, and their texts.

The recommend run's config (its fingerprint) is the candidates' identity: a nightly recommend
rerun that adds queries keeps it, so the rerank folder takes the new queries too; a recommend run
redone for another catalogue or model is another identity, and the rerank folder refuses it.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from .config import TaskConfig
from .errors import InputError
from .manifest import RunDir


def candidates_identity(folder: str) -> str:
    """The recommend run's fingerprint: what its rows are made from."""
    run = (RunDir.at(folder).read_run() or {}).get("fingerprint", {})
    return run.get("sha", "none")


def check_candidates(t: TaskConfig) -> None:
    """rerank's task.candidates is a complete recommend run folder, and task.catalogue's files
    hold the items' ids and texts."""
    from .inputs import resolve_inputs

    run = RunDir.at(t.candidates)
    if not run.root.is_dir():
        raise InputError(
            f"task.candidates {t.candidates} does not exist; name the output folder of a "
            "`fastserve infer --task recommend` run"
        )
    fields = (run.read_run() or {}).get("fingerprint", {}).get("fields", {})
    if fields.get("task") != "recommend":
        raise InputError(
            f"task.candidates {t.candidates} is not a recommend run folder; name the output "
            "folder of a `fastserve infer --task recommend` run"
        )
    if not run.success.exists():
        raise InputError(
            f"task.candidates {t.candidates} is not complete (no _SUCCESS); rerun its command "
            "until it is, then this one"
        )
    files = resolve_inputs([t.catalogue])
    if not files:
        raise InputError(f"task.catalogue {t.catalogue} names no Parquet files")
    for path in files.values():
        schema = pq.read_schema(path)
        lacking = [
            c for c in (t.catalogue_id_column, t.catalogue_text_column) if c not in schema.names
        ]
        if lacking:
            raise InputError(
                f"catalogue file {path} lacks the column(s) {', '.join(lacking)} (columns: "
                f"{', '.join(schema.names)}); name them with task.catalogue_id_column and "
                "task.catalogue_text_column"
            )


def candidates_of(
    t: TaskConfig, query_ids: list[str]
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({query id: its item ids, by rank}, {item id: text}) for these queries: the rows of the
    recommend run task.candidates, and the texts of their items in task.catalogue (both read
    with a filter, not whole)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from .inputs import resolve_inputs

    run = RunDir.at(t.candidates)
    outputs = [str(run.output_path(sid)) for sid in sorted(run.records())]
    recs = ds.dataset(outputs, format="parquet").to_table(
        columns=["id", "item_id", "rank"], filter=pc.field("id").isin(query_ids)
    )
    recs = recs.sort_by([("id", "ascending"), ("rank", "ascending")])
    items: dict[str, list[str]] = {}
    for qid, item in zip(
        recs.column("id").to_pylist(), recs.column("item_id").to_pylist(), strict=True
    ):
        items.setdefault(qid, []).append(item)
    wanted = sorted({i for v in items.values() for i in v})
    cat = ds.dataset(list(resolve_inputs([t.catalogue]).values()), format="parquet")
    id_type = cat.schema.field(t.catalogue_id_column).type
    keys = pa.array(wanted, type=pa.string())
    if not pa.types.is_string(id_type) and not pa.types.is_large_string(id_type):
        keys = pc.cast(keys, id_type, safe=False) if wanted else pa.array([], type=id_type)
    found = cat.to_table(
        columns=[t.catalogue_id_column, t.catalogue_text_column],
        filter=pc.field(t.catalogue_id_column).isin(keys),
    )
    texts = dict(
        zip(
            found.column(0).cast(pa.string()).to_pylist(),
            found.column(1).to_pylist(),
            strict=True,
        )
    )
    return items, texts
