"""KV caches: preallocated buffers written in place scale by scale.

Growing the cache by concatenation (what the official code does) copies it at every scale;
`KVCache` (kv_cache="static") instead writes scale k's keys/values at [offset_k, offset_k + n_k)
and attention reads views of [0, offset_k + n_k). Shapes per scale are fixed, which also lets a
scale be captured in a graph.

`StagedKVCache` (kv_cache="lean" or "fp8") trades a copy per layer for memory: it stores every
scale but the last one run (no later scale reads those; at 1024x1024 they are 39% of the
tokens), in the model dtype or in FP8, and attention reads a layer's keys/values through one
staging buffer that all layers share.
"""

from __future__ import annotations

import torch

from sparvar.kernels.fp8 import FP8, dequantize_rows, quantize_rows

KINDS = ("static", "concat", "lean", "fp8")


def make_kv_cache(kind: str, layers: int, batch: int, heads: int, capacity: int, stored: int, head_dim: int, dtype,
                  device):
    """The cache of a kind (GenerationConfig.kv_cache) for `capacity` tokens, of which the lean
    and FP8 kinds store the first `stored`."""
    if kind == "concat":
        return ConcatKVCache()
    if kind == "static":
        return KVCache(layers, batch, heads, capacity, head_dim, dtype, device)
    return StagedKVCache(layers, batch, heads, capacity, stored, head_dim, dtype, device, fp8=kind == "fp8")


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


class StagedKVCache:
    """Keys/values of tokens [0, stored) per layer, in the model dtype or FP8 (one scale per token
    and head: e4m3 holds a unit-norm key's components and any value alike).

    A layer's call stages its new keys/values (the qkv kernel writes them into the staging slots,
    so they stay exact for the scale's own attention), stores them if they are below `stored`,
    then copies (or dequantises) the stored prefix into staging: attention sees views of staging.
    """

    def __init__(self, layers: int, batch: int, heads: int, capacity: int, stored: int, head_dim: int, dtype, device,
                 fp8: bool = False):
        self.stored = stored
        self.data = torch.empty(layers, 2, batch, heads, stored, head_dim, dtype=FP8 if fp8 else dtype, device=device)
        self.scale = torch.empty(layers, 2, batch, heads, stored, 1, device=device) if fp8 else None
        self.staging = torch.empty(2, batch, heads, capacity, head_dim, dtype=dtype, device=device)

    def slots(self, layer: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.staging[0, :, :, start : start + n], self.staging[1, :, :, start : start + n]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        for i, new in enumerate((k, v)):
            staged = self.staging[i, :, :, start:end]
            if new.data_ptr() != staged.data_ptr():
                staged.copy_(new)
        return self._finish(layer, start, end)

    def write_kept(self, layer: int, start: int, n: int, k: torch.Tensor, v: torch.Tensor, index, stand_in):
        """As KVCache.write_kept: kept tokens into their slots, stand-ins (earlier positions) elsewhere."""
        end = start + n
        self._load(layer, start)  # the stand-ins come from the prefix
        slots = (start + index)[:, None, :, None].expand_as(k)
        for staged, new in zip(self.staging, (k, v)):
            staged[:, :, start:end] = staged[:, :, stand_in]
            staged.scatter_(2, slots, new.to(staged.dtype))
        return self._finish(layer, start, end, loaded=True)

    def _finish(self, layer: int, start: int, end: int, loaded: bool = False):
        if end <= self.stored:
            new = self.staging[:, :, :, start:end]
            if self.scale is None:
                self.data[layer, :, :, :, start:end] = new
            else:
                rows = quantize_rows(new)
                self.data[layer, :, :, :, start:end] = rows.data
                self.scale[layer, :, :, :, start:end] = rows.scale
        if not loaded:
            self._load(layer, start)
        return self.staging[0, :, :, :end], self.staging[1, :, :, :end]

    def _load(self, layer: int, end: int) -> None:
        """Stored tokens [0, end) of a layer into staging."""
        if end == 0:
            return
        if self.scale is None:
            self.staging[:, :, :, :end] = self.data[layer, :, :, :, :end]
        else:
            dequantize_rows(self.data[layer, :, :, :, :end], self.scale[layer, :, :, :, :end], self.staging[:, :, :, :end])
