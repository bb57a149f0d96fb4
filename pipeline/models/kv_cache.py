"""A KV cache layer for transformers models that grows in place, for continuous batching.

transformers' DynamicLayer appends each step's keys and values with torch.cat, copying the whole
cache every step: with many rows decoding together that copy costs as much as the step's compute
on a CPU. GrowingLayer keeps buffers with spare room and writes each step into them; the keys and
values it hands the attention are views of the filled part, `[start, n)` of the buffer:

- `trim(k)` drops the k leading positions (no row attends to them any more) by moving `start`:
  no copy;
- `write_rows(rows, k, v)` puts newly prefilled rows into the slots of finished ones, aligned to
  the end: a copy of the new rows only;
- when the buffer is full it is reallocated at twice the live length (one copy, rarely).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._kb = self._vb = None
        self._start = self._n = 0

    def _views(self) -> None:
        self.keys = self._kb[..., self._start : self._n, :]
        self.values = self._vb[..., self._start : self._n, :]

    def _room(self, like_k: torch.Tensor, like_v: torch.Tensor, extra: int) -> None:
        """Make room for `extra` more positions after n."""
        if self._kb is not None and self._n + extra <= self._kb.shape[-2]:
            return
        live = self._n - self._start
        cap = max(2 * (live + extra), 64)
        kb = like_k.new_empty((*like_k.shape[:-2], cap, like_k.shape[-1]))
        vb = like_v.new_empty((*like_v.shape[:-2], cap, like_v.shape[-1]))
        if live:
            kb[..., :live, :] = self._kb[..., self._start : self._n, :]
            vb[..., :live, :] = self._vb[..., self._start : self._n, :]
        self._kb, self._vb, self._start, self._n = kb, vb, 0, live

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        self._room(key_states, value_states, t)
        self._kb[..., self._n : self._n + t, :] = key_states
        self._vb[..., self._n : self._n + t, :] = value_states
        self._n += t
        self._views()
        return self.keys, self.values

    def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the contents (rows joined), with room to grow."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self._kb = self._vb = None
        self._start = self._n = 0
        self.update(keys, values)

    def trim(self, k: int) -> None:
        """Forget the k leading positions."""
        if k and self._kb is not None:
            self._start = min(self._start + k, self._n)
            self._views()

    def write_rows(self, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite the last keys.shape[-2] positions of `rows` (their earlier positions are
        left as they are: the caller masks them)."""
        t = keys.shape[-2]
        self._kb[rows, :, self._n - t : self._n, :] = keys
        self._vb[rows, :, self._n - t : self._n, :] = values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep `indices` rows: one copy of the live part, with room to grow."""
        if self.get_seq_length() > 0:
            live = self._n - self._start
            self._kb = self._kb[indices, :, self._start :]
            self._vb = self._vb[indices, :, self._start :]
            self._start, self._n = 0, live
            self._views()


def growing_cache(config):
    """A DynamicCache whose full-attention layers grow in place (others stay transformers' own)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    cache.layers = [
        GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache
