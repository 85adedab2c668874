"""Scale schedules: the (h, w) token grid of every scale a next-scale model generates.

A schedule also carries the position grid that Infinity's 2D RoPE uses: positions of a scale are
its row/column indices stretched onto the grid of the largest (1M-pixel) scale of that aspect
ratio, so the 512x512 schedule (first 10 scales) shares the positions of the 1024x1024 one.

Scale 0's slot of the sequence holds what the first scale is predicted from: one start token in
Infinity and VAR (its own 1x1 grid), HART's whole text prefix (`prefix` tokens), whose last
position predicts the 1x1 token. An edit (VAREdit) holds its source image's tokens in a slot
before scale 0 (`source`, a grid): every scale attends to them, none samples them. `lengths`
count the tokens of each scale, `offsets` and `total` place them in the sequence (the KV cache's
layout, the source first); `sizes` are the token grids that get sampled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from sparvar.errors import SparvarError


@dataclass(frozen=True)
class Schedule:
    """Token grids (h, w) per scale, coarse to fine, plus the RoPE position grid."""

    sizes: tuple[tuple[int, int], ...]
    pos_grid: tuple[int, int] | None = None  # defaults to the last scale
    prefix: int | None = None  # tokens in scale 0's slot when they are not its grid's (HART's text)
    source: tuple[int, int] | None = None  # grid of a source image's tokens before scale 0 (VAREdit)

    def __post_init__(self):
        if not self.sizes:
            raise SparvarError("a schedule needs at least one scale")
        for h, w in self.sizes:
            if h < 1 or w < 1:
                raise SparvarError(f"scale sizes must be positive, got {h}x{w}")
        object.__setattr__(self, "sizes", tuple((int(h), int(w)) for h, w in self.sizes))
        if self.pos_grid is None:
            object.__setattr__(self, "pos_grid", self.sizes[-1])
        if self.prefix is not None and self.prefix < 1:
            raise SparvarError(f"a schedule's prefix needs at least one token, got {self.prefix}")
        if self.source is not None:
            object.__setattr__(self, "source", (int(self.source[0]), int(self.source[1])))
            if min(self.source) < 1:
                raise SparvarError(f"a source grid needs positive sides, got {self.source}")

    def __len__(self) -> int:
        return len(self.sizes)

    @cached_property
    def lengths(self) -> tuple[int, ...]:
        """Sequence tokens per scale: n_k = h_k * w_k, except scale 0's `prefix` where there is one."""
        grid = tuple(h * w for h, w in self.sizes)
        return grid if self.prefix is None else (self.prefix, *grid[1:])

    @property
    def source_length(self) -> int:
        """Tokens of the source slot before scale 0 (0 without one)."""
        return 0 if self.source is None else self.source[0] * self.source[1]

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Index of each scale's first token in the whole sequence (after the source, if any)."""
        out, total = [], self.source_length
        for n in self.lengths:
            out.append(total)
            total += n
        return tuple(out)

    @property
    def total(self) -> int:
        return self.source_length + sum(self.lengths)

    def kv_length(self, scale: int) -> int:
        """Keys visible to queries of `scale`: the source's and every token of scales 0..scale."""
        return self.offsets[scale] + self.lengths[scale]

    def truncated(self, num_scales: int) -> "Schedule":
        """The first `num_scales` scales, keeping the position grid and the source."""
        if not 1 <= num_scales <= len(self):
            raise SparvarError(f"cannot keep {num_scales} of {len(self)} scales")
        return replace(self, sizes=self.sizes[:num_scales])

    @property
    def target(self) -> "Schedule":
        """The scales alone, without a source slot."""
        return replace(self, source=None)

    def pooled(self, scale: int) -> "Schedule":
        """The keys' layout where the source is seen area-pooled to `scale`'s grid (VAREdit's
        first layer): a source slot of that grid before the scales."""
        return replace(self, source=self.sizes[scale])

    def positions(self, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, col) of every token of `scale` on the position grid, row-major, as float32.

        Rounding is half-to-even, as torch.round does in Infinity's own recipe.
        """
        h, w = self.sizes[scale]
        gh, gw = self.pos_grid
        rows = (torch.arange(h) * (gh / h)).round()
        cols = (torch.arange(w) * (gw / w)).round()
        return rows[:, None].expand(h, w).reshape(-1), cols[None, :].expand(h, w).reshape(-1)

    def describe(self) -> str:
        grids = " ".join(f"{h}x{w}" if h != w else str(h) for h, w in self.sizes)
        if self.source is not None:
            grids += f" after a {self.source[0]}x{self.source[1]} source"
        return grids if self.prefix is None else f"{grids} after {self.prefix} text tokens"


# Infinity's 1024x1024-budget tables, keyed by h/w >= 1; the inverse ratio swaps h and w.
_INFINITY_TABLES: dict[str, list[tuple[int, int]]] = {
    "1.000": [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)],
    "1.250": [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)],
    "1.333": [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)],
    "1.500": [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)],
    "1.750": [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)],
    "2.000": [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)],
    "2.500": [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)],
    "3.000": [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)],
}
# Aspect ratios as users write them, width:height; value is Infinity's h/w key and whether to swap.
INFINITY_ASPECTS: dict[str, tuple[str, bool]] = {
    "1:1": ("1.000", False),
    "4:5": ("1.250", False), "5:4": ("1.250", True),
    "3:4": ("1.333", False), "4:3": ("1.333", True),
    "2:3": ("1.500", False), "3:2": ("1.500", True),
    "4:7": ("1.750", False), "7:4": ("1.750", True),
    "1:2": ("2.000", False), "2:1": ("2.000", True),
    "2:5": ("2.500", False), "5:2": ("2.500", True),
    "1:3": ("3.000", False), "3:1": ("3.000", True),
}
# Pixel budget (side of the square) -> number of scales of the 1M table.
INFINITY_RESOLUTIONS: dict[int, int] = {256: 7, 512: 10, 768: 12, 1024: 13}


def infinity_schedule(aspect: str = "1:1", resolution: int = 1024) -> Schedule:
    """Infinity's schedule for an aspect ratio (width:height) and a pixel budget."""
    if aspect not in INFINITY_ASPECTS:
        raise SparvarError(f"unknown aspect ratio {aspect!r}; choose one of {', '.join(INFINITY_ASPECTS)}")
    if resolution not in INFINITY_RESOLUTIONS:
        raise SparvarError(
            f"unsupported resolution {resolution}; choose one of {', '.join(map(str, INFINITY_RESOLUTIONS))}"
        )
    key, swap = INFINITY_ASPECTS[aspect]
    table = [(w, h) if swap else (h, w) for h, w in _INFINITY_TABLES[key]]
    return Schedule(tuple(table[: INFINITY_RESOLUTIONS[resolution]]), pos_grid=table[-1])


VAR_256 = Schedule(tuple((s, s) for s in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)))
VAR_512 = Schedule(tuple((s, s) for s in (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)))


def parse_schedule(text: str) -> Schedule:
    """A custom schedule from text such as "1,2,4,8" or "1x1,2x3,4x6" (h x w per scale)."""
    sizes = []
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)(?:x(\d+))?", item)
        if not m:
            raise SparvarError(f"cannot read scale {item!r} in schedule {text!r}; write e.g. 1,2,4 or 1x1,2x3")
        h = int(m.group(1))
        sizes.append((h, int(m.group(2)) if m.group(2) else h))
    return Schedule(tuple(sizes))
