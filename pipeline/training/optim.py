"""The optimizer and the learning-rate schedule of a training run.

Weight decay applies to the matrices of linear layers only: biases, norm weights and embeddings
(token and position tables, and a head tied to them) are not decayed, as in GPT-2, nanoGPT and
torchtitan.
"""

from __future__ import annotations

import math

import torch

NO_DECAY_NAMES = ("wte.", "wpe.", "embed")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies to the parameter `name`."""
    return param.dim() >= 2 and not any(k in name for k in NO_DECAY_NAMES)


def build_optimizer(named_params, t) -> torch.optim.Optimizer:
    """AdamW over two groups, decayed and not (an empty group is left out); `t` the [train] table."""
    decay = [q for n, q in named_params if decays(n, q)]
    rest = [q for n, q in named_params if not decays(n, q)]
    groups = [
        {"params": ps, "weight_decay": wd}
        for ps, wd in ((decay, t.weight_decay), (rest, 0.0))
        if ps
    ]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95), foreach=False)


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, t) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, t.warmup_steps, t.steps, t.min_lr_ratio)
    )
