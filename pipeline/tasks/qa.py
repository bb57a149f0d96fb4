"""qa: extractive question answering with a *ForQuestionAnswering model, as transformers' (4.x)
question-answering pipeline does it; the row's text is the context.

Question and context are tokenized as a pair (question first, unless the tokenizer pads on the
left); a context too long for max_length becomes overlapping windows sharing doc_stride tokens
(half a window where a long question leaves less room than doc_stride). All windows of a chunk run in length-sorted,
padded batches. Per window, the start and the end logits are softmaxed over the context tokens
and [CLS]; a span scores P(start) x P(end), with start <= end and at most max_answer_length
tokens. A row's answers are its k best distinct character spans over all windows, each scored
by its best window. With handle_impossible, no answer scores [CLS] x [CLS] (the lowest over the
windows) and wins when it beats the best span.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig, TaskConfig
from .base import ModelTask, TaskOutput
from .encoding import Encoded, EncoderRows, model_max_length

FEATURES = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class Window:
    row: int
    features: dict[str, list[int]]
    offsets: list[tuple[int, int]]
    context: list[bool]
    """Per token: part of the context (the only tokens an answer is made of)."""


class Windows(EncoderRows):
    """Windows tokenized already, served by EncoderRows' batching: length-sorted, padded batches
    within the task's limits, halved on GPU out-of-memory (a window alone that does not fit is
    rejected, reason oom)."""

    def __init__(self, tokenizer, windows: list[Window]):
        self.tokenizer, self.rejected = tokenizer, []
        features = [w.features for w in windows]
        lengths = [len(f["input_ids"]) for f in features]
        self.enc = Encoded(features=features, truncated=[False] * len(features), lengths=lengths)
        self.todo = list(range(len(windows)))


def stride(doc_stride: int, room: int) -> int:
    """The overlap of a row's windows: doc_stride, unless a window's `room` for context tokens
    is not more than that (a long question, a short max_length); then half the room, so each
    window still moves on by half a window (not one token: a long context would take as many
    windows as tokens)."""
    return doc_stride if doc_stride < room else room // 2


class QATask(ModelTask):
    name = "qa"

    def __init__(self, model_cfg: ModelConfig, task_cfg: TaskConfig):
        super().__init__(model_cfg, task_cfg)
        tok = self.loaded.tokenizer
        self.max_length = task_cfg.max_length or model_max_length(tok, self.loaded.model.config)
        self.question_first = tok.padding_side != "left"
        self.specials = tok.num_special_tokens_to_add(pair=True)

    def process(self, texts: list[str], ids=None, extra=None) -> TaskOutput:
        cfg, tok = self.cfg, self.loaded.tokenizer
        questions = [cfg.question] * len(texts) if cfg.question else extra[cfg.question_column]
        rejected, asked = self._check(questions)
        asking = [questions[i] for i in asked]
        lengths = tok(asking, add_special_tokens=False)["input_ids"] if asking else []
        by_stride: dict[int, list[int]] = {}
        for i, q in zip(asked, lengths, strict=True):
            room = self.max_length - self.specials - len(q)  # context tokens a window holds
            if len(q) > cfg.max_question_length or room < 1:
                limit = (f"task.max_question_length is {cfg.max_question_length}"
                         if len(q) > cfg.max_question_length
                         else f"no context token fits in max_length {self.max_length}")  # fmt: skip
                rejected[i] = (i, "question_too_long", f"the question is {len(q)} tokens; {limit}")
            else:
                by_stride.setdefault(stride(cfg.doc_stride, room), []).append(i)
        windows = [
            w for s, rows in by_stride.items() for w in self._windows(questions, texts, rows, s)
        ]

        batches = Windows(tok, windows)
        logits: dict[int, torch.Tensor] = {}

        def forward(inputs):
            out = self.loaded.model(**inputs)
            return torch.stack([out.start_logits, out.end_logits], dim=1).float().cpu()

        with torch.inference_mode():
            for js, out in batches.run(forward, cfg, self.loaded.device, padding_side="right"):
                for j, o in zip(js, out, strict=True):
                    logits[j] = o[:, : batches.enc.lengths[j]]
        for j, reason, detail in batches.rejected:
            rejected.setdefault(windows[j].row, (windows[j].row, reason, detail))

        of_row: dict[int, list[int]] = {}
        for j, w in enumerate(windows):
            if w.row not in rejected:
                of_row.setdefault(w.row, []).append(j)
        kept = sorted(of_row)
        answers = [
            self._answers(texts[i], [(windows[j], logits[j]) for j in of_row[i]]) for i in kept
        ]
        best = [a[0] if a else {"answer": None, "score": None, "start": None, "end": None}
                for a in answers]  # fmt: skip
        return TaskOutput(
            kept=kept,
            columns={
                **{key: [b[key] for b in best] for key in ("answer", "score", "start", "end")},
                "answers": answers,
                "windows": [len(of_row[i]) for i in kept],
            },
            rejected=sorted(rejected.values()),
            tokens=sum(batches.enc.lengths[j] for i in kept for j in of_row[i]),
        )

    def _check(self, questions) -> tuple[dict[int, tuple[int, str, str]], list[int]]:
        """Rows whose question is missing or blank (by row), and the others."""
        rejected, asked = {}, []
        column = self.cfg.question_column
        for i, q in enumerate(questions):
            if q is None:
                rejected[i] = (i, "null_question", f"the question column {column!r} is null")
            elif not isinstance(q, str):
                rejected[i] = (i, "bad_value", f"the question column {column!r} holds a "
                               f"{type(q).__name__}, not text")  # fmt: skip
            elif not q.strip():
                rejected[i] = (i, "empty_question", "the question is empty or blank")
            else:
                asked.append(i)
        return rejected, asked

    def _windows(self, questions, texts, rows: list[int], stride: int) -> list[Window]:
        """Question and context of each row in `rows`, tokenized in one call into windows."""
        qs, cs = [questions[i] for i in rows], [texts[i] for i in rows]
        enc = self.loaded.tokenizer(
            qs if self.question_first else cs,
            cs if self.question_first else qs,
            truncation="only_second" if self.question_first else "only_first",
            max_length=self.max_length,
            stride=stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=False,
        )
        context = 1 if self.question_first else 0
        keys = [k for k in FEATURES if k in enc]
        return [
            Window(
                row=rows[r],
                features={k: enc[k][j] for k in keys},
                offsets=enc["offset_mapping"][j],
                context=[s == context for s in enc.sequence_ids(j)],
            )
            for j, r in enumerate(enc["overflow_to_sample_mapping"])
        ]

    def _answers(self, text: str, windows: list[tuple[Window, torch.Tensor]]) -> list[dict]:
        """The row's k best answers, best first, over all its windows."""
        k, longest = self.cfg.k or 1, self.cfg.max_answer_length
        cls = self.loaded.tokenizer.cls_token_id
        cls = -1 if cls is None else cls
        spans: dict[tuple[int, int], float] = {}
        null = 1.0
        for w, logits in windows:
            context = torch.tensor(w.context)
            allowed = context | (torch.tensor(w.features["input_ids"]) == cls)
            probs = logits.masked_fill(~allowed, -10000.0).softmax(dim=-1)  # (start/end, tokens)
            null = min(null, float(probs[0, 0] * probs[1, 0]))
            pos = context.nonzero().flatten().tolist()  # the context tokens
            n = len(pos)
            if not n:
                continue
            scores = probs[0, pos, None] * probs[1, None, pos]  # (start, end)
            ok = torch.ones(n, n, dtype=torch.bool)
            scores = scores.masked_fill(~(ok.triu() & ~ok.triu(longest)), -1.0).flatten()
            top = scores.topk(min(k, n * n))
            for p, t in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                span = (w.offsets[pos[t // n]][0], w.offsets[pos[t % n]][1])
                if p >= 0 and p > spans.get(span, -1.0):  # -1: not a span
                    spans[span] = p
        found = [
            {"answer": text[a:b], "score": p, "start": a, "end": b} for (a, b), p in spans.items()
        ]
        if self.cfg.handle_impossible:
            found.append({"answer": None, "score": null, "start": None, "end": None})
        return sorted(found, key=lambda a: -a["score"])[:k]
