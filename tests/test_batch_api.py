"""Batch-API files: OpenAI's batch request JSONL in (per-row parameters honoured, bad lines kept
as errors with their line), its response JSONL out, exactly once through the run folder."""

import json

import jsonschema
import pytest
from transformers import AutoTokenizer

from fastserve.pipeline.batch_api import requests_table
from fastserve.pipeline.testing.models import CHAT_TEMPLATE, build_gpt2

from conftest import read_sorted, run_cli
from reference import hf_generate_constrained

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["good", "bad"]},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["label", "stars"],
    "additionalProperties": False,
}


def request(cid, content, **body):
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "tiny",
            "messages": [
                {"role": "system", "content": "You rate reviews."},
                {"role": "user", "content": content},
            ],
            **body,
        },
    }


LINES = [
    json.dumps(request("greedy-1", "the movie was great", max_tokens=6, temperature=0)),
    json.dumps(request("greedy-2", "broken on day one", max_tokens=9, temperature=0)),
    json.dumps(request("sampled", "works fine", max_completion_tokens=7, temperature=1.2, seed=7)),
    json.dumps(request("stopped", "five stars", max_tokens=12, temperature=0, stop=["e"])),
    json.dumps(
        request(
            "json",
            "cheap poor quality",
            max_tokens=40,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}},
        )
    ),
    "{not json at all",  # line 6
    json.dumps({**request("typo", "hello"), "bodyy": {}}),  # line 7: unknown field
    "",  # a blank line: no request, no row
    json.dumps(request("greedy-1", "a second request with the same id", max_tokens=3)),  # line 9
    json.dumps(request("hot", "too hot", temperature=5)),  # line 10: out of range
    "[" * 100_000,  # line 11: nested too deeply for any parser
    '{"custom_id": "sur", "body": {"messages": [{"role": "user", "content": "x\\ud800y"}]}}',
    json.dumps(request("line 6", "an id like a line's", max_tokens=3, temperature=0)),  # line 13
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return build_gpt2(tmp_path_factory.mktemp("models") / "chat", chat_template=CHAT_TEMPLATE)


