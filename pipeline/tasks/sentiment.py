"""sentiment: any sequence classifier; label, score and the probability of every label.

Scores follow transformers' text-classification pipeline: softmax over labels, sigmoid for a
single-logit or multi-label model, raw logits for regression.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig, TaskConfig
from .base import ModelTask, TaskOutput
from .encoding import EncoderRows, model_max_length


class SentimentTask(ModelTask):
    name = "sentiment"

    def __init__(self, model_cfg: ModelConfig, task_cfg: TaskConfig):
        super().__init__(model_cfg, task_cfg)
        config = self.loaded.model.config
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        self.max_length = task_cfg.max_length or model_max_length(self.loaded.tokenizer, config)
        if config.problem_type == "regression":
            self.activation = "none"
        elif config.problem_type == "multi_label_classification" or config.num_labels == 1:
            self.activation = "sigmoid"
        else:
            self.activation = "softmax"

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.activation == "softmax":
            return torch.softmax(logits, dim=-1)
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        return logits

    def process(self, texts: list[str], ids=None, extra=None) -> TaskOutput:
        rows_in = EncoderRows(self.loaded.tokenizer, texts, self.max_length, self.cfg.on_long)
        enc, rejected = rows_in.enc, rows_in.rejected
        probs: dict[int, list[float]] = {}

        def classify(inputs):
            return self._scores(self.loaded.model(**inputs).logits).cpu()

        with torch.inference_mode():
            for rows, scores in rows_in.run(classify, self.cfg, self.loaded.device):
                for i, s in zip(rows, scores.tolist(), strict=True):
                    probs[i] = s
        kept = sorted(probs)
        best = [max(range(len(self.labels)), key=lambda k, p=probs[i]: p[k]) for i in kept]
        return TaskOutput(
            kept=kept,
            columns={
                "label": [self.labels[b] for b in best],
                "score": [probs[i][b] for i, b in zip(kept, best, strict=True)],
                "probabilities": [list(zip(self.labels, probs[i], strict=True)) for i in kept],
                "truncated": [enc.truncated[i] for i in kept],
            },
            rejected=rejected,
            tokens=sum(enc.lengths[i] for i in kept),
        )
