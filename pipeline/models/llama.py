"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2 and their kin), written plainly, in the same
shape as models/gpt.py so the same pipeline split, tensor-parallel plan and decoding serve it:

    RMSNorm -> attention (rotary positions, grouped-query: n_kv_head key/value heads) -> residual
    RMSNorm -> SwiGLU MLP (down(silu(gate(x)) * up(x)))                               -> residual

Layers live in an `nn.ModuleDict` keyed by index; embeddings are `wte`, the final norm `ln_f`, the
head `lm_head` (tied to `wte` or not). Tensor parallelism splits q/k/v and gate/up by column and
o/down by row: the local numbers of query and key/value heads are read from the tensor shapes.
Weights map one to one onto Hugging Face's LlamaForCausalLM (models/hf_import.py).

Shapes: B batch, T new positions, S positions attended, C n_embd, H heads, G kv heads, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .gpt import GPT

KVCache = tuple[torch.Tensor, torch.Tensor]  # (B, G, S, D) keys (rotated) and values of one layer


@dataclass
class LlamaConfig:
    vocab_size: int = 512
    block_size: int = 2048
    """Longest sequence (max_position_embeddings)."""
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0
    """Key/value heads (grouped-query attention: n_head is a multiple of it). 0: n_head."""
    n_embd: int = 128
    intermediate_size: int = 0
    """The MLP's width. 0: about 8/3 n_embd, a multiple of 8."""
    head_dim: int = 0
    """0: n_embd // n_head."""
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)
    """Hugging Face's rope_scaling: {} (none), {"rope_type": "linear", "factor": f} or Llama 3's
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}."""
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """Biases on q/k/v/o (Qwen2 has them on q/k/v only: qkv_bias)."""
    qkv_bias: bool = False
    mlp_bias: bool = False
    dropout: float = 0.0
    model_type: str = "llama"
    """The Hugging Face family it came from (llama, mistral, qwen2): what export writes back."""

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.intermediate_size = self.intermediate_size or (8 * self.n_embd // 3 + 7) // 8 * 8
        if not self.head_dim:
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def rope_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """The rotary inverse frequencies (D/2,), with the config's scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = dict(cfg.rope_scaling or {})
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / s["factor"]
    if kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, mid, scaled)
    raise ValueError(
        f"rope_scaling type {kind!r} is not supported; FastServe knows default, linear and llama3"
    )


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, Hugging Face's layout (halves, not interleaved pairs)."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        qkv = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=qkv)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.attention_bias)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None):
        B, T, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, T, n*D) -> (B, n, T, D)
            return t.view(B, T, -1, self.head_dim).transpose(1, 2)

        q = rotate(heads(self.q_proj(x)), cos, sin)
        k = rotate(heads(self.k_proj(x)), cos, sin)
        v = heads(self.v_proj(x))
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        groups = q.shape[1] // k.shape[1]  # local heads (tensor parallel): from the shapes
        kk = k.repeat_interleave(groups, dim=1) if groups > 1 else k
        vv = v.repeat_interleave(groups, dim=1) if groups > 1 else v
        p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y), ((k, v) if mask is not None else None)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.ln_1 = nn.RMSNorm(cfg.n_embd, eps=cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.RMSNorm(cfg.n_embd, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None):
        a, new_cache = self.attn(self.ln_1(x), cos, sin, mask, cache)
        x = x + a
        return x + self.mlp(self.ln_2(x)), new_cache


class Llama(nn.Module):
    arch = "llama"
    # the tensor-parallel plan of one block (pipeline/distributed/parallelize.py applies it)
    tp_plan = {
        "attn.q_proj": "colwise",
        "attn.k_proj": "colwise",
        "attn.v_proj": "colwise",
        "attn.o_proj": "rowwise",
        "mlp.gate_proj": "colwise",
        "mlp.up_proj": "colwise",
        "mlp.down_proj": "rowwise",
    }

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.ln_f = nn.RMSNorm(cfg.n_embd, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.apply(GPT._init)  # the same initialisation as FastServe's GPT
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight

    def _rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for `positions` (T,) or (B, T), broadcastable over (B, H, T, D)."""
        f = positions.float()[..., None] * self.inv_freq.float()  # (..., T, D/2)
        emb = torch.cat((f, f), dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        if positions.dim() == 2:  # per row: (B, 1, T, D)
            return cos[:, None], sin[:, None]
        return cos, sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training/pipeline forward. x: token ids (B, T) on the first stage, else hidden (B, T, C).
        Returns logits (B, T, vocab) on the last stage, else hidden (B, T, C)."""
        if self.wte is not None:
            x = self.wte(x)
        cos, sin = self._rope(torch.arange(x.shape[1], device=x.device), x.dtype)
        for layer in self.layers.values():
            x, _ = layer(x, cos, sin)
        if self.ln_f is not None:
            x = self.ln_f(x)
        return self.lm_head(x) if self.lm_head is not None else x

    def forward_cached(self, ids, positions, mask, caches):
        """Inference with a KV cache (the decoding interface GPT has). ids, positions: (B, T);
        mask: (B, 1, T, S). Returns the last position's logits (B, vocab) and the caches."""
        x = self.wte(ids)
        cos, sin = self._rope(positions, x.dtype)
        new = []
        for i, layer in enumerate(self.layers.values()):
            x, c = layer(x, cos, sin, mask, caches[i] if caches else None)
            new.append(c)
        return self.lm_head(self.ln_f(x[:, -1])), new

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - (self.wte.weight.numel() if non_embedding and self.wte is not None else 0)
