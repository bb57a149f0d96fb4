"""qa: extractive question answering equals a plain one-row-at-a-time reference, finds the
answers a trained model knows, and sets rows without a usable question aside."""

import math
import random
from functools import cache

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastserve.pipeline.testing import infer_args, sample_texts, toml_text
from fastserve.pipeline.testing.models import build_qa, fit_qa

from conftest import read_sorted, run_cli


@pytest.fixture(scope="module")
def qa_model(tmp_path_factory):
    """A tiny random QA model (its tokenizer cuts review words into word pieces)."""
    return build_qa(tmp_path_factory.mktemp("models") / "qa", seed=5)


def write_rows(folder, texts, questions=None, files=1):
    """id, text (and question) over `files` Parquet files; ids r0000..."""
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(texts) // files)
    for f in range(files):
        rows = range(f * per, min(len(texts), (f + 1) * per))
        table = {"id": [f"r{i:04d}" for i in rows], "text": [texts[i] for i in rows]}
        if questions is not None:
            table["question"] = pa.array([questions[i] for i in rows], pa.string())
        pq.write_table(pa.table(table), folder / f"part-{f}.parquet")


def run_qa(tmp_path, model, task, *extra, corpus="c", out="out"):
    (tmp_path / "job.toml").write_text(toml_text({"task": {"name": "qa", **task}}))
    return run_cli(*infer_args(model, tmp_path / out, tmp_path / corpus, task="qa",
                               extra=["--config", tmp_path / "job.toml", *extra]))  # fmt: skip


@cache
def load(model_dir):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok, AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()


def reference(model_dir, question, context, max_length, doc_stride, k, longest, impossible):
    """One row alone, every window alone, every span scored in plain Python: the pipeline's
    probabilities (softmax over the window's context tokens and [CLS]), best distinct spans
    first, no answer as [CLS] x [CLS] (lowest over the windows). Also the first window's last
    character, to tell answers found in a later window."""
    import torch

    tok, model = load(model_dir)
    q_tokens = len(tok(question, add_special_tokens=False)["input_ids"])
    room = max_length - tok.num_special_tokens_to_add(pair=True) - q_tokens
    enc = tok(question, context, truncation="only_second", max_length=max_length,
              stride=doc_stride if doc_stride < room else room // 2, return_overflowing_tokens=True,
              return_offsets_mapping=True)  # fmt: skip
    spans, null = {}, 1.0
    for w, ids in enumerate(enc["input_ids"]):
        with torch.no_grad():
            out = model(**{name: torch.tensor([enc[name][w]]) for name in tok.model_input_names})
        seq = enc.sequence_ids(w)
        allowed = [s == 1 or t == tok.cls_token_id for s, t in zip(seq, ids, strict=True)]

        def softmax(logits, allowed=allowed):
            top = max(x for x, a in zip(logits, allowed, strict=True) if a)
            e = [math.exp(x - top) if a else 0.0 for x, a in zip(logits, allowed, strict=True)]
            return [x / sum(e) for x in e]

        p_start, p_end = softmax(out.start_logits[0].tolist()), softmax(out.end_logits[0].tolist())
        null = min(null, p_start[0] * p_end[0])
        context_tokens = [t for t, s in enumerate(seq) if s == 1]
        offsets = enc["offset_mapping"][w]
        for s in context_tokens:
            for e in context_tokens:
                if s <= e < s + longest:
                    span = (offsets[s][0], offsets[e][1])
                    spans[span] = max(spans.get(span, 0.0), p_start[s] * p_end[e])
    answers = [{"answer": context[a:b], "score": p, "start": a, "end": b}
               for (a, b), p in spans.items()]  # fmt: skip
    if impossible:
        answers.append({"answer": None, "score": null, "start": None, "end": None})
    first_window_end = max(b for (_, b), s in zip(enc["offset_mapping"][0], enc.sequence_ids(0),
                                                  strict=True) if s == 1)  # fmt: skip
    return sorted(answers, key=lambda a: -a["score"])[:k], len(enc["input_ids"]), first_window_end


