"""FastVAR-style cached token pruning (arXiv 2503.23367), an accelerator that composes with any
attention policy.

At chosen large scales a middle range of layers runs only on the tokens farthest from the
scale's mean hidden state; the pruned tokens take the residual update that an earlier scale (the
cache scale) got over the same layers, upsampled. The transformers' `forward_scale` runs it
(`TokenPruning.forward`); `PRUNE_PRESETS` names the settings (`--prune fastvar`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from sparvar.errors import SparvarError
from sparvar.schedules import Schedule


@dataclass(frozen=True)
class PruneConfig:
    """Where FastVAR prunes; scales count from the end of the schedule, layers as shares of the depth.

    Defaults are FastVAR's Infinity settings: at 32x32 and 40x40 (the 4th- and 3rd-last of the 13
    scales) keep 60% / 50% of the tokens in layers 3-27 of Infinity-2B's 32 (the share 3/32..28/32
    of any depth); pruned tokens take the 24x24 scale's (5th-last) residual update.
    """

    scales_from_end: tuple[int, ...] = (4, 3)
    keep: tuple[float, ...] = (0.6, 0.5)  # share of the tokens kept at each of those scales
    cache_from_end: int = 5
    layers: tuple[float, float] = (3 / 32, 28 / 32)

    def __post_init__(self):
        if len(self.scales_from_end) != len(self.keep) or not self.keep:
            raise SparvarError("give one keep share per pruned scale")
        if not all(0 < r <= 1 for r in self.keep):
            raise SparvarError(f"keep shares must be in (0, 1], got {self.keep}")
        if min(self.scales_from_end) < 1 or self.cache_from_end <= max(self.scales_from_end):
            raise SparvarError("the cache scale must come before every pruned scale (cache_from_end > scales_from_end)")
        if not 0 <= self.layers[0] < self.layers[1] <= 1:
            raise SparvarError(f"layers must be shares 0 <= first < last <= 1 of the depth, got {self.layers}")


class PrunePreset(NamedTuple):
    description: str
    config: PruneConfig


PRUNE_PRESETS: dict[str, PrunePreset] = {
    "fastvar": PrunePreset(
        "FastVAR's cached token pruning: keep 60% / 50% of the tokens at the 4th/3rd-last scales "
        "(Infinity 1024: 32x32, 40x40) in layers 3/32-28/32 of the depth, fill from the 5th-last (24x24)",
        PruneConfig(),
    ),
}


@dataclass(frozen=True)
class PrunePlan:
    """A PruneConfig applied to one depth and schedule."""

    first: int  # layers first..last-1 are pruned
    last: int
    cache_scale: int
    kept: dict[int, int]  # pruned scale -> tokens kept there


class Kept(NamedTuple):
    """What the attention hook needs at a pruned scale: positions (B, m) of the kept tokens within
    the scale, and for each of its n positions the cache-scale token standing in for it (n,)."""

    index: torch.Tensor
    stand_in: torch.Tensor


@lru_cache(maxsize=64)
def prune_plan(config: PruneConfig, depth: int, schedule: Schedule) -> PrunePlan:
    K = len(schedule)
    if config.cache_from_end > K:
        raise SparvarError(f"token pruning needs at least {config.cache_from_end} scales, the schedule has {K}")
    first, last = round(depth * config.layers[0]), round(depth * config.layers[1])
    if first >= last:
        raise SparvarError(f"token pruning leaves no layer to prune at depth {depth} (layers {config.layers})")
    kept = {K - e: max(1, math.ceil(r * schedule.lengths[K - e] - 1e-9)) for e, r in zip(config.scales_from_end, config.keep)}
    return PrunePlan(first, last, K - config.cache_from_end, kept)


@lru_cache(maxsize=64)
def stand_in_positions(schedule: Schedule, scale: int, source: int, device) -> torch.Tensor:
    """Sequence index of the token of scale `source` nearest to each token of `scale` (row-major).

    Built with device ops only, so it may first be needed while a CUDA graph captures."""
    (h, w), (hs, ws) = schedule.sizes[scale], schedule.sizes[source]
    rows = ((torch.arange(h, device=device) + 0.5) * (hs / h)).long().clamp_max(hs - 1)
    cols = ((torch.arange(w, device=device) + 0.5) * (ws / w)).long().clamp_max(ws - 1)
    return schedule.offsets[source] + (rows[:, None] * ws + cols[None, :]).flatten()


def farthest_from_mean(x: torch.Tensor, m: int) -> torch.Tensor:
    """Positions (B, m) of the m tokens of x (B, n, C) farthest (L2) from their mean, in sequence order."""
    score = (x - x.mean(dim=1, keepdim=True)).square().sum(dim=-1)
    return score.topk(m, dim=1).indices.sort(dim=1).values


def upsample_tokens(x: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, C) on grid src -> (B, h'*w', C) on grid dst, by area interpolation (as FastVAR)."""
    b, _, c = x.shape
    grid = x.transpose(1, 2).reshape(b, c, *src)
    return F.interpolate(grid, size=dst, mode="area").flatten(2).transpose(1, 2)


