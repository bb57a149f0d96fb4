"""classify: zero-shot classification equals transformers' zero-shot-classification pipeline."""

import json

import pyarrow.parquet as pq
import pytest

from fastserve.pipeline.testing import infer_args, sample_texts, toml_text, write_texts
from fastserve.pipeline.testing.models import build_classifier

from conftest import read_sorted, run_cli

LABELS = ["price", "quality", "delivery", "service"]


@pytest.fixture(scope="module")
def nli(tmp_path_factory):
    """A tiny random NLI model: three classes, entailment in the middle (as many real ones)."""
    folder = build_classifier(tmp_path_factory.mktemp("models") / "nli", num_labels=3, seed=3)
    config = json.loads((folder / "config.json").read_text())
    names = ["contradiction", "entailment", "neutral"]
    config["id2label"] = {str(i): n for i, n in enumerate(names)}
    config["label2id"] = {n: i for i, n in enumerate(names)}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def reference(model, texts, labels, multi_label, template):
    from transformers import pipeline

    pipe = pipeline("zero-shot-classification", model=str(model), device="cpu")
    out = []
    for t in texts:
        r = pipe(t, candidate_labels=labels, multi_label=multi_label, hypothesis_template=template)
        out.append(dict(zip(r["labels"], r["scores"], strict=True)))
    return out


@pytest.mark.parametrize("multi_label", [False, True], ids=["single", "multi"])
def test_zero_shot_equals_the_pipeline(tmp_path, nli, multi_label):
    texts = sample_texts(30, seed=8, max_words=25)
    write_texts(tmp_path / "c", texts, files=2)
    task = {"name": "classify", "labels": LABELS, "multi_label": multi_label,
            "hypothesis_template": "This review is about {}."}  # fmt: skip
    (tmp_path / "job.toml").write_text(toml_text({"task": task}))
    proc = run_cli(
        *infer_args(nli, tmp_path / "out", tmp_path / "c", task="classify",
                    extra=["--config", tmp_path / "job.toml", "--batch-size", "7"]),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = read_sorted(tmp_path / "out").to_pylist()
    want = reference(nli, texts, LABELS, multi_label, task["hypothesis_template"])
    assert len(got) == 30
    ids = pq.read_table(tmp_path / "c").column("id").to_pylist()
    for row, i in zip(got, sorted(range(30), key=lambda i: ids[i]), strict=True):
        scores = dict(row["scores"])
        assert list(scores) == LABELS
        for label in LABELS:
            assert scores[label] == pytest.approx(want[i][label], abs=1e-5)
        assert row["label"] == max(want[i], key=want[i].get)
    if not multi_label:
        assert all(sum(dict(r["scores"]).values()) == pytest.approx(1, abs=1e-5) for r in got)


def test_classify_options_are_checked(tmp_path, nli):
    write_texts(tmp_path / "c", ["a text"])
    for task, needle in (
        ({"name": "classify"}, "task classify needs task.labels"),
        (
            {"name": "classify", "labels": ["a"], "hypothesis_template": "About it."},
            "exactly one {}",
        ),
        (
            {"name": "classify", "labels": ["a"], "hypothesis_template": "{} and {}"},
            "exactly one {}",
        ),
        ({"name": "classify", "labels": ["a", "b", "a"]}, "names a label twice"),
        ({"name": "sentiment", "labels": ["a"]}, "only classify takes them"),
    ):
        (tmp_path / "job.toml").write_text(toml_text({"task": task}))
        proc = run_cli(*infer_args(nli, tmp_path / "o", tmp_path / "c", task=task["name"],
                                   extra=["--config", tmp_path / "job.toml"]))  # fmt: skip
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


def test_a_model_without_an_entailment_label_is_refused(tmp_path):
    folder = build_classifier(tmp_path / "not-nli", num_labels=3)
    write_texts(tmp_path / "c", ["a text"])
    (tmp_path / "job.toml").write_text(toml_text({"task": {"name": "classify", "labels": ["a"]}}))
    proc = run_cli(*infer_args(folder, tmp_path / "o", tmp_path / "c", task="classify",
                               extra=["--config", tmp_path / "job.toml"]))  # fmt: skip
    assert proc.returncode == 2 and "needs an NLI model" in proc.stderr, proc.stderr
