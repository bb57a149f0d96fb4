"""A GPT-style decoder language model, written once and plainly (after nanoGPT).

Layers live in an `nn.ModuleDict` keyed by index, so a pipeline stage is this model with the
layers (and embeddings or head) it does not own removed, and parameter names stay those of the
full model. Attention uses separate q/k/v projections so tensor parallelism can split heads by
column; the number of local heads is read from the tensor shapes, never from the config.

Shapes: B batch, T new positions, S positions attended (cache + new), C n_embd, H heads, D head dim.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 512
    block_size: int = 256
    """Longest sequence (prompt + generation) the position table covers."""
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu"
    """gelu (exact), or gelu_tanh (GPT-2's tanh approximation)."""
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    """The head shares the token embedding's weights (GPT-2)."""

    def to_dict(self) -> dict:
        return asdict(self)


KVCache = tuple[torch.Tensor, torch.Tensor]  # (B, H, S, D) keys and values of one layer


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        B, T, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, T, H*D) -> (B, H, T, D)
            return t.view(B, T, -1, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        p = self.dropout if self.training else 0.0
        if mask is None:  # training: whole sequences, no padding
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:  # inference: (B, 1, T, S) boolean, True where attending is allowed
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        # Keys and values are kept only for cached decoding (training returns none: FSDP2 warns
        # of views leaving a wrapped block).
        return self.o_proj(y), ((k, v) if mask is not None else None)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, mask=None, cache=None):
        a, new_cache = self.attn(self.ln_1(x), mask, cache)
        x = x + a
        return x + self.mlp(self.ln_2(x)), new_cache


class GPT(nn.Module):
    arch = "gpt"

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training/pipeline forward. x: token ids (B, T) on the first stage, else hidden (B, T, C).
        Returns logits (B, T, vocab) on the last stage, else hidden (B, T, C)."""
        if self.wte is not None:
            pos = torch.arange(x.shape[1], device=x.device)
            x = self.drop(self.wte(x) + self.wpe(pos))
        for layer in self.layers.values():
            x, _ = layer(x)
        if self.ln_f is not None:
            x = self.ln_f(x)
        return self.lm_head(x) if self.lm_head is not None else x

    def forward_cached(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        caches: list[KVCache] | None,
    ) -> tuple[torch.Tensor, list[KVCache]]:
        """Inference with a KV cache. ids, positions: (B, T); mask: (B, 1, T, S).
        Returns the logits of the last position (B, vocab) and the updated caches."""
        x = self.wte(ids) + self.wpe(positions)
        new = []
        for i, layer in enumerate(self.layers.values()):
            x, c = layer(x, mask, caches[i] if caches else None)
            new.append(c)
        return self.lm_head(self.ln_f(x[:, -1])), new

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - (self.wpe.weight.numel() if non_embedding and self.wpe is not None else 0)
