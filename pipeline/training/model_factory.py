"""Build the model a training job describes (the same init on every rank, from the seed)."""

from __future__ import annotations

import torch

from ..models.gpt import GPT, GPTConfig
from ..models.lstm import LSTMLM, LSTMConfig
from .config import TrainModelConfig


def build_model(
    m: TrainModelConfig, vocab_size: int, seed: int, labels: list[str] | None = None
) -> torch.nn.Module:
    torch.manual_seed(seed)
    if m.arch == "classifier":
        from ..models.classifier import ClassifierConfig, EncoderClassifier

        cfg = ClassifierConfig(
            vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd, m.dropout, list(labels or [])
        )
        return EncoderClassifier(cfg)
    if m.arch == "gpt":
        return GPT(GPTConfig(vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd, m.dropout))
    return LSTMLM(LSTMConfig(vocab_size, m.block_size, m.n_layer, m.n_embd, m.dropout))


def flops_per_token(model: torch.nn.Module, m: TrainModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding params + attention (12 x layers x width x seq)."""
    n = model.num_params(non_embedding=True)
    attn = 12 * m.n_layer * m.n_embd * seq_len if m.arch != "lstm" else 0
    return 6.0 * n + attn
