"""Batch-API files: OpenAI's batch request JSONL in, its response JSONL out, around the run folder.

    table = requests_table("requests.jsonl")        # one row per line, checked
    write_responses(run_dir, model_name)            # _batch/results.jsonl and _batch/errors.jsonl

A request line is `{"custom_id", "method", "url", "body": {"messages", "max_tokens" |
"max_completion_tokens", "temperature", "top_p", "seed", "stop", "response_format", "model"}}`.
Each line becomes a row of a Parquet copy (the run folder's `_inputs/`), which the run plans and
reads like any input: `id` = custom_id, `text` = the messages as JSON, and the per-row parameters
in columns of their own. A line that is not such a request is still a row, with `request_error`
saying why and where (the generate task rejects it, reason `bad_request`): nothing is lost, and a
duplicate custom_id is rejected as any duplicate id is. The Parquet copy is rewritten only when the
JSONL changes (and takes its mtime), so reruns and array tasks see one unchanged file.

Responses are written from the run folder at the end of a run that completes it (and again on
every rerun that completes it): Parquet stays the run folder's format.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

REQUEST_KEYS = ("custom_id", "method", "url", "body")
BODY_KEYS = (
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "response_format",
    "n",
)
# The columns of a requests table besides id and text (the generate task reads them).
REQUEST_COLUMNS = (
    "line",
    "request_error",
    "max_new_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "response_format",
)
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("line", pa.int64()),
        ("request_error", pa.string()),
        ("max_new_tokens", pa.int64()),
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("seed", pa.int64()),
        ("stop", pa.list_(pa.string())),
        ("response_format", pa.string()),
    ]
)


def is_requests_file(path: str) -> bool:
    return path.endswith(".jsonl")


class BadRequest(ValueError):
    pass


def _number(body: dict, key: str, kind: type, lo: float, hi: float) -> Any:
    v = body.get(key)
    if v is None:
        return None
    ok = isinstance(v, int | float) if kind is float else isinstance(v, int)
    if not ok or isinstance(v, bool) or not lo <= v <= hi:
        what = "a number" if kind is float else "an integer"
        raise BadRequest(f"body.{key} = {v!r}; expected {what} from {lo} to {hi}")
    return kind(v)


def _response_format(body: dict) -> str | None:
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise BadRequest(
            f"body.response_format = {rf!r}; expected {{type: text | json_object | json_schema}}"
        )
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return json.dumps({"type": "object"})
    schema = (
        (rf.get("json_schema") or {}).get("schema")
        if isinstance(rf.get("json_schema"), dict)
        else None
    )
    if not isinstance(schema, dict):
        raise BadRequest("body.response_format.json_schema.schema must be a JSON schema object")
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def _known(obj: dict, keys: tuple[str, ...], prefix: str) -> None:
    unknown = [k for k in obj if k not in keys]
    if unknown:
        name = f"{prefix}{unknown[0]}" if prefix else repr(unknown[0])
        raise BadRequest(f"unknown field {name} (known: {', '.join(keys)})")


def parse_request(line: str) -> dict:
    """One request line as the row's columns (no id/line); BadRequest says what is wrong."""
    try:
        req = json.loads(line)
    except ValueError as e:
        raise BadRequest(f"not JSON ({e})") from None
    if not isinstance(req, dict):
        raise BadRequest("not a JSON object")
    _known(req, REQUEST_KEYS, "")
    body = req.get("body")
    if not isinstance(body, dict):
        raise BadRequest("no body object")
    _known(body, BODY_KEYS, "body.")
    messages = body.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise BadRequest("body.messages must be a non-empty list of {role, content} strings")
    if body.get("n", 1) != 1:
        raise BadRequest(f"body.n = {body['n']!r}; one completion per request is supported")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (
        isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)
    ):
        raise BadRequest(f"body.stop = {stop!r}; expected a string or a list of strings")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    return {
        "text": json.dumps(
            [{"role": m["role"], "content": m["content"]} for m in messages], ensure_ascii=False
        ),
        "max_new_tokens": _number({"max_tokens": limit}, "max_tokens", int, 0, 1 << 30),
        "temperature": _number(body, "temperature", float, 0, 2),
        "top_p": _number(body, "top_p", float, 0, 1),
        "seed": _number(body, "seed", int, -(1 << 63), (1 << 63) - 1),
        "stop": stop,
        "response_format": _response_format(body),
    }


