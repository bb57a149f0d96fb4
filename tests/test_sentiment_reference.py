"""Invariant 4: the sentiment task equals transformers' text-classification pipeline, row by row."""

import pytest

from fastserve.pipeline.config import ModelConfig, TaskConfig
from fastserve.pipeline.tasks.sentiment import SentimentTask
from fastserve.pipeline.testing import sample_texts

from reference import pipeline_sentiment


def assert_same(out, ref, indices):
    assert out.kept == indices
    labels_seen = set()
    for k, (label, score, probs) in enumerate(ref):
        assert out.columns["label"][k] == label
        assert out.columns["score"][k] == pytest.approx(score, abs=1e-5)
        got = dict(out.columns["probabilities"][k])
        assert got.keys() == probs.keys()
        for name, p in probs.items():
            assert got[name] == pytest.approx(p, abs=1e-5)
        labels_seen.add(label)
    return labels_seen


def test_labels_and_scores_equal_the_pipeline(classifier):
    texts = sample_texts(120, seed=11)
    out = SentimentTask(ModelConfig(path=str(classifier)), TaskConfig(batch_size=16)).process(texts)
    seen = assert_same(out, pipeline_sentiment(classifier, texts), list(range(len(texts))))
    assert len(seen) >= 2, "the tiny model must give varied labels, or this test proves little"
    assert not any(out.columns["truncated"])


@pytest.mark.parametrize("batch_size,max_tokens", [(1, 0), (5, 0), (64, 0), (512, 40), (512, 300)])
def test_results_do_not_depend_on_batch_size_or_token_budget(classifier, batch_size, max_tokens):
    texts = sample_texts(40, seed=3)
    base = SentimentTask(
        ModelConfig(path=str(classifier)), TaskConfig(batch_size=40, max_tokens=0)
    ).process(texts)
    out = SentimentTask(
        ModelConfig(path=str(classifier)), TaskConfig(batch_size=batch_size, max_tokens=max_tokens)
    ).process(texts)
    assert out.columns["label"] == base.columns["label"]
    assert out.columns["score"] == pytest.approx(base.columns["score"], abs=1e-6)


def test_over_long_rows_are_truncated_like_the_pipeline_and_flagged(classifier):
    texts = sample_texts(6, seed=2, min_words=80, max_words=120) + sample_texts(4, seed=4)
    out = SentimentTask(ModelConfig(path=str(classifier)), TaskConfig()).process(texts)
    assert out.columns["truncated"] == [True] * 6 + [False] * 4
    assert_same(
        out, pipeline_sentiment(classifier, texts, truncation=True, max_length=64), list(range(10))
    )


def test_over_long_rows_rejected_on_request(classifier):
    texts = sample_texts(3, seed=2, min_words=80, max_words=120) + sample_texts(2, seed=4)
    out = SentimentTask(ModelConfig(path=str(classifier)), TaskConfig(on_long="reject")).process(
        texts
    )
    assert out.kept == [3, 4]
    assert [(i, r) for i, r, _ in out.rejected] == [
        (0, "too_long"),
        (1, "too_long"),
        (2, "too_long"),
    ]


def test_out_of_memory_halves_the_batch_and_a_row_that_never_fits_is_rejected(classifier):
    """The GPU's out-of-memory error, raised at the model call (the seam) by batch size: a batch
    over 4 rows, or any batch holding the longest row, does not fit."""
    import torch

    from fastserve.pipeline.tasks.encoding import EncoderRows

    task = SentimentTask(ModelConfig(path=str(classifier)), TaskConfig(batch_size=16))
    texts = sample_texts(20, seed=5)
    rows = EncoderRows(task.loaded.tokenizer, texts, task.max_length, "truncate")
    longest = max(range(20), key=lambda i: rows.enc.lengths[i])
    width = rows.enc.lengths[longest]

    def model(inputs):
        n, t = inputs["input_ids"].shape
        if n > 4 or t == width:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return inputs["input_ids"][:, 0]

    done = [
        i
        for batch, _ in rows.run(model, TaskConfig(batch_size=16, max_tokens=0), "cpu")
        for i in batch
    ]
    assert sorted(done + [r[0] for r in rows.rejected]) == list(range(20))  # nothing lost
    assert [r[:2] for r in rows.rejected] == [
        (i, "oom") for i in range(20) if rows.enc.lengths[i] == width
    ]
