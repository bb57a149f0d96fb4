"""embed: a fixed-size float32 vector per row from an encoder, with the model's pooling.

A sentence-transformers folder (modules.json, 1_Pooling/config.json, sentence_bert_config.json)
is read for its pooling mode, normalisation and max sequence length, so the vectors equal
`SentenceTransformer.encode`; a plain encoder folder gets mean pooling.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ..config import ModelConfig, TaskConfig
from .base import ModelTask, TaskOutput
from .encoding import EncoderRows, model_max_length


def sentence_transformers_settings(path: str) -> dict:
    """pooling, normalize and max_length as a sentence-transformers folder declares them."""
    root, out = Path(path), {}
    pool = root / "1_Pooling" / "config.json"
    if pool.is_file():
        cfg = json.loads(pool.read_text())
        for mode in ("cls", "max", "mean"):
            if cfg.get(
                f"pooling_mode_{mode}_token" if mode != "mean" else "pooling_mode_mean_tokens"
            ):
                out["pooling"] = mode
                break
    modules = root / "modules.json"
    if modules.is_file():
        out["normalize"] = any(
            m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text())
        )
    sbert = root / "sentence_bert_config.json"
    if sbert.is_file():
        n = json.loads(sbert.read_text()).get("max_seq_length")
        if n:
            out["max_length"] = int(n)
    return out


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, T, C) hidden states, (B, T) mask -> (B, C)."""
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


class EmbedTask(ModelTask):
    name = "embed"

    def __init__(self, model_cfg: ModelConfig, task_cfg: TaskConfig):
        super().__init__(model_cfg, task_cfg)
        st = sentence_transformers_settings(model_cfg.path)
        self.pooling = task_cfg.pooling if task_cfg.pooling != "auto" else st.get("pooling", "mean")
        self.normalize = (
            task_cfg.normalize if task_cfg.normalize is not None else st.get("normalize", False)
        )
        self.schema = self.schema.sized(embedding=self.loaded.model.config.hidden_size)
        limit = model_max_length(self.loaded.tokenizer, self.loaded.model.config)
        self.max_length = task_cfg.max_length or min(st.get("max_length", limit), limit)

    def vectors(self, texts: list[str]) -> tuple[np.ndarray, list[int], EncoderRows]:
        """(vectors (len(texts), dim) float32, the rows embedded ascending, the encoded rows and
        their rejections); rows not embedded are zeros."""
        rows_in = EncoderRows(self.loaded.tokenizer, texts, self.max_length, self.cfg.on_long)
        dim = self.loaded.model.config.hidden_size
        vectors = np.zeros((len(texts), dim), dtype=np.float32)

        def embed(inputs):
            hidden = self.loaded.model(**inputs).last_hidden_state
            v = pool(hidden.float(), inputs["attention_mask"], self.pooling)
            if self.normalize:
                v = torch.nn.functional.normalize(v, p=2, dim=1)
            return v.cpu().numpy()

        done: list[int] = []
        with torch.inference_mode():
            for rows, v in rows_in.run(embed, self.cfg, self.loaded.device):
                vectors[rows] = v
                done += rows
        return vectors, sorted(done), rows_in

    def process(self, texts: list[str], ids=None, extra=None) -> TaskOutput:
        vectors, kept, rows_in = self.vectors(texts)
        enc, dim = rows_in.enc, vectors.shape[1]
        # one flat float32 buffer, no Python list per row (v1 folders cast it: runner.py)
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors[kept].reshape(-1)), dim)
        return TaskOutput(
            kept=kept,
            columns={
                "embedding": column,
                "tokens": [enc.lengths[i] for i in kept],
                "truncated": [enc.truncated[i] for i in kept],
            },
            rejected=rows_in.rejected,
            tokens=sum(enc.lengths[i] for i in kept),
        )