@pytest.mark.parametrize("asked", ["question_column", "question"])
def test_batched_windows_equal_the_one_row_reference(tmp_path, qa_model, asked):
    rng = random.Random(7)
    contexts = sample_texts(24, seed=11, min_words=3, max_words=70)
    questions = sample_texts(24, seed=12, min_words=2, max_words=8)
    questions[5] = " ".join(["great"] * 22)  # leaves 7 context tokens a window: stride 3, not 8
    if asked == "question":
        questions = ["what was good about it?"] * 24
    task = {"k": 3, "max_length": 32, "doc_stride": 8, "max_answer_length": 6,
            "handle_impossible": asked == "question_column"}  # fmt: skip
    task.update({asked: "question"} if asked == "question_column" else {"question": questions[0]})
    write_rows(tmp_path / "c", contexts, questions if asked == "question_column" else None, 2)
    proc = run_qa(tmp_path, qa_model, task, "--batch-size", rng.choice([3, 5]))
    assert proc.returncode == 0, proc.stderr

    got = read_sorted(tmp_path / "out").to_pylist()
    assert [r["id"] for r in got] == [f"r{i:04d}" for i in range(24)]
    later = nulls = 0
    for i, row in enumerate(got):
        want, windows, first_end = reference(qa_model, questions[i], contexts[i], 32, 8, 3, 6,
                                             task["handle_impossible"])  # fmt: skip
        assert row["windows"] == windows
        assert len(row["answers"]) == len(want) == 3
        for a, b in zip(row["answers"], want, strict=True):
            assert (a["answer"], a["start"], a["end"]) == (b["answer"], b["start"], b["end"]), i
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        best = want[0]
        assert (row["answer"], row["start"], row["end"]) == (
            best["answer"],
            best["start"],
            best["end"],
        )
        assert row["score"] == pytest.approx(best["score"], abs=1e-5)
        if best["answer"] is not None:
            assert contexts[i][row["start"] : row["end"]] == row["answer"]
            later += row["start"] >= first_end  # found only in a second (or later) window
        nulls += best["answer"] is None
    assert sum(r["windows"] > 1 for r in got) >= 10
    assert later >= 3
    assert nulls >= 1 if task["handle_impossible"] else nulls == 0


OBJECTS = "kettle lamp chair table clock mirror sofa door window bottle basket candle".split()
VALUES = {
    "colour": "red blue green yellow black white".split(),
    "size": "small large tiny huge".split(),
    "material": "wood steel glass stone".split(),
}


def facts(rng):
    """A context of two or three facts ("The colour of the kettle is blue. The size of the lamp
    is small."), a question about one of them, and the answer's character span. Values are
    sometimes capitalised and sentences sometimes two spaces apart, so an answer cut from the
    wrong characters shows."""
    attrs = rng.sample(list(VALUES), rng.randint(2, 3))
    context, spans = "", []
    for obj, attr in zip(rng.sample(OBJECTS, len(attrs)), attrs, strict=True):
        value = rng.choice(VALUES[attr])
        value = value.title() if rng.random() < 0.5 else value
        context += f"The {attr} of the {obj} is "
        spans.append((f"What is the {attr} of the {obj}?", len(context), len(context) + len(value)))
        context += value + rng.choice([". ", ".  ", "; "])
    return (*rng.choice(spans), context.rstrip())


def test_a_trained_model_finds_the_answers(tmp_path):
    rng = random.Random(0)
    train = [facts(rng) for _ in range(4000)]
    seen = {(q, c) for q, _, _, c in train}
    held_out = [f for f in (facts(random.Random(i)) for i in range(1000, 1300))
                if (f[0], f[3]) not in seen][:200]  # fmt: skip
    folder = build_qa(tmp_path / "facts", texts=[f"{q} {c}" for q, _, _, c in train],
                      hidden_size=64, initializer_range=0.1)  # fmt: skip
    assert fit_qa(folder, train) < 0.05
    write_rows(tmp_path / "c", [c for *_, c in held_out], [q for q, *_ in held_out])
    proc = run_qa(tmp_path, folder, {"question_column": "question"}, "--executor", "serial")
    assert proc.returncode == 0, proc.stderr
    got = read_sorted(tmp_path / "out").to_pylist()
    assert len(got) == len(held_out) == 200
    right = 0
    for row, (_, start, end, context) in zip(got, held_out, strict=True):
        assert row["windows"] == 1 and len(row["answers"]) == 1
        right += (row["answer"], row["start"], row["end"]) == (context[start:end], start, end)
    assert right >= 0.95 * len(held_out), f"{right} of {len(held_out)} answers right"


