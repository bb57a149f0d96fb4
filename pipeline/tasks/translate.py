"""translate: encoder-decoder models (Marian, T5, BART, mBART, NLLB) through `model.generate`.

Batches are length-sorted and grouped by target language (a per-row column may give it); beam
search and greedy decoding are transformers' own, so a batch equals the rows run one at a time.
Language codes: the tokenizer's `src_lang` is set when it has one; the target code is forced as
the first generated token when the vocabulary holds it (mBART, NLLB, M2M100's `__xx__`).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..batching import ROWS_PER_CALL, length_sorted_batches
from ..config import ModelConfig, TaskConfig
from ..errors import ConfigError
from .base import ModelTask, TaskOutput
from .encoding import encode, model_max_length, pad_batch


class TranslateTask(ModelTask):
    name = "translate"

    def __init__(self, model_cfg: ModelConfig, task_cfg: TaskConfig):
        super().__init__(model_cfg, task_cfg)
        tok = self.loaded.tokenizer
        if task_cfg.source_lang and hasattr(tok, "src_lang"):
            tok.src_lang = task_cfg.source_lang
        self.max_length = task_cfg.max_length or model_max_length(tok, self.loaded.model.config)

    def forced_bos(self, lang: str | None) -> int | None:
        """The token id that starts a translation into `lang`, when the model uses one."""
        if not lang:
            return None
        tok = self.loaded.tokenizer
        for candidate in (lang, f"__{lang}__"):
            tid = tok.convert_tokens_to_ids(candidate)
            if tid is not None and tid != tok.unk_token_id:
                return tid
        if self.cfg.target_lang_column:
            return None  # a column may name languages a multilingual-by-prefix model does not code
        raise ConfigError(
            f"task.target_lang {lang!r} is not a language code of the model in {self.loaded.path}"
        )

    def process(self, texts: list[str], ids=None, extra=None) -> TaskOutput:
        cfg, tok, model = self.cfg, self.loaded.tokenizer, self.loaded.model
        langs = (
            extra[cfg.target_lang_column]
            if cfg.target_lang_column
            else [cfg.target_lang] * len(texts)
        )
        enc = encode(tok, [cfg.prefix + t for t in texts], self.max_length)
        rejected, todo = [], []
        for i in range(len(texts)):
            if cfg.on_long == "reject" and enc.truncated[i]:
                rejected.append(
                    (i, "too_long", f"longer than {self.max_length} tokens (task.on_long=reject)")
                )
            elif cfg.target_lang_column and not langs[i]:
                rejected.append((i, "bad_value", f"{cfg.target_lang_column} is null or empty"))
            else:
                todo.append(i)
        by_lang = defaultdict(list)
        for i in todo:
            by_lang[langs[i]].append(i)
        outputs: dict[int, list[int]] = {}
        special = set(tok.all_special_ids)
        with torch.inference_mode():
            for lang, group in sorted(by_lang.items(), key=lambda kv: str(kv[0])):
                bos = self.forced_bos(lang)
                for batch in length_sorted_batches(
                    [enc.lengths[i] for i in group], cfg.batch_size or ROWS_PER_CALL
                ):
                    rows = [group[b] for b in batch]
                    inputs = pad_batch(
                        [enc.features[i] for i in rows],
                        tok.pad_token_id or 0,
                        "right",
                        self.loaded.device,
                    )
                    inputs.pop("token_type_ids", None)
                    kwargs = {"forced_bos_token_id": bos} if bos is not None else {}
                    out = model.generate(
                        **inputs,
                        num_beams=cfg.num_beams,
                        do_sample=False,
                        max_new_tokens=cfg.max_new_tokens,
                        **kwargs,
                    )
                    for i, seq in zip(rows, out.tolist(), strict=True):
                        outputs[i] = [t for t in seq if t not in special]
        kept = sorted(outputs)
        return TaskOutput(
            kept=kept,
            columns={
                "translation": tok.batch_decode(
                    [outputs[i] for i in kept], skip_special_tokens=True
                ),
                "target_lang": [langs[i] for i in kept],
                "input_tokens": [enc.lengths[i] for i in kept],
                "output_tokens": [len(outputs[i]) for i in kept],
                "truncated": [enc.truncated[i] for i in kept],
            },
            rejected=rejected,
            tokens=sum(enc.lengths[i] + len(outputs[i]) for i in kept),
        )
