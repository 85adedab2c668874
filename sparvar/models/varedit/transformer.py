"""The VAREdit transformer: Infinity's, with the source image as a slot of the KV cache.

Its state dict is Infinity's (block_chunks.{c}.module.{j}.*), so official files load strictly
into the same modules. What the official code (HiDream-ai/VAREdit) adds, and this module with it:
- the source: the VAE encoder's continuous features of the source picture (not quantised) on the
  last scale's latent grid, as transformer input (patchified like the bits for the 8B), embedded
  by `word_embed` with the last scale's level embedding. Before scale 0 it runs once through the
  blocks, attending to itself only (a dense pass outside the attention policy); its keys and
  values fill the cache slot before scale 0 (`Schedule.source`) in every layer;
- in the first block a scale's queries see the source's keys and values area-pooled to that
  scale's own grid, then the target's scales; in the other blocks the whole source, then the
  target's scales (`pooled_source_layers`);
- RoPE: the official table lists the 1M schedule's source grid at rows and columns offset by its
  own sides (a grid twice as large), then the 1M schedule's scales at their stretched positions,
  and token i of the sequence [source; scales] takes its entry i (`edit_positions`). At 1024 this
  gives each token its own place; at 512 every token (source and target) falls on the first rows
  of the 64x64 source grid, in training and inference alike;
- one schedule per model: Infinity's 1:1 one at its resolution, the source on its last grid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from sparvar.attention.policy import AttentionCall, AttentionPolicy
from sparvar.errors import SparvarError
from sparvar.kv_cache import KVCache
from sparvar.models.base import Attend, CachedAttend
from sparvar.models.infinity.transformer import InfinityConfig, InfinityTransformer, Prepared
from sparvar.pruning import TokenPruning
from sparvar.schedules import Schedule, infinity_schedule


@dataclass(frozen=True)
class VAREditConfig(InfinityConfig):
    resolution: int = 1024  # the one schedule it generates: Infinity's 1:1 one at this pixel budget
    cfg: float = 3.0  # the official demo's defaults (README, app.py)
    tau: float = 0.1
    pooled_source_layers = (0,)

    @property
    def schedule(self) -> Schedule:
        scales = infinity_schedule("1:1", self.resolution)
        return replace(scales, source=scales.sizes[-1])


def edit_positions(schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of every token of [source; scales], as the official table gives them (module
    docstring): the 1M table of the schedule's 1:1 position grid, read by sequence index."""
    full = infinity_schedule("1:1", 1024)
    if schedule.pos_grid != full.sizes[-1]:
        raise SparvarError(f"VAREdit positions are those of the 1:1 1M schedule, not of a {schedule.pos_grid} grid")
    gh, gw = schedule.pos_grid
    index = torch.arange(gh * gw)
    rows, cols = InfinityTransformer.positions(full)
    rows = torch.cat([(gh + index // gw).float(), rows])
    cols = torch.cat([(gw + index % gw).float(), cols])
    return rows[: schedule.total], cols[: schedule.total]


def pool_source(t: torch.Tensor, schedule: Schedule, scale: int) -> torch.Tensor:
    """Keys or values (B, H, N, D) over [source; scales] with the source area-pooled to `scale`'s grid."""
    (sh, sw), (h, w) = schedule.source, schedule.sizes[scale]
    if (sh, sw) == (h, w):
        return t
    b, heads, _, d = t.shape
    n = schedule.source_length
    grid = t[:, :, :n].transpose(2, 3).reshape(b, heads * d, sh, sw)
    pooled = F.interpolate(grid, size=(h, w), mode="area").view(b, heads, d, h * w).transpose(2, 3)
    return torch.cat([pooled, t[:, :, n:]], dim=2)


class SourceAttend(Attend):
    """The source's pass before scale 0: its keys and values go into the cache's source slot and
    it attends to itself, densely (once per generation, not through the attention policy)."""

    def __init__(self, cache: KVCache):
        self.cache = cache

    def slots(self, layer, n):
        return self.cache.slots(layer, 0, n)

    def __call__(self, layer, q, k, v):
        keys, values = self.cache.write(layer, 0, k, v)
        return F.scaled_dot_product_attention(q, keys, values, scale=1.0)


class EditAttend(CachedAttend):
    """A target scale's step: CachedAttend's, except that in the pooled layers the policy sees the
    source pooled to the scale's grid, and is told that layout (`Schedule.pooled`)."""

    def __init__(self, cache, policy, scale, schedule, depth, pooled_layers: tuple[int, ...]):
        super().__init__(cache, policy, scale, schedule, depth)
        self.pooled_layers = pooled_layers

    def __call__(self, layer, q, k, v):
        if layer not in self.pooled_layers:
            return super().__call__(layer, q, k, v)
        keys, values = self.cache.write(layer, self.start, k, v)
        keys, values = pool_source(keys, self.schedule, self.scale), pool_source(values, self.schedule, self.scale)
        call = AttentionCall(layer, self.scale, self.depth, self.schedule.pooled(self.scale), self.softmax_scale)
        return self.policy(q, keys, values, call)


class EditPrefixAttend(Attend):
    """Teacher forcing over [source; scales], block-causal: the source attends to itself, scale k
    to the source (pooled in the pooled layers) and scales 0..k; one unmasked attention each."""

    def __init__(self, schedule: Schedule, pooled_layers: tuple[int, ...]):
        self.schedule, self.pooled_layers = schedule, pooled_layers

    def __call__(self, layer, q, k, v):
        q, k = q.to(v.dtype), k.to(v.dtype)
        s, n = self.schedule, self.schedule.source_length
        outs = [F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], scale=1.0)]
        for scale, (start, length) in enumerate(zip(s.offsets, s.lengths)):
            keys, values = k[:, :, : start + length], v[:, :, : start + length]
            if layer in self.pooled_layers:
                keys, values = pool_source(keys, s, scale), pool_source(values, s, scale)
            outs.append(F.scaled_dot_product_attention(q[:, :, start : start + length], keys, values, scale=1.0))
        return torch.cat(outs, dim=2)


@dataclass
class EditPrepared(Prepared):
    source: torch.Tensor  # (B, n_src, C) float32: the embedded source tokens (without their level embedding)


class VAREditTransformer(InfinityTransformer):
    def prepare(self, condition, guidance: bool, negative=None) -> EditPrepared:
        """(text features, mask, source input (B, n_src, bits)) -> Infinity's condition tensors and
        the embedded source; with guidance both halves see the same source."""
        feats, mask, source = condition
        prep = super().prepare((feats, mask), guidance, negative)
        source = self.embed_codes(source)
        return EditPrepared(**vars(prep), source=torch.cat([source, source]) if guidance else source)

    def positions(self, schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
        return edit_positions(schedule)

    def forward_scale(
        self, x: torch.Tensor, scale: int, schedule: Schedule, prep: EditPrepared, cache: KVCache,
        policy: AttentionPolicy, pruning: TokenPruning | None = None,
    ) -> torch.Tensor:
        """One generation step (Infinity's); scale 0 first runs the source's pass into the cache."""
        if pruning is not None:
            raise SparvarError("token pruning is not available for VAREdit models")
        if scale == 0:
            source = prep.source + self.lvl_embed.weight[len(schedule) - 1].float()
            self._blocks(source, prep, self.rope(schedule).slice(0, schedule.source_length), SourceAttend(cache))
        start, n = schedule.offsets[scale], schedule.lengths[scale]
        x = x + self.lvl_embed.weight[scale].float()
        attend = EditAttend(cache, policy, scale, schedule, self.cfg.depth, self.cfg.pooled_source_layers)
        return self.logits(self._blocks(x, prep, self.rope(schedule).slice(start, n), attend), prep.cond)

    def forward_full(self, inputs: list[torch.Tensor], schedule: Schedule, prep: EditPrepared) -> torch.Tensor:
        """Teacher forcing: inputs of scales 1.. (each (B, n_k, bits)) -> logits of every target
        token, as the official training forward computes them after the source."""
        x = torch.cat([prep.start] + [self.embed_codes(c) for c in inputs], dim=1)
        scale_of_token = torch.repeat_interleave(torch.arange(len(schedule)), torch.tensor(schedule.lengths))
        x = x + self.lvl_embed.weight[scale_of_token.to(x.device)].float()
        source = prep.source + self.lvl_embed.weight[len(schedule) - 1].float()
        attend = EditPrefixAttend(schedule, self.cfg.pooled_source_layers)
        x = self._blocks(torch.cat([source, x], dim=1), prep, self.rope(schedule).slice(0, schedule.total), attend)
        return self.logits(x[:, schedule.source_length :], prep.cond)