# Rows per row group of a request file's Parquet copy: the planner splits files by row groups,
# so a big request file is many shards (parallel, resumable), as a big Parquet file is.
ROW_GROUP = 64


def line_id(n: int) -> str:
    """The id of a line that has no usable custom_id: it starts with a NUL character, which a
    custom_id may not hold, so it is nobody's id."""
    return f"\x00line {n}"


def _row(n: int, raw: bytes) -> dict:
    row = dict.fromkeys(SCHEMA.names)
    row["line"] = n
    line = raw.decode("utf-8", errors="replace")
    try:
        try:
            custom = json.loads(line).get("custom_id")
        except (ValueError, AttributeError, RecursionError):
            custom = None
        row["id"] = custom if isinstance(custom, str) and custom else None
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRequest(f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
        try:
            row.update(parse_request(line))
        except RecursionError:
            raise BadRequest("nested too deeply") from None
        if row["id"] is None:
            raise BadRequest("no custom_id string")
        if "\x00" in row["id"]:
            row["id"] = None
            raise BadRequest("custom_id holds a NUL character")
        try:  # JSON's \ud800 escapes are lone surrogates: not text Parquet can hold
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("a string holds a lone surrogate escape (\\ud800-\\udfff)") from None
    except BadRequest as e:
        row = {**dict.fromkeys(SCHEMA.names), "line": n, "id": row["id"]}
        row["text"] = line.strip().encode("utf-8", "replace").decode("utf-8")  # for errors.jsonl
        row["request_error"] = f"line {n}: {e}"
        row["id"] = row["id"] or line_id(n)
    return row


def requests_table(path: str) -> pa.Table:
    """Every non-blank line of a Batch-API request file as a row (bad lines too, with why)."""
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                raw = raw[3:]
            if raw.strip():
                rows.append(_row(n, raw))
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def parquet_copy(jsonl: str, folder: Path) -> str:
    """The Parquet copy of a request file in `folder`, (re)written only when the file changed;
    it takes the file's mtime, so every process that makes it makes the same file."""
    st = os.stat(jsonl)
    name = hashlib.sha256(os.path.realpath(jsonl).encode()).hexdigest()[:16]
    target = folder / f"{Path(jsonl).stem}-{name}.parquet"
    stamp = f"{st.st_size}:{st.st_mtime_ns}".encode()
    if target.exists():
        meta = pq.read_schema(target).metadata or {}
        if meta.get(b"fastserve.source") == stamp:
            return str(target)
    folder.mkdir(parents=True, exist_ok=True)
    table = requests_table(jsonl)
    table = table.replace_schema_metadata({b"fastserve.source": stamp})
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, target)
    return str(target)


def write_responses(run, records: dict[str, dict], model: str) -> tuple[int, int]:
    """`_batch/results.jsonl` (one response per written row) and `_batch/errors.jsonl` (one per
    rejected row: its code and message) in the run folder (a RunDir), from its complete shards
    (`records`: complete_records())."""
    out_dir = run.root / "_batch"
    out_dir.mkdir(exist_ok=True)
    results, errors = [], []
    for shard_id in sorted(records):
        part = run.output_path(shard_id)
        for row in pq.read_table(part).to_pylist() if part.exists() else []:
            body = {
                "id": f"chatcmpl-{row['id']}",
                "object": "chat.completion",
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": row["generated"]},
                        "finish_reason": "length" if row["finish_reason"] == "length" else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": row["prompt_tokens"],
                    "completion_tokens": row["generated_tokens"],
                    "total_tokens": row["prompt_tokens"] + row["generated_tokens"],
                },
            }
            results.append(
                {
                    "id": f"batch_req_{row['id']}",
                    "custom_id": row["id"],
                    "response": {"status_code": 200, "request_id": row["id"], "body": body},
                    "error": None,
                }
            )
        rejected = run.rejected_path(shard_id)
        for row in pq.read_table(rejected).to_pylist() if rejected.exists() else []:
            line_only = row["id"] is not None and row["id"].startswith("\x00")
            errors.append(
                {
                    "id": f"batch_req_{row['id']}",
                    "custom_id": None if line_only else row["id"],
                    "response": None,
                    "error": {"code": row["reason"], "message": row["detail"]},
                }
            )
    for name, entries in (("results.jsonl", results), ("errors.jsonl", errors)):
        tmp = out_dir / f"{name}.{os.getpid()}.tmp"  # array tasks may finish together
        tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
        os.replace(tmp, out_dir / name)
    return len(results), len(errors)
