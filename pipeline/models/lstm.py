"""The recurrent language model: embedding -> LSTM layers -> dense softmax over the vocabulary.

Layers in an `nn.ModuleDict` keyed by index, like the GPT, so pipeline stages split it the same
way. Shapes: B batch, T time, C n_embd (embedding and hidden size), V vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class LSTMConfig:
    vocab_size: int = 512
    block_size: int = 256
    n_layer: int = 2
    n_embd: int = 128
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; a contiguous gradient backward. nn.LSTM(batch_first=True) hands back
    its input gradient as a transposed view, and a pipeline stage sends that gradient to the
    previous stage, whose receive buffer is contiguous."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class LSTMLayer(nn.Module):
    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.lstm = nn.LSTM(cfg.n_embd, cfg.n_embd, batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        y, _ = self.lstm(x)
        return self.drop(
            y
        ).contiguous()  # batch_first output is a strided view; p2p sends need contiguous


class LSTMLM(nn.Module):
    arch = "lstm"

    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleDict({str(i): LSTMLayer(cfg) for i in range(cfg.n_layer)})
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) on the first stage, else hidden (B, T, C) -> logits (B, T, V) on the
        last stage (softmax is in the loss), else hidden."""
        x = self.wte(x) if self.wte is not None else _ContiguousGrad.apply(x)
        for layer in self.layers.values():
            x = layer(x)
        return self.lm_head(x) if self.lm_head is not None else x

    def num_params(self, non_embedding: bool = True) -> int:
        return sum(p.numel() for p in self.parameters())