# run(x, rope, attend, layers) -> x: the transformer's blocks `layers` over hidden states x (B, L, C)
RunLayers = Callable[[torch.Tensor, object, Callable, range], torch.Tensor]


class TokenPruning:
    """FastVAR-style cached token pruning, run by the transformers' `forward_scale`.

    At the cache scale the hidden states entering and leaving the pruned layer range are kept
    (their difference, the range's residual update). At a pruned scale the range runs on the m
    kept tokens only: those farthest from the scale's mean hidden state at the range's start,
    chosen per sample (and per CFG half); a pruned token leaves the range as it entered plus the
    cache scale's update, upsampled. Selection is once per range (FastVAR re-selects before each
    sub-layer; with a fixed set the fill is the same sum of cached updates).

    Attention at pruned layers sees only the kept queries (`AttentionCall.query_index`); the KV
    cache keeps its layout: kept tokens write their keys/values to their own slots, and every
    pruned slot holds the keys/values of the cache-scale token nearest to it (same layer), which
    is what this scale and later ones attend to in its place. So policies that plan by position
    (SparVAR) run unchanged at the later scales; at pruned calls they fall back to dense.
    State (the cached update) lives for one generation; `reset()` before each.
    """

    def __init__(self, config: PruneConfig, name: str = "custom"):
        self.config, self.name = config, name
        self.reset()

    def reset(self) -> None:
        self._update: torch.Tensor | None = None

    def plan(self, depth: int, schedule: Schedule) -> PrunePlan:
        return prune_plan(self.config, depth, schedule)

    def forward(self, x: torch.Tensor, scale: int, schedule: Schedule, depth: int, rope, attend, run: RunLayers):
        """All `depth` layers of one scale over x (B, n, C); `attend` is the scale's attention hook
        (a CachedAttend: `attend.pruned(kept)` serves the layers run on the kept tokens), `rope` its (cos, sin) of shape (n, D/2) or None (VAR)."""
        plan = self.plan(depth, schedule)
        if scale != plan.cache_scale and scale not in plan.kept:
            return run(x, rope, attend, range(depth))
        x = run(x, rope, attend, range(plan.first))
        if scale == plan.cache_scale:
            entering = x
            x = run(x, rope, attend, range(plan.first, plan.last))
            self._update = x - entering
        else:
            x = self._pruned(x, scale, schedule, plan, rope, attend, run)
        return run(x, rope, attend, range(plan.last, depth))

    def _pruned(self, x, scale, schedule, plan, rope, attend, run):
        if self._update is None:
            raise SparvarError(
                f"token pruning at scale {scale} needs the cache scale {plan.cache_scale} of this generation first; "
                "call reset() before each generation and run every scale in order"
            )
        index = farthest_from_mean(x, plan.kept[scale])
        c = x.shape[-1]
        kept_x = x.gather(1, index[..., None].expand(-1, -1, c))
        if rope is not None:  # per-sample positions: (B, 1, m, D/2) broadcasts over the heads
            rope = tuple(t[index][:, None] for t in rope)
        kept = Kept(index, stand_in_positions(schedule, scale, plan.cache_scale, x.device))
        out = run(kept_x, rope, attend.pruned(kept), range(plan.first, plan.last))
        src, dst = schedule.sizes[plan.cache_scale], schedule.sizes[scale]
        filled = x + upsample_tokens(self._update, src, dst)
        return filled.scatter(1, index[..., None].expand(-1, -1, c), out)


def resolve_pruning(prune: "TokenPruning | PruneConfig | str | None") -> TokenPruning | None:
    if prune is None or isinstance(prune, TokenPruning):
        return prune
    if isinstance(prune, PruneConfig):
        return TokenPruning(prune)
    if prune not in PRUNE_PRESETS:
        raise SparvarError(f"unknown token pruning {prune!r}; choose one of {', '.join(PRUNE_PRESETS)}")
    return TokenPruning(PRUNE_PRESETS[prune].config, name=prune)
