"""rerank: a relevance score per pair of texts from a cross-encoder, which reads both at once
(the text column holds the first text, the query; task.text_pair_column the second, the passage).

Equal to `sentence_transformers.CrossEncoder.predict`: the pair truncated longest-first to the
model's max length, its one logit through the folder's activation (sigmoid unless the folder's
config says otherwise).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig, TaskConfig
from ..errors import ModelError
from .base import ModelTask, TaskOutput
from .encoding import EncoderRows, model_max_length


def activation(config) -> str:
    """sigmoid or identity: the folder's sentence-transformers activation, else sigmoid (as a
    CrossEncoder of one label)."""
    st = getattr(config, "sentence_transformers", None) or {}
    path = st.get("activation_fn") or getattr(config, "sbert_ce_default_activation_function", "")
    return "identity" if str(path).endswith("Identity") else "sigmoid"


class RerankTask(ModelTask):
    name = "rerank"

    def __init__(self, model_cfg: ModelConfig, task_cfg: TaskConfig):
        super().__init__(model_cfg, task_cfg)
        config = self.loaded.model.config
        if config.num_labels != 1:
            raise ModelError(
                f"model folder {model_cfg.path} has {config.num_labels} labels; task rerank needs a "
                "cross-encoder with one relevance output (for a labelled pair classifier, use "
                "task classify or sentiment)"
            )
        self.max_length = task_cfg.max_length or model_max_length(self.loaded.tokenizer, config)
        self.activation = activation(config)

    def process(self, texts: list[str], ids=None, extra=None) -> TaskOutput:
        seconds = (extra or {})[self.cfg.text_pair_column]
        bad = {}
        for i, s in enumerate(seconds):
            if s is None:
                bad[i] = (i, "null_pair", f"the {self.cfg.text_pair_column} column is null")
            elif not str(s).strip():
                bad[i] = (i, "empty_pair", f"the {self.cfg.text_pair_column} text is empty")
        rows = [i for i in range(len(texts)) if i not in bad]
        rows_in = EncoderRows(
            self.loaded.tokenizer,
            [texts[i] for i in rows],
            self.max_length,
            self.cfg.on_long,
            pairs=[str(seconds[i]) for i in rows],
            truncation="longest_first",
        )

        def score(inputs):
            logits = self.loaded.model(**inputs).logits.float()[:, 0]
            return (torch.sigmoid(logits) if self.activation == "sigmoid" else logits).cpu()

        scores: dict[int, float] = {}
        with torch.inference_mode():
            for batch, out in rows_in.run(score, self.cfg, self.loaded.device):
                scores.update(zip(batch, out.tolist(), strict=True))
        for j, reason, detail in rows_in.rejected:
            bad[rows[j]] = (rows[j], reason, detail)
        done = sorted(scores)
        enc = rows_in.enc
        return TaskOutput(
            kept=[rows[j] for j in done],
            columns={
                "score": [scores[j] for j in done],
                "truncated": [enc.truncated[j] for j in done],
            },
            rejected=sorted(bad.values()),
            tokens=sum(enc.lengths[j] for j in done),
        )
