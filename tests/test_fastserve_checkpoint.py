"""FastServe's own checkpoints: safetensors + JSON config + tokenizer.json, served by `infer`."""

import json

import pytest
import torch

from fastserve.pipeline.config import ModelConfig, TaskConfig
from fastserve.pipeline.errors import ModelError
from fastserve.pipeline.models.checkpoint import load_checkpoint
from fastserve.pipeline.tasks import get_task
from fastserve.pipeline.testing import sample_texts
from fastserve.pipeline.testing.models import build_fastserve_gpt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_fastserve_gpt(tmp_path_factory.mktemp("m") / "gpt")


def greedy_without_cache(model, tok, prompt, n, eos):
    """The plainest reference: recompute the whole sequence for every new token, one row alone."""
    ids = tok(prompt)["input_ids"]
    new = []
    for _ in range(n):
        with torch.no_grad():
            t = int(model(torch.tensor([ids + new]))[0, -1].argmax())
        if t == eos:
            break
        new.append(t)
    return new


def test_checkpoint_round_trip_and_cached_batched_generation(ckpt):
    model, tok, meta = load_checkpoint(ckpt)
    assert meta["arch"] == "gpt" and (ckpt / "model.safetensors").exists()
    eos = tok.eos_token_id
    prompts = sample_texts(20, seed=1, max_words=10)
    limits = [(i % 4) * 5 + 2 for i in range(20)]
    ref = [
        greedy_without_cache(model, tok, p, n, eos) for p, n in zip(prompts, limits, strict=True)
    ]
    assert len({tuple(r) for r in ref}) > 5, (
        "the tiny model should not say the same thing to every prompt"
    )
    get_task.cache_clear()
    for bs in (1, 6, 20):
        task = get_task(
            ModelConfig(path=str(ckpt)),
            TaskConfig(name="generate", batch_size=bs, max_new_tokens_column="n"),
        )
        out = task.process(prompts, [f"r{i}" for i in range(20)], {"n": limits})
        assert out.columns["generated"] == [tok.decode(r, skip_special_tokens=True) for r in ref]
        assert out.columns["generated_tokens"] == [len(r) for r in ref]


def test_checkpoint_of_the_wrong_kind_or_format(ckpt, tmp_path):
    get_task.cache_clear()
    with pytest.raises(
        ModelError, match="FastServe gpt checkpoint; the task needs a sequence classifier"
    ):
        get_task(ModelConfig(path=str(ckpt)), TaskConfig(name="sentiment"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "fastserve.json").write_text(
        json.dumps({"format": "fastserve-checkpoint", "version": 99, "arch": "gpt"})
    )
    with pytest.raises(ModelError, match="version 1"):
        load_checkpoint(bad)
