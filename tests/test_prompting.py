"""LLM batch jobs as people write them: prompt templates over columns, chat templates, and
output constrained to a JSON schema, a regex or a list of choices (tiny random-weight models)."""

import json
import re

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from fastserve.pipeline.testing import infer_args, sample_texts, toml_text
from fastserve.pipeline.testing.models import CHAT_TEMPLATE, build_gpt2

from conftest import read_sorted, run_cli
from reference import hf_generate, hf_generate_constrained

PRODUCTS = ["phone", "book", "lamp", None]
SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "why": {"type": "string", "maxLength": 12},
    },
    "required": ["label", "stars"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def chat_gpt2(tmp_path_factory):
    return build_gpt2(tmp_path_factory.mktemp("models") / "chat", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    c = tmp_path_factory.mktemp("reviews")
    n = 24
    pq.write_table(
        pa.table(
            {
                "id": [f"r{i:02d}" for i in range(n)],
                "text": sample_texts(n, seed=4, max_words=12),
                "product": [PRODUCTS[i % 4] for i in range(n)],
                "persona": ["You rate reviews.", "Be brief."] * (n // 2),
            }
        ),
        c / "reviews.parquet",
    )
    return c


def generate(model, out, corpus, task: dict, *extra):
    job = out.parent / f"{out.name}.toml"
    job.write_text(toml_text({"task": {"name": "generate", **task}}))
    return run_cli(
        *infer_args(model, out, corpus, task="generate", extra=["--executor", "serial", *extra]),
        "--config",
        job,
    )


def by_id(folder) -> dict:
    return {r["id"]: r for r in read_sorted(folder).to_pylist()}


def test_a_template_prompt_equals_the_same_text_formatted_beforehand(tmp_path, chat_gpt2, reviews):
    template = "Review of {product}: {text} ({persona:.4})"
    proc = generate(
        chat_gpt2, tmp_path / "t", reviews, {"prompt_template": template, "max_new_tokens": 6}
    )
    assert proc.returncode == 0, proc.stderr
    rows = pq.read_table(reviews / "reviews.parquet").to_pylist()
    # the reference: str.format by hand, then the plain text path
    formatted = tmp_path / "formatted"
    formatted.mkdir()
    good = [r for r in rows if r["product"] is not None]
    pq.write_table(
        pa.table({"id": [r["id"] for r in good], "text": [template.format(**r) for r in good]}),
        formatted / "f.parquet",
    )
    assert generate(chat_gpt2, tmp_path / "f", formatted, {"max_new_tokens": 6}).returncode == 0
    got, want = by_id(tmp_path / "t"), by_id(tmp_path / "f")
    assert len(got) == len(good) == 18 and got.keys() == want.keys()
    for k in got:
        assert (got[k]["generated"], got[k]["prompt_tokens"]) == (
            want[k]["generated"],
            want[k]["prompt_tokens"],
        )
        assert got[k]["parsed_ok"] is None  # not constrained
    # a row whose template field is null: rejected with the field named, not lost
    rejected = read_sorted(tmp_path / "t" / "_rejected").to_pylist()
    assert len(rejected) == 6 and {r["reason"] for r in rejected} == {"bad_value"}
    assert all("product" in r["detail"] for r in rejected)


def test_chat_prompts_equal_apply_chat_template_then_generate(tmp_path, chat_gpt2, reviews):
    proc = generate(
        chat_gpt2,
        tmp_path / "o",
        reviews,
        {"chat": True, "system_column": "persona", "max_new_tokens": 8},
    )
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(chat_gpt2)
    rows = pq.read_table(reviews / "reviews.parquet").to_pylist()
    prompts = [
        tok.apply_chat_template(
            [{"role": "system", "content": r["persona"]}, {"role": "user", "content": r["text"]}],
            add_generation_prompt=True,
            tokenize=True,
        )["input_ids"]
        for r in rows
    ]
    want = hf_generate_constrained(chat_gpt2, prompts, [8] * len(rows), grammar=None)
    got = by_id(tmp_path / "o")
    for r, ids, new in zip(rows, prompts, want, strict=True):
        assert got[r["id"]]["prompt_tokens"] == len(ids)
        assert got[r["id"]]["generated"] == tok.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_json_schema_output_always_parses_and_fits_the_schema(
    tmp_path, chat_gpt2, reviews, sampled
):
    """A random-weight model emits noise; constrained, every row that ends before its token limit
    is JSON that fits the schema, and parsed_ok says so; rows cut by the limit are kept, flagged."""
    task = {"json_schema": SCHEMA, "max_new_tokens": 48, "prompt_template": "{text}"}
    if sampled:
        task |= {"do_sample": True, "temperature": 1.5, "seed": 3}
    proc = generate(chat_gpt2, tmp_path / "o", reviews, task, "--batch-size", "5")
    assert proc.returncode == 0, proc.stderr
    rows = list(by_id(tmp_path / "o").values())
    assert len(rows) == 24
    done = [r for r in rows if r["finish_reason"] != "length"]
    assert len(done) >= 12, [r["generated"] for r in rows]  # the premise: most rows finish
    for r in done:
        jsonschema.validate(json.loads(r["generated"]), SCHEMA)
        assert r["parsed_ok"] is True and r["finish_reason"] == "eos"
    for r in rows:
        if r["finish_reason"] == "length":
            assert r["parsed_ok"] is False and r["generated_tokens"] == 48


def test_choices_and_regex_rows_are_always_well_formed(tmp_path, chat_gpt2, reviews):
    choices = ["positive", "negative", "not sure"]
    task = {"choices": choices, "max_new_tokens": 8}
    assert generate(chat_gpt2, tmp_path / "c", reviews, task).returncode == 0
    rows = by_id(tmp_path / "c").values()
    assert len(rows) == 24
    for r in rows:
        assert r["generated"] in choices and r["parsed_ok"] is True
    regex = r"[1-5] stars?, (yes|no)"
    task = {"regex": regex, "max_new_tokens": 16}
    assert generate(chat_gpt2, tmp_path / "r", reviews, task).returncode == 0
    rows = by_id(tmp_path / "r").values()
    assert len(rows) == 24
    for r in rows:
        assert re.fullmatch(regex, r["generated"]) and r["parsed_ok"] is True


def test_greedy_constrained_output_equals_a_one_row_reference(tmp_path, chat_gpt2, reviews):
    """Token for token: the batched, masked loop and model.generate() one row at a time with the
    same grammar's mask as a logits processor."""
    from llguidance import LLMatcher

    assert generate(
        chat_gpt2, tmp_path / "o", reviews, {"json_schema": SCHEMA, "max_new_tokens": 30},
        "--batch-size", "4",
    ).returncode == 0  # fmt: skip
    tok = AutoTokenizer.from_pretrained(chat_gpt2)
    rows = pq.read_table(reviews / "reviews.parquet").to_pylist()
    grammar = LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA, sort_keys=True), overrides={"whitespace_flexible": False}
    )
    want = hf_generate_constrained(
        chat_gpt2, [tok(r["text"])["input_ids"] for r in rows], [30] * len(rows), grammar
    )
    got = by_id(tmp_path / "o")
    for r, new in zip(rows, want, strict=True):
        assert got[r["id"]]["generated_tokens"] == len(new)
        assert got[r["id"]]["generated"] == tok.decode(new, skip_special_tokens=True)


def test_unconstrained_rows_still_equal_model_generate(tmp_path, chat_gpt2, reviews):
    """The masking path leaves free rows alone: plain generate still equals model.generate()."""
    assert generate(chat_gpt2, tmp_path / "o", reviews, {"max_new_tokens": 10}).returncode == 0
    rows = pq.read_table(reviews / "reviews.parquet").to_pylist()
    want = hf_generate(chat_gpt2, [r["text"] for r in rows], [10] * len(rows))
    tok = AutoTokenizer.from_pretrained(chat_gpt2)
    got = by_id(tmp_path / "o")
    for r, new in zip(rows, want, strict=True):
        assert got[r["id"]]["generated"] == tok.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize(
    "task,needle",
    [
        ({"json_schema": {"type": "nonsense"}}, "task.json_schema"),
        ({"regex": "a(b"}, "task.regex"),
        (
            {"regex": "a", "choices": ["x"]},
            "give one of task.json_schema, task.regex, task.choices",
        ),
        ({"prompt_template": "{0} and {text}"}, "task.prompt_template field {0}"),
        ({"prompt_template": "{text"}, "is not a format string"),
        ({"system": "hi"}, "need task.chat = true"),
        ({"choices": []}, "task.choices is empty"),
        ({"regex": ""}, "task.regex is empty"),
        ({"prompt_template": "{text!x}"}, "unknown conversion !x"),
    ],
)
def test_bad_prompting_options_are_one_clear_error(tmp_path, chat_gpt2, reviews, task, needle):
    proc = generate(chat_gpt2, tmp_path / "o", reviews, task)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_missing_chat_template_or_column_is_named(tmp_path, reviews):
    plain = build_gpt2(tmp_path / "plain")
    proc = generate(plain, tmp_path / "o", reviews, {"chat": True})
    assert proc.returncode == 2 and "has no chat template" in proc.stderr, proc.stderr
    proc = generate(plain, tmp_path / "o2", reviews, {"prompt_template": "{brand}: {text}"})
    assert proc.returncode == 1 and "lacks the column(s) brand" in proc.stderr, proc.stderr
    assert "columns: id, text, product, persona" in proc.stderr


def test_a_killed_constrained_templated_run_resumes_to_the_uninterrupted_output(
    tmp_path, chat_gpt2
):
    import signal

    from conftest import start_cli, wait_for

    c = tmp_path / "c"
    c.mkdir()
    for f in range(6):
        pq.write_table(
            pa.table(
                {
                    "id": [f"f{f}-{i}" for i in range(10)],
                    "text": sample_texts(10, seed=f, max_words=10),
                    "product": PRODUCTS[:3] * 3 + ["pen"],
                }
            ),
            c / f"part-{f}.parquet",
        )
    task = {"prompt_template": "{product}: {text}", "json_schema": SCHEMA, "max_new_tokens": 40,
            "do_sample": True, "seed": 5}  # fmt: skip
    (tmp_path / "job.toml").write_text(toml_text({"task": {"name": "generate", **task}}))

    def args(out):
        extra = ["--shard-rows", "10", "--batch-size", "3", "--config", tmp_path / "job.toml"]
        return infer_args(chat_gpt2, out, c, task="generate", extra=extra)

    run_cli(*args(tmp_path / "whole"), check=True)
    killed = start_cli(*args(tmp_path / "out"))
    wait_for(lambda: list((tmp_path / "out").glob("part-*.parquet")), timeout=120, what="a shard")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) < 6  # killed part-way
    run_cli(*args(tmp_path / "out"), check=True)
    assert read_sorted(tmp_path / "out").equals(read_sorted(tmp_path / "whole"))
    assert read_sorted(tmp_path / "out").num_rows == 60


