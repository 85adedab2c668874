"""A static KV cache: one preallocated buffer per generation, written in place scale by scale.

Growing the cache by concatenation (what the official code does) copies it at every scale;
here scale k writes its keys/values at [offset_k, offset_k + n_k) and attention reads views of
[0, offset_k + n_k). Shapes per scale are fixed, which also lets a scale be captured in a graph.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers: int, batch: int, heads: int, capacity: int, head_dim: int, dtype, device):
        # (layer, k|v, B, H, N, D): a layer's keys are one contiguous (B, H, N, D) block
        self.buffer = torch.empty(layers, 2, batch, heads, capacity, head_dim, dtype=dtype, device=device)

    def slots(self, layer: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (B, H, n, D) of [start, start + n) for a layer's new keys and values: the qkv
        kernel writes them there, and `write` then has nothing left to copy."""
        return self.buffer[layer, 0, :, :, start : start + n], self.buffer[layer, 1, :, :, start : start + n]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H, n, D) at [start, start + n) and return views of [0, start + n)."""
        end = start + k.shape[2]
        keys, values = self.buffer[layer, 0], self.buffer[layer, 1]
        for new, cached in ((k, keys[:, :, start:end]), (v, values[:, :, start:end])):
            if new.data_ptr() != cached.data_ptr():  # not written in place already
                cached.copy_(new)
        return keys[:, :, :end], values[:, :, :end]

    def write_kept(self, layer: int, start: int, n: int, k: torch.Tensor, v: torch.Tensor, index, stand_in):
        """A scale of n tokens at `start` of which only those at `index` (B, m) ran (token pruning):
        their k, v (B, H, m, D) go to their own slots, every other slot takes the keys/values at
        the earlier sequence positions `stand_in` (n,). Returns views of [0, start + n)."""
        end = start + n
        slots = (start + index)[:, None, :, None].expand_as(k)
        for cache, new in ((self.buffer[layer, 0], k), (self.buffer[layer, 1], v)):
            cache[:, :, start:end] = cache[:, :, stand_in]
            cache.scatter_(2, slots, new.to(cache.dtype))
        return self.buffer[layer, 0, :, :, :end], self.buffer[layer, 1, :, :, :end]


class ConcatKVCache:
    """The cache as the official code keeps it: keys/values concatenated scale after scale.

    Each write copies everything cached so far; kept only to measure what the static cache saves.
    """

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def slots(self, layer: int, start: int, n: int) -> None:
        return None  # a growing cache has no place for new keys before they are concatenated

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        if start == 0:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]
