"""classify: zero-shot classification with an NLI model (premise: the row's text; hypothesis:
`hypothesis_template` with each label), as transformers' zero-shot-classification pipeline does.

Single-label: a softmax of the entailment logits over the labels. Multi-label (or one label): each
label on its own, a softmax of its contradiction and entailment logits. The entailment logit is the
model's label starting with "entail" (else the last); contradiction the first (the last when
entailment is the first).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig, TaskConfig
from .base import ModelTask, TaskOutput
from .encoding import EncoderRows, model_max_length


class ClassifyTask(ModelTask):
    name = "classify"

    def __init__(self, model_cfg: ModelConfig, task_cfg: TaskConfig):
        super().__init__(model_cfg, task_cfg)
        config = self.loaded.model.config
        self.labels = list(task_cfg.labels or ())
        self.max_length = task_cfg.max_length or model_max_length(self.loaded.tokenizer, config)
        label2id = getattr(config, "label2id", None) or {}
        self.entail = next(
            (int(i) for name, i in label2id.items() if name.lower().startswith("entail")), -1
        )
        self.contra = -1 if self.entail == 0 else 0

    def process(self, texts: list[str], ids=None, extra=None) -> TaskOutput:
        n, labels, cfg = len(texts), self.labels, self.cfg
        premises = [t for t in texts for _ in labels]
        hypotheses = [cfg.hypothesis_template.format(label) for _ in texts for label in labels]
        rows_in = EncoderRows(
            self.loaded.tokenizer, premises, self.max_length, cfg.on_long, pairs=hypotheses
        )
        logits: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            for rows, out in rows_in.run(
                lambda inputs: self.loaded.model(**inputs).logits.float().cpu(),
                cfg,
                self.loaded.device,
            ):
                for j, row in zip(rows, out, strict=True):
                    logits[j] = row
        k = len(labels)
        rejected = {j // k: (j // k, reason, detail) for j, reason, detail in rows_in.rejected}
        kept = [i for i in range(n) if i not in rejected]
        scores = []
        for i in kept:
            rows = torch.stack([logits[i * k + a] for a in range(k)])  # (labels, classes)
            if cfg.multi_label or k == 1:
                pair = rows[:, [self.contra, self.entail]]
                scores.append(torch.softmax(pair, dim=-1)[:, 1].tolist())
            else:
                scores.append(torch.softmax(rows[:, self.entail], dim=-1).tolist())
        best = [max(range(k), key=s.__getitem__) for s in scores]
        truncated = rows_in.enc.truncated
        return TaskOutput(
            kept=kept,
            columns={
                "label": [labels[b] for b in best],
                "score": [s[b] for s, b in zip(scores, best, strict=True)],
                "scores": [list(zip(labels, s, strict=True)) for s in scores],
                "truncated": [any(truncated[i * k + a] for a in range(k)) for i in kept],
            },
            rejected=sorted(rejected.values()),
            tokens=sum(rows_in.enc.lengths[i * k + a] for i in kept for a in range(k)),
        )