INSTRUCTIONS = (
    "You label product reviews. Read the review, then answer with the label that fits best; "
    "think of the product first and be brief."
)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_a_shared_prefix_computed_once_gives_the_same_tokens(chat_gpt2, sampled):
    """Rows that start with the same instructions are prefilled after that prefix's cached keys
    and values; the tokens are those of prefilling every row whole, greedy and sampled, through
    refills of the batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastserve.pipeline.models.decoding import HFCausalLM, Sampling
    from fastserve.pipeline.models.decoding import generate as decode

    model = AutoModelForCausalLM.from_pretrained(chat_gpt2).eval()
    tok = AutoTokenizer.from_pretrained(chat_gpt2)
    other = " ".join(reversed(INSTRUCTIONS.split()))
    long = sample_texts(20, seed=1, min_words=30, max_words=40)
    texts = [  # rows of two instruction sets and rows of their own, mixed in every batch
        [f"{INSTRUCTIONS} Review: {t}", f"{other} Review: {t}", long[i]][i % 3]
        for i, t in enumerate(sample_texts(20, seed=9, max_words=14))
    ]
    prompts = tok(texts)["input_ids"]
    sampling = Sampling(do_sample=sampled, temperature=1.3, seed=2)
    ids = [f"r{i}" for i in range(len(texts))]
    outs = {}
    for reuse in (True, False):
        lm = HFCausalLM(model, torch.device("cpu"), reuse_prefix=reuse)
        with torch.inference_mode():
            got = decode(
                lm, tok, prompts, ids, [12] * len(texts), sampling, {tok.eos_token_id}, slots=6
            )
        outs[reuse] = [g.tokens for g in got]
        assert bool(lm.prefixes) == reuse  # the premise: the prefix was shared
    assert outs[True] == outs[False]


def test_prefix_reuse_changes_no_output_of_a_templated_chat_run(tmp_path, chat_gpt2, reviews):
    task = {"chat": True, "system": "You label reviews; be brief.", "prompt_template": "Review of {product}: {text}",
            "max_new_tokens": 10, "do_sample": True, "seed": 4}  # fmt: skip
    for reuse in (True, False):
        proc = generate(chat_gpt2, tmp_path / str(reuse), reviews, {**task, "reuse_prefix": reuse})
        assert proc.returncode == 0, proc.stderr
    assert read_sorted(tmp_path / "True").equals(read_sorted(tmp_path / "False"))
    assert read_sorted(tmp_path / "True").num_rows == 18


def test_rows_are_grouped_by_the_prefix_they_share():
    from fastserve.pipeline.models.decoding import prefix_groups

    head = list(range(100, 120))
    rows = [head + [1, 2], head + [1, 3, 4], [7] * 30, head + [5], head[:10]]
    # the three rows sharing 20 tokens go after their common prefix, the others whole
    assert prefix_groups(rows, [], 16) == [((*head,), [0, 1, 3]), ((), [2, 4])]
    # a known prefix is taken first: the longest that leaves a row a token of its own
    known = [(*head, 1), (*head,)]
    assert prefix_groups(rows, known, 16) == [((*head, 1), [0, 1]), ((*head,), [3]), ((), [2, 4])]


def test_usage_is_counted_per_row_and_in_the_totals(tmp_path, chat_gpt2, reviews):
    """Prompt and completion tokens as a hosted Batch API would bill them, and the constrained
    rows that ran out of tokens, in the summary, `status` and the report."""
    task = {"json_schema": SCHEMA, "max_new_tokens": 12, "prompt_template": "{text}"}
    proc = generate(chat_gpt2, tmp_path / "o", reviews, task)
    assert proc.returncode == 0, proc.stderr
    rows = read_sorted(tmp_path / "o").to_pylist()
    prompt, completion = (sum(r[k] for r in rows) for k in ("prompt_tokens", "generated_tokens"))
    unparsed = sum(r["parsed_ok"] is False for r in rows)
    assert unparsed > 0  # the premise: 12 tokens cut some rows short
    line = f"tokens: prompt {prompt} + completion {completion}"
    assert line in proc.stdout and f"; {unparsed} row(s) ended before" in proc.stdout
    assert line in run_cli("status", tmp_path / "o", check=True).stdout
    run_cli("report", tmp_path / "o", "--out", tmp_path / "report", check=True)
    assert line in (tmp_path / "report" / "report.md").read_text()


def test_a_messages_column_is_rendered_with_the_chat_template(tmp_path, chat_gpt2):
    """Whole chats in a list<struct<role, content>> column (no text column): the prompt is the
    chat template's rendering, as apply_chat_template gives it; a malformed chat is rejected."""
    chats = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": t}]
        for t in sample_texts(6, seed=2, max_words=10)
    ] + [[], None, [{"role": "user", "content": None}]]
    c = tmp_path / "c"
    c.mkdir()
    pq.write_table(
        pa.table({"id": [f"m{i}" for i in range(len(chats))], "chat": chats}), c / "chats.parquet"
    )
    proc = generate(chat_gpt2, tmp_path / "o", c, {"messages_column": "chat", "max_new_tokens": 6})
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(chat_gpt2)
    prompts = [
        tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]
        for chat in chats[:6]
    ]
    want = hf_generate_constrained(chat_gpt2, prompts, [6] * 6, grammar=None)
    got = by_id(tmp_path / "o")
    assert sorted(got) == [f"m{i}" for i in range(6)]
    for i, (ids, new) in enumerate(zip(prompts, want, strict=True)):
        assert got[f"m{i}"]["prompt_tokens"] == len(ids)
        assert got[f"m{i}"]["generated"] == tok.decode(new, skip_special_tokens=True)
    rejected = {r["id"]: r["reason"] for r in read_sorted(tmp_path / "o" / "_rejected").to_pylist()}
    assert rejected == {"m6": "bad_value", "m7": "null_text", "m8": "bad_value"}


def test_template_fields_in_format_specs_and_rows_a_format_does_not_fit(
    tmp_path, chat_gpt2, reviews
):
    """{text:{width}} reads the width column too; a format the row's value cannot take ({x:d} on
    a string) rejects that row with the reason, never the shard."""
    c = tmp_path / "c"
    c.mkdir()
    rows = pq.read_table(reviews / "reviews.parquet").to_pylist()
    pq.write_table(
        pa.table(
            {
                "id": [r["id"] for r in rows],
                "text": [r["text"] for r in rows],
                "product": [r["product"] or "pen" for r in rows],
                "width": ["8" if i % 3 else "x" for i in range(len(rows))],
            }
        ),
        c / "w.parquet",
    )
    task = {"prompt_template": "{product:>{width}}: {text}", "max_new_tokens": 4}
    proc = generate(chat_gpt2, tmp_path / "o", c, task)
    assert proc.returncode == 0, proc.stderr
    assert read_sorted(tmp_path / "o").num_rows == 16
    rejected = read_sorted(tmp_path / "o" / "_rejected").to_pylist()
    assert len(rejected) == 8 and all("does not fit this row" in r["detail"] for r in rejected)


def test_a_stop_string_ends_a_constrained_row_and_it_is_not_parsed_ok(tmp_path, chat_gpt2, reviews):
    task = {"json_schema": SCHEMA, "stop": ['"'], "max_new_tokens": 30}
    assert generate(chat_gpt2, tmp_path / "o", reviews, task).returncode == 0
    rows = read_sorted(tmp_path / "o").to_pylist()
    assert len(rows) == 24
    for r in rows:  # every JSON object here holds a quote: the stop string ends each row first
        assert r["finish_reason"] == "stop" and r["generated"] == "{" and r["parsed_ok"] is False
