"""The task and architecture registry: one line per task or architecture, and it holds together."""

import pytest

from fastserve.pipeline import registry, schemas
from fastserve.pipeline.config import TASKS
from fastserve.pipeline.models.hf import KIND_NAMES
from fastserve.pipeline.training.config import ARCHS, TrainModelConfig


@pytest.mark.parametrize("name", sorted(registry.TASKS))
def test_every_task_has_its_class_schema_and_model_kind(name):
    spec = registry.TASKS[name]
    cls = spec.load()
    assert cls.name == name and callable(cls.process)
    assert spec.kind in KIND_NAMES
    assert schemas.load(spec.schema).name == name


@pytest.mark.parametrize("name", sorted(registry.ARCHS))
def test_every_architecture_builds_and_says_what_it_is(name):
    spec = registry.ARCHS[name]
    model = spec.build(TrainModelConfig(arch=name, n_layer=1, n_head=2, n_embd=8, block_size=16),
                       vocab_size=40, labels=["a", "b"])  # fmt: skip
    assert model.arch == name and isinstance(model, spec.model_class())
    assert spec.kind in KIND_NAMES and (spec.decoder is not None) == (spec.kind == "causal-lm")


def test_the_names_the_configs_accept_come_from_the_registry():
    assert TASKS == tuple(registry.TASKS) and ARCHS == tuple(registry.ARCHS)