def run(model, requests, out, *extra):
    return run_cli(
        "infer", "--task", "generate", "--model", model, "--input", requests, "--output", out,
        "--output-format", "batch-jsonl", "--executor", "serial", *extra,
    )  # fmt: skip


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_request_file_goes_through_and_every_line_is_accounted_for(tmp_path, chat_model):
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(LINES) + "\n")
    proc = run(chat_model, requests, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    results = read_jsonl(tmp_path / "out" / "_batch" / "results.jsonl")
    errors = read_jsonl(tmp_path / "out" / "_batch" / "errors.jsonl")
    # rows in (the non-blank lines) = results + errors
    assert len(results) + len(errors) == 12
    assert sorted(r["custom_id"] for r in results) == sorted(
        ["greedy-1", "greedy-2", "sampled", "stopped", "json", "line 6"]
    )
    why = {e["custom_id"]: e["error"] for e in errors if e["custom_id"]}
    lines = {e["error"]["message"].split(":")[0]: e for e in errors if not e["custom_id"]}
    assert sorted(lines) == ["line 11", "line 6"]  # no usable custom_id: null in errors
    assert "line 6: not JSON" in lines["line 6"]["error"]["message"]
    assert "nested too deeply" in lines["line 11"]["error"]["message"]
    assert "line 12: a string holds a lone surrogate" in why["sur"]["message"]
    assert all(e["error"]["code"] == "bad_request" for e in lines.values())
    assert (
        why["typo"]["code"] == "bad_request"
        and "line 7: unknown field 'bodyy'" in why["typo"]["message"]
    )
    assert (
        why["hot"]["code"] == "bad_request"
        and "line 10: body.temperature = 5" in why["hot"]["message"]
    )
    assert why["greedy-1"]["code"] == "duplicate_id"  # the second greedy-1, line 9
    by_id = {r["custom_id"]: r["response"]["body"] for r in results}
    # per-row parameters: max_tokens, stop, response_format; usage as the API reports it
    assert by_id["greedy-1"]["usage"]["completion_tokens"] <= 6
    assert by_id["sampled"]["usage"]["completion_tokens"] <= 7
    assert "e" not in by_id["stopped"]["choices"][0]["message"]["content"]
    answer = by_id["json"]["choices"][0]
    assert answer["finish_reason"] == "stop"  # the JSON was complete within max_tokens
    jsonschema.validate(json.loads(answer["message"]["content"]), SCHEMA)
    for body in by_id.values():
        u = body["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    # greedy rows equal model.generate() on the chat template's prompt, one row at a time
    tok = AutoTokenizer.from_pretrained(chat_model)
    for cid, line, limit in (("greedy-1", 0, 6), ("greedy-2", 1, 9)):
        messages = json.loads(LINES[line])["body"]["messages"]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        (want,) = hf_generate_constrained(chat_model, [ids["input_ids"]], [limit], grammar=None)
        assert by_id[cid]["choices"][0]["message"]["content"] == tok.decode(
            want, skip_special_tokens=True
        )


def test_a_rerun_redoes_nothing_and_a_grown_file_adds_only_its_new_lines(tmp_path, chat_model):
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(LINES[:3]) + "\n")
    assert run(chat_model, requests, tmp_path / "out").returncode == 0
    first = (tmp_path / "out" / "_batch" / "results.jsonl").read_text()
    again = run(chat_model, requests, tmp_path / "out")
    assert again.returncode == 0 and "1 already complete, 0 to do" in again.stderr, again.stderr
    assert (tmp_path / "out" / "_batch" / "results.jsonl").read_text() == first
    requests.write_text("\n".join([*LINES[:3], LINES[3]]) + "\n")  # tonight's file has one more
    grown = run(chat_model, requests, tmp_path / "out")
    assert grown.returncode == 0, grown.stderr
    results = read_jsonl(tmp_path / "out" / "_batch" / "results.jsonl")
    assert sorted(r["custom_id"] for r in results) == ["greedy-1", "greedy-2", "sampled", "stopped"]
    assert read_sorted(tmp_path / "out").num_rows == 4


def test_bad_request_files_and_options_are_clear_errors(tmp_path, chat_model, classifier):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(LINES[0] + "\n")
    plain = build_gpt2(tmp_path / "plain")
    proc = run(plain, requests, tmp_path / "o1")
    assert proc.returncode == 2 and "has no chat template" in proc.stderr, proc.stderr
    proc = run_cli("infer", "--task", "sentiment", "--model", classifier, "--input", requests,
                   "--output", tmp_path / "o2")  # fmt: skip
    assert proc.returncode == 2 and "for task generate" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    (tmp_path / "job.toml").write_text('[task]\nmax_new_tokens_column = "limit"\n')
    proc = run(chat_model, requests, tmp_path / "o3", "--config", tmp_path / "job.toml")
    assert proc.returncode == 2 and "leave task.max_new_tokens_column out" in proc.stderr


def test_the_request_table_keeps_every_line():
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("\n".join(LINES) + "\n")
    table = requests_table(f.name).to_pylist()
    assert [r["line"] for r in table] == [1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13]
    ok = [True] * 5 + [False, False, True, False, False, False, True]
    assert [r["request_error"] is None for r in table] == ok
    assert (
        table[2]["temperature"] == 1.2 and table[2]["seed"] == 7 and table[2]["max_new_tokens"] == 7
    )
    assert table[3]["stop"] == ["e"] and json.loads(table[4]["response_format"]) == SCHEMA


def test_undecodable_bytes_a_bom_and_a_big_file(tmp_path, chat_model):
    """Bytes that are not UTF-8 reject their line only; a byte-order mark is no reason to lose
    the first request; a big request file is many shards (parallel, resumable)."""
    requests = tmp_path / "requests.jsonl"
    good = [
        json.dumps(request(f"r{i:03d}", "works fine", max_tokens=1, temperature=0))
        for i in range(149)
    ]
    bad = json.dumps(request("latin1", "caf\u00e9", max_tokens=2)).replace("\\u00e9", "\xe9")
    requests.write_bytes(b"\xef\xbb\xbf" + "\n".join([*good, bad]).encode("latin-1") + b"\n")
    proc = run(chat_model, requests, tmp_path / "out", "--shard-rows", "64")
    assert proc.returncode == 0, proc.stderr
    assert "3 shards" in proc.stderr  # 150 rows in row groups of 64: shards of at most 64 rows
    results = read_jsonl(tmp_path / "out" / "_batch" / "results.jsonl")
    errors = read_jsonl(tmp_path / "out" / "_batch" / "errors.jsonl")
    assert sorted(r["custom_id"] for r in results) == [f"r{i:03d}" for i in range(149)]
    assert len(errors) == 1 and "line 150: not valid UTF-8" in errors[0]["error"]["message"]
    assert errors[0]["custom_id"] == "latin1"  # its custom_id was readable


def test_batch_files_never_describe_a_folder_that_changed_since(tmp_path, chat_model):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(LINES[0] + "\n")
    assert run(chat_model, requests, tmp_path / "out").returncode == 0
    assert (tmp_path / "out" / "_batch" / "results.jsonl").exists()
    requests.write_text(LINES[0] + "\n" + LINES[1] + "\n")
    proc = run_cli("infer", "--task", "generate", "--model", chat_model, "--input", requests,
                   "--output", tmp_path / "out", "--executor", "serial")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "out" / "_batch" / "results.jsonl").exists()  # not stale: gone
