"""rerank: a relevance score per pair of texts from a cross-encoder, which reads both at once
(the text column holds the first text, the query; task.text_pair_column the second, the passage;
or, with task.candidates, each query's items in a recommend run folder, ranked again).

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
        if self.cfg.candidates:
            return self._candidates(texts, ids or [])
        seconds = (extra or {})[self.cfg.text_pair_column]
        bad = {}
        for i, s in enumerate(seconds):
            if s is None:
                bad[i] = (i, "null_pair", f"the {self.cfg.text_pair_column} column is null")
            elif not str(s).strip():
                bad[i] = (i, "empty_pair", f"the {self.cfg.text_pair_column} text is empty")
        rows = [i for i in range(len(texts)) if i not in bad]
        scores, truncated, tokens, rejected = self.score(
            [texts[i] for i in rows], [str(seconds[i]) for i in rows]
        )
        for j, reason, detail in rejected:
            bad[rows[j]] = (rows[j], reason, detail)
        done = sorted(scores)
        return TaskOutput(
            kept=[rows[j] for j in done],
            columns={
                "score": [scores[j] for j in done],
                "truncated": [truncated[j] for j in done],
                "item_id": [None] * len(done),
                "rank": [None] * len(done),
            },
            rejected=sorted(bad.values()),
            tokens=tokens,
        )

    def score(self, firsts: list[str], seconds: list[str]):
        """({pair: score}, truncated per pair, tokens read, rejected pairs) for the pairs."""
        rows_in = EncoderRows(
            self.loaded.tokenizer,
            firsts,
            self.max_length,
            self.cfg.on_long,
            pairs=seconds,
            truncation="longest_first",
        )

        def score(inputs):
            logits = self.loaded.model(**inputs).logits.float()[:, 0]
            return (torch.sigmoid(logits) if self.activation == "sigmoid" else logits).cpu()

        scores: dict[int, float] = {}
        with torch.inference_mode():
            for batch, out in rows_in.run(score, self.cfg, self.loaded.device):
                scores.update(zip(batch, out.tolist(), strict=True))
        enc = rows_in.enc
        return scores, enc.truncated, sum(enc.lengths[j] for j in scores), rows_in.rejected

    def _candidates(self, texts: list[str], ids: list[str]) -> TaskOutput:
        """Each query with its items in the recommend run task.candidates, ranked again by the
        cross-encoder (score descending, ties by item id)."""
        from ..candidates import candidates_of

        items, item_texts = candidates_of(self.cfg, ids)
        bad, pairs = {}, []
        for i, qid in enumerate(ids):
            mine = items.get(qid, [])
            lost = [x for x in mine if item_texts.get(x) is None]
            if not mine:
                bad[i] = (
                    i,
                    "no_candidates",
                    f"the recommend run {self.cfg.candidates} has no items for it",
                )
            elif lost:
                bad[i] = (
                    i,
                    "missing_item",
                    f"item {lost[0]!r} has no text in {self.cfg.catalogue}",
                )
            else:
                pairs += [(i, x) for x in mine]
        scores, truncated, tokens, rejected = self.score(
            [texts[i] for i, _ in pairs], [item_texts[x] for _, x in pairs]
        )
        for j, reason, detail in rejected:  # a pair cut off (on_long = reject) takes its query
            i = pairs[j][0]
            bad.setdefault(i, (i, reason, f"with item {pairs[j][1]!r}: {detail}"))
        by_query: dict[int, list[int]] = {}
        for j, (i, _) in enumerate(pairs):
            if i not in bad:
                by_query.setdefault(i, []).append(j)
        kept = sorted(by_query)
        order = [sorted(by_query[i], key=lambda j: (-scores[j], pairs[j][1])) for i in kept]
        flat = [j for js in order for j in js]
        return TaskOutput(
            kept=kept,
            columns={
                "score": [scores[j] for j in flat],
                "truncated": [truncated[j] for j in flat],
                "item_id": [pairs[j][1] for j in flat],
                "rank": [r + 1 for js in order for r in range(len(js))],
            },
            rejected=sorted(bad.values()),
            tokens=tokens,
            per_row=[len(js) for js in order],
        )
