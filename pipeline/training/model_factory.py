"""Build the model a training job describes (the same init on every rank, from the seed)."""

from __future__ import annotations

import torch

from ..registry import ARCHS
from .config import TrainModelConfig


def build_model(
    m: TrainModelConfig, vocab_size: int, seed: int, labels: list[str] | None = None
) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ARCHS[m.arch].build(m, vocab_size, labels)


def flops_per_token(model: torch.nn.Module, m: TrainModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding params + attention (12 x layers x width x seq)."""
    n = model.num_params(non_embedding=True)
    attn = 12 * m.n_layer * m.n_embd * seq_len if ARCHS[m.arch].attention else 0
    return 6.0 * n + attn