def test_rows_without_a_usable_question_are_set_aside(tmp_path, qa_model):
    tok, _ = load(qa_model)
    contexts = sample_texts(10, seed=3, min_words=5, max_words=40)
    words = ["great"] * 45
    assert len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) == 45
    questions = ["was it good?"] * 10
    reasons = {0: "null_question", 1: "empty_question", 2: "empty_question",
               3: "question_too_long", 4: "question_too_long", 6: "null_text"}  # fmt: skip
    questions[0], questions[1], questions[2] = None, "", " \n "
    questions[3] = " ".join(words)  # over max_question_length (40)
    questions[4] = " ".join(words[:30])  # 30 + 3 special tokens: no room for context in 32
    questions[5] = " ".join(words[:28])  # room for one context token a window: kept
    contexts[6] = None
    write_rows(tmp_path / "c", contexts, questions, files=2)
    task = {"question_column": "question", "max_length": 32, "max_question_length": 40}
    proc = run_qa(tmp_path, qa_model, task, "--executor", "serial")
    assert proc.returncode == 0, proc.stderr
    assert "rows in 10 = out 4 + rejected 6" in proc.stdout + proc.stderr

    got = read_sorted(tmp_path / "out").to_pylist()
    assert [r["id"] for r in got] == [f"r{i:04d}" for i in range(10) if i not in reasons]
    assert got[0]["windows"] == len(tok(contexts[5], add_special_tokens=False)["input_ids"])
    rejected = read_sorted(tmp_path / "out" / "_rejected").to_pylist()
    assert {int(r["id"][1:]): r["reason"] for r in rejected} == reasons
    details = {int(r["id"][1:]): r["detail"] for r in rejected}
    assert "'question' is null" in details[0]
    assert "45 tokens; task.max_question_length is 40" in details[3]
    assert "30 tokens; no context token fits in max_length 32" in details[4]

    write_rows(tmp_path / "none", ["a text", "another"], [None, " "])  # no row left to answer
    proc = run_qa(tmp_path, qa_model, task, "--executor", "serial", corpus="none", out="out2")
    assert proc.returncode == 0, proc.stderr
    assert "rows in 2 = out 0 + rejected 2" in proc.stdout + proc.stderr


def test_qa_without_a_question_is_a_config_error(tmp_path, qa_model):
    write_rows(tmp_path / "c", ["The lamp is small."], ["What size is the lamp?"])
    needle = "task qa needs the question"
    for task in ({}, {"question": "What size?", "question_column": "question"}):
        proc = run_qa(tmp_path, qa_model, task)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count(needle) == 1 and "Traceback" not in proc.stderr, proc.stderr
    proc = run_cli(*infer_args(qa_model, tmp_path / "o", tmp_path / "c", task="qa"))
    assert proc.returncode == 2 and proc.stderr.count(needle) == 1, proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_a_long_context_under_a_long_question_moves_on_by_half_a_window(tmp_path, qa_model):
    """doc_stride (128) larger than a window's room for context (32 tokens, a long question):
    windows overlap by half their room, so a long context takes ~2 x tokens / room windows, not
    one window per token."""
    from transformers import AutoTokenizer

    context = " ".join(sample_texts(40, seed=3, min_words=10, max_words=20))
    question = " ".join(["great"] * 20)
    write_rows(tmp_path / "c", [context], [question])
    proc = run_qa(tmp_path, qa_model, {"question_column": "question", "max_length": 32},
                  "--executor", "serial")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(qa_model)
    n = len(tok(context, add_special_tokens=False)["input_ids"])
    room = 32 - 3 - len(tok(question, add_special_tokens=False)["input_ids"])
    windows = read_sorted(tmp_path / "out").column("windows")[0].as_py()
    assert n > 20 * room and windows <= 2 * n // room + 2, (n, room, windows)
