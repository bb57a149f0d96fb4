"""The one place that knows, per task, what it needs, and per architecture, what it is.

    TASKS["generate"].kind          # the kind of model the task loads: "causal-lm"
    TASKS["generate"].load()        # the task class (its module imported only now)
    ARCHS["gpt"].build(cfg, vocab)  # a FastServe model for a train job's [model] table

Adding a task means one module (a class with `process`), one schema file in data_schemas/ and one
line here; adding a FastServe architecture, one model module and one line here. This module
imports nothing of the library at import time, so configuration can read the names.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any


def load_ref(ref: str) -> Any:
    """'module:Name', the module relative to fastserve.pipeline."""
    module, name = ref.split(":")
    return getattr(import_module(f"fastserve.pipeline.{module}"), name)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    """The kind of model it loads (models/hf.py KIND_NAMES)."""
    cls: str
    """'module:Class' of the task."""
    schema: str
    """Its output table in data_schemas/ (the newest version is what it writes)."""

    def load(self) -> type:
        return load_ref(self.cls)


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            "sentiment", "sequence-classification", "tasks.sentiment:SentimentTask", "sentiment"
        ),
        TaskSpec("translate", "seq2seq-lm", "tasks.translate:TranslateTask", "translate"),
        TaskSpec("generate", "causal-lm", "tasks.generate:GenerateTask", "generate"),
        TaskSpec("embed", "encoder", "tasks.embed:EmbedTask", "embed"),
        TaskSpec("classify", "sequence-classification", "tasks.classify:ClassifyTask", "classify"),
        TaskSpec("qa", "question-answering", "tasks.qa:QATask", "qa"),
        TaskSpec("rerank", "sequence-classification", "tasks.rerank:RerankTask", "rerank"),
        TaskSpec("recommend", "encoder", "tasks.recommend:RecommendTask", "recommend"),
    )
}


@dataclass(frozen=True)
class ArchSpec:
    name: str
    kind: str
    """The kind of model infer serves a checkpoint of it as."""
    model: str
    """'module:Class' of the model; `config` of its config dataclass."""
    config: str
    attention: bool
    """Transformer blocks (tensor parallelism, attention FLOPs) rather than recurrent layers."""
    decoder: str | None = None
    """'module:Class' of generate's decoding adapter, for causal LMs."""

    def model_class(self) -> type:
        return load_ref(self.model)

    def config_class(self) -> type:
        return load_ref(self.config)

    def build(self, m, vocab_size: int, labels: list[str] | None = None):
        """A fresh model for a train job's [model] table `m` (TrainModelConfig)."""
        cfg_cls = self.config_class()
        args = {"vocab_size": vocab_size, "block_size": m.block_size, "n_layer": m.n_layer,
                "n_embd": m.n_embd, "dropout": m.dropout}  # fmt: skip
        if self.attention:
            args["n_head"] = m.n_head
        if self.kind == "sequence-classification":
            args["labels"] = list(labels or [])
        return self.model_class()(cfg_cls(**args))


ARCHS: dict[str, ArchSpec] = {
    a.name: a
    for a in (
        ArchSpec(
            "gpt",
            "causal-lm",
            "models.gpt:GPT",
            "models.gpt:GPTConfig",
            True,
            "models.decoding:GPTCausalLM",
        ),
        ArchSpec(
            "llama",
            "causal-lm",
            "models.llama:Llama",
            "models.llama:LlamaConfig",
            True,
            "models.decoding:GPTCausalLM",  # the same cached-forward interface
        ),
        ArchSpec(
            "lstm",
            "causal-lm",
            "models.lstm:LSTMLM",
            "models.lstm:LSTMConfig",
            False,
            "models.decoding:LSTMCausalLM",
        ),
        ArchSpec(
            "classifier",
            "sequence-classification",
            "models.classifier:EncoderClassifier",
            "models.classifier:ClassifierConfig",
            True,
        ),
    )  # fmt: skip
}
