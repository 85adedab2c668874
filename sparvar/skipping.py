"""Adaptive scale skipping: per sample, stop before the last scales when the estimate holds
little detail for them to refine.

After each of the last scales but one or two, an item whose summed latent holds little
high-frequency energy stops, keeping the codes summed so far; the batch runs while any item
still refines. It composes with any attention policy, as do `skip_last` (the pipeline: stop N
scales early for every item) and token pruning (pruning.py); the preset grammar that combines
them ("default+fastvar+skip2") lives beside the attention presets (sparsity/presets.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparvar.errors import SparvarError
from sparvar.schedules import Schedule

# Thresholds calibrated on the emoji demo model (`sparvar calibrate-skip`, benchmarks/adaptive_skip.md):
# skip the last r scales when the detail energy after scale K-1-r is below DEMO_THRESHOLDS[r - 1].
DEMO_THRESHOLDS = (0.09035, 0.06821)


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
