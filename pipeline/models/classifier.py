"""An encoder classifier: token + position embeddings -> bidirectional transformer blocks ->
mean pooling over real tokens -> a linear head over the labels. For `sentiment`.

Blocks are those of the GPT (models/gpt.py) given a padding mask instead of the causal one, in an
`nn.ModuleDict` keyed by index. Between pipeline stages the model passes (hidden, mask): the mask
comes from the token ids, which only the first stage sees.
Shapes: B batch, T tokens, C n_embd, L labels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .gpt import Block, GPTConfig


@dataclass
class ClassifierConfig:
    vocab_size: int = 512
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    labels: list[str] = field(default_factory=lambda: ["negative", "positive"])
    pad_id: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class EncoderClassifier(nn.Module):
    arch = "classifier"

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.config = cfg
        block_cfg = GPTConfig(
            cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout
        )
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): Block(block_cfg) for i in range(cfg.n_layer)})
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(
            cfg.n_embd, len(cfg.labels)
        )  # named as the LM's head: stages split alike
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """First stage: token ids (B, T). Later stages: (hidden (B, T, C), mask (B, T)).
        Last stage returns logits (B, L); the others (hidden, mask)."""
        if self.wte is not None:
            mask = (x != self.config.pad_id).float()
            pos = torch.arange(x.shape[1], device=x.device)
            x = self.drop(self.wte(x) + self.wpe(pos))
        attend = mask.bool()[
            :, None, None, :
        ]  # (B, 1, 1, T): every position may see every real token
        for layer in self.layers.values():
            x, _ = layer(x, attend)
        if self.lm_head is None:
            return x, mask
        x = self.ln_f(x)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.lm_head(pooled)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - (self.wpe.weight.numel() if non_embedding and self.wpe is not None else 0)
