"""A KV cache layer for transformers models that grows in place.

transformers' DynamicLayer appends each step's keys and values with torch.cat, copying the whole
cache every step: with many rows decoding together that copy costs as much as the step's compute
on a CPU. GrowingLayer keeps buffers with spare room (doubled when full) and writes each step
into them; the keys and values it hands the attention are views of the filled part.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._kb = self._vb = None
        self._n = 0

    def _room(self, like_k: torch.Tensor, like_v: torch.Tensor, need: int) -> None:
        if self._kb is not None and self._kb.shape[-2] >= need:
            return
        cap = max(need, 2 * (self._kb.shape[-2] if self._kb is not None else 0), 32)
        kb = like_k.new_empty((*like_k.shape[:-2], cap, like_k.shape[-1]))
        vb = like_v.new_empty((*like_v.shape[:-2], cap, like_v.shape[-1]))
        if self._n:
            kb[..., : self._n, :] = self._kb[..., : self._n, :]
            vb[..., : self._n, :] = self._vb[..., : self._n, :]
        self._kb, self._vb = kb, vb

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        self._room(key_states, value_states, self._n + t)
        self._kb[..., self._n : self._n + t, :] = key_states
        self._vb[..., self._n : self._n + t, :] = value_states
        self._n += t
        self.keys, self.values = self._kb[..., : self._n, :], self._vb[..., : self._n, :]
        return self.keys, self.values

    def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the contents (rows joined, leading padding trimmed), with room to grow."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self._kb = self._vb = None
        self._n = 0
        self.update(keys, values)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep `indices` rows: one copy of the buffers, spare room included."""
        if self.get_seq_length() > 0:
            self._kb, self._vb = self._kb[indices], self._vb[indices]
            self.keys, self.values = self._kb[..., : self._n, :], self._vb[..., : self._n, :]


def growing_cache(config):
    """A DynamicCache whose full-attention layers grow in place (others stay transformers' own)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    cache.layers = [
        GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache
