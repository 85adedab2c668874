"""Scale skipping and FastVAR-style token pruning: accelerators that compose with any attention policy.

Three ways to do less work at the large scales, each usable with dense attention or SparVAR:
- `skip_last=N` (the pipeline): stop N scales early and decode the codes summed so far;
- `TokenPruning` (FastVAR, arXiv 2503.23367): at chosen large scales a middle range of layers runs
  only on the tokens farthest from the scale's mean hidden state; the pruned tokens take the
  residual update that an earlier scale (the cache scale) got over the same layers, upsampled;
- `AdaptiveSkip`: per sample, after each of the last scales but one or two, stop when the
  current estimate holds little high-frequency energy (the detail the last scales would refine).

`combination("default+fastvar+skip2")` reads the names `sparvar eval` and the CLI use.
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

# ---- token pruning -------------------------------------------------------------------------------


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


# ---- adaptive skipping ---------------------------------------------------------------------------

# Thresholds calibrated on the demo model (`sparvar calibrate-skip`, benchmarks/adaptive_skip.md):
# skip the last r scales when the detail energy after scale K-1-r is below DEMO_THRESHOLDS[r - 1].
DEMO_THRESHOLDS = (0.3195, 0.2100)


@dataclass(frozen=True)
class AdaptiveSkip:
    """Stop an item early when its current estimate holds little detail for the last scales to refine.

    After scale K-1-r (r = len(thresholds), ..., 1) an item still refining stops, keeping the codes
    summed so far, when its detail energy is below thresholds[r - 1]: the mean square of the summed
    latent minus its own blur through a grid a quarter of its side (area down, bilinear up), i.e.
    the energy of structure finer than a quarter of the image. Samples whose estimate is smooth
    lose least when the finest scales are left out (docs/skipping.md shows the calibration).
    The thresholds depend on the latent's scale: calibrate them per model (`sparvar calibrate-skip`).
    """

    thresholds: tuple[float, ...] = DEMO_THRESHOLDS

    def __post_init__(self):
        if not self.thresholds or any(math.isnan(t) for t in self.thresholds):
            raise SparvarError(f"adaptive skip needs one threshold per skippable scale, got {self.thresholds}")

    def threshold_after(self, scale: int, num_scales: int) -> float | None:
        """The threshold of the decision after `scale`, or None where nothing is decided."""
        r = num_scales - 1 - scale
        return self.thresholds[r - 1] if 1 <= r <= len(self.thresholds) else None

    @staticmethod
    def score(summed: torch.Tensor) -> torch.Tensor:
        """Detail energy (B,) of summed latents (B, c, H, W)."""
        h, w = summed.shape[-2:]
        coarse = F.interpolate(summed, size=(max(1, h // 4), max(1, w // 4)), mode="area")
        coarse = F.interpolate(coarse, size=(h, w), mode="bilinear")
        return (summed - coarse).square().mean(dim=(1, 2, 3))

    def start(self, items: int, num_scales: int) -> "AdaptiveRun":
        return AdaptiveRun(self, items, num_scales)


class AdaptiveRun:
    """Which items of one generation still refine; the pipeline's loop hands it every new sum."""

    def __init__(self, rule: AdaptiveSkip, items: int, num_scales: int):
        self.rule, self.num_scales = rule, num_scales
        self.active: torch.Tensor | None = None  # (B,) bool on the device, once something was decided
        self.scales_used = [num_scales] * items

    def step(self, scale: int, previous: torch.Tensor | None, summed: torch.Tensor, schedule: Schedule):
        """The running sum after `scale`: `summed` for items still refining, `previous` for stopped
        ones. At a decision scale the items whose detail energy is below the threshold stop; reading
        the decisions back is one host sync."""
        if self.active is not None:
            summed = torch.where(self.active.view(-1, *[1] * (summed.dim() - 1)), summed, previous)
        threshold = self.rule.threshold_after(scale, len(schedule)) if scale + 1 < self.num_scales else None
        if threshold is not None:
            keep = self.rule.score(summed) >= threshold
            self.active = keep if self.active is None else self.active & keep
            for i, on in enumerate(self.active.tolist()):
                if not on and self.scales_used[i] == self.num_scales:
                    self.scales_used[i] = scale + 1
        return summed

    @property
    def finished(self) -> bool:
        return all(n < self.num_scales for n in self.scales_used)


def resolve_adaptive(adaptive: "AdaptiveSkip | bool | None") -> AdaptiveSkip | None:
    if adaptive is None or adaptive is False:
        return None
    if adaptive is True:
        return AdaptiveSkip()
    if not isinstance(adaptive, AdaptiveSkip):
        raise SparvarError(f"adaptive_skip takes True, False or an AdaptiveSkip, not {adaptive!r}")
    return adaptive


# ---- combinations and their cost -------------------------------------------------------------------


@dataclass(frozen=True)
class Combination:
    """An attention preset with any of: skip the last N scales, a token pruning, adaptive skip."""

    attention: str = "dense"
    skip_last: int = 0
    prune: str | None = None
    adaptive: bool = False

    def options(self) -> dict:
        """Keyword arguments of the pipeline's call, besides `attention`."""
        return {"skip_last": self.skip_last, "prune": self.prune, "adaptive_skip": self.adaptive}

    def describe(self) -> str:
        from sparvar.sparsity import PRESETS

        parts = [f"{self.attention} attention" if self.attention != "dense" else PRESETS["dense"].description]
        if self.prune:
            parts.append(PRUNE_PRESETS[self.prune].description)
        if self.skip_last:
            parts.append("the last scale skipped" if self.skip_last == 1 else f"the last {self.skip_last} scales skipped")
        if self.adaptive:
            parts.append("adaptive skip (demo thresholds)")
        return "; ".join(parts)


def combination(name: str) -> Combination:
    """Read "default+fastvar+skip2": an attention preset first (dense when left out), then in any
    order `skipN`, a token-pruning name ("fastvar") and `adaptive`."""
    from sparvar.sparsity import PRESETS

    parts = [p.strip() for p in name.split("+")]
    attention = parts.pop(0) if parts and parts[0] in PRESETS else "dense"
    skip, prune, adaptive = None, None, False
    for part in parts:
        if part.startswith("skip") and part[4:].isdigit() and skip is None:
            skip = int(part[4:])
        elif part in PRUNE_PRESETS and prune is None:
            prune = part
        elif part == "adaptive" and not adaptive:
            adaptive = True
        else:
            raise SparvarError(
                f"cannot read {part!r} in {name!r}: write an attention preset ({', '.join(PRESETS)}) followed by "
                f"any of skipN, {', '.join(PRUNE_PRESETS)}, adaptive, each once, joined by '+'"
            )
    return Combination(attention, skip or 0, prune, adaptive)


def transformer_flops(cfg, schedule: Schedule, num_scales: int, prune: PrunePlan | None = None,
                      density: dict | None = None) -> float:
    """FLOPs of the transformer blocks for one row of the batch over the first `num_scales` scales.

    Matrix products count 2 FLOPs per multiply-add (self-attention projections, the image side of
    cross-attention, FFN); self-attention counts q.k and p.v over the visible keys, times
    `density[(layer, scale)]` (share of dense attention computed; 1 where absent). Pruned layers
    count their kept tokens. The head, the embeddings and the attention to text are left out.
    """
    c, f = cfg.width, cfg.ffn_hidden
    per_token = 2 * (4 * c * c + (2 * c * c if getattr(cfg, "text_conditioned", False) else 0) + 2 * c * f)
    total = 0.0
    for k in range(num_scales):
        for layer in range(cfg.depth):
            n = schedule.lengths[k]
            if prune is not None and k in prune.kept and prune.first <= layer < prune.last:
                n = prune.kept[k]
            attention = 4.0 * n * schedule.kv_length(k) * c * (density or {}).get((layer, k), 1.0)
            total += n * per_token + attention
    return total


def attention_densities(policy) -> dict:
    """(layer, scale) -> share of dense attention FLOPs the policy's last generation computed."""
    if not hasattr(policy, "stats"):
        return {}
    return {(e["layer"], e["scale"]): e["flops"] / e["flops_dense"] for e in policy.stats()["entries"]}
