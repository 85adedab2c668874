"""Where the tokens of a schedule live: sequence offsets, (y, x) grid cells, and blocks.

The sequence is a source slot where there is one (an edit's source picture, its grid row-major),
then scale 0, scale 1, ..., each scale row-major. Sparse plans speak of three things this module
defines once: a token's cell (y, x) on its own scale's grid, the projection of a cell onto another
grid (the cell at the same relative place: another scale's, or the source's), and the partition
of a run of tokens into blocks of consecutive indices (the unit a block-sparse kernel skips).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from sparvar.schedules import Schedule


def scale_of_tokens(schedule: Schedule, scale: int, device="cpu") -> torch.Tensor:
    """Scale index of every token of scales 0..scale (int64)."""
    lengths = torch.tensor(schedule.lengths[: scale + 1], device=device)
    return torch.repeat_interleave(torch.arange(scale + 1, device=device), lengths)


def cells(schedule: Schedule, scale: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x) grid cell of every token of `scale`, row-major, as int64 tensors of length n."""
    h, w = schedule.sizes[scale]
    y = torch.arange(h, device=device).repeat_interleave(w)
    x = torch.arange(w, device=device).repeat(h)
    return y, x


def project(
    schedule: Schedule, src: int, dst: int, y: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells of scale `src` projected onto scale `dst`: (round(y*h_dst/h_src), round(x*w_dst/w_src))."""
    return project_onto(schedule.sizes[src], schedule.sizes[dst], y, x)


def project_onto(src: tuple[int, int], dst: tuple[int, int], y: torch.Tensor, x: torch.Tensor):
    """Cells of a grid `src` (h, w) projected onto a grid `dst`, at the same relative place.

    Rounding is half-to-even (torch.round), computed exactly in float64; results are clamped onto
    the destination grid, which matters when a coarse grid has fewer than two cells per side.
    """
    (hs, ws), (hd, wd) = src, dst
    py = torch.round(y.double() * hd / hs).long().clamp_(0, hd - 1)
    px = torch.round(x.double() * wd / ws).long().clamp_(0, wd - 1)
    return py, px


def axis_window(centre: torch.Tensor, size: int, side: int) -> torch.Tensor:
    """(n, size) bool: cells 0..size-1 of one axis inside the window of `side` around each centre.

    Odd sides are centred; even ones lean down/right. Windows are clipped at the border.
    """
    lo, hi = (side - 1) // 2, side // 2
    d = torch.arange(size, device=centre.device)[None, :] - centre[:, None]
    return (d >= -lo) & (d <= hi)


def grid_window_mask(schedule: Schedule, q_scale: int, grid: tuple[int, int], side: int | None,
                     device="cpu") -> torch.Tensor:
    """(n_q, h*w) bool: cells of a key grid (h, w) in the `side` x `side` window around each query's
    projection onto it; side None = every cell, 0 = none."""
    n_q, (h, w) = schedule.lengths[q_scale], grid
    if side is None or side <= 0:
        return torch.full((n_q, h * w), side is None, dtype=torch.bool, device=device)
    py, px = project_onto(schedule.sizes[q_scale], grid, *cells(schedule, q_scale, device))
    return (axis_window(py, h, side)[:, :, None] & axis_window(px, w, side)[:, None, :]).view(n_q, h * w)


def window_mask(schedule: Schedule, q_scale: int, key_scale: int, side: int | None, device="cpu") -> torch.Tensor:
    """(n_q, n_key) bool: tokens of `key_scale` in the `side` x `side` window around each query's
    projection; side None = every token, 0 = none. A text prefix in scale 0's slot (HART's) has no
    grid: any window but 0 keeps all of it."""
    if key_scale == 0 and schedule.prefix is not None:
        return torch.full((schedule.lengths[q_scale], schedule.prefix), side != 0, dtype=torch.bool, device=device)
    return grid_window_mask(schedule, q_scale, schedule.sizes[key_scale], side, device)


def source_window_mask(schedule: Schedule, q_scale: int, side: int | None, device="cpu") -> torch.Tensor:
    """(n_q, n_source) bool: tokens of the source slot (Schedule.source) in the window around each
    query's projection onto the source grid; side None = every token, 0 = none."""
    return grid_window_mask(schedule, q_scale, schedule.source, side, device)


def num_blocks(length: int, block: int) -> int:
    return -(-length // block)


def block_ids(length: int, block: int, device="cpu") -> torch.Tensor:
    """Block index of each of `length` consecutive tokens (the last block may be short)."""
    return torch.arange(length, device=device) // block


def block_sizes(length: int, block: int, device="cpu") -> torch.Tensor:
    """Number of tokens in each block (int64, length num_blocks)."""
    starts = torch.arange(0, length, block, device=device)
    return (length - starts).clamp(max=block)


@lru_cache(maxsize=None)
def default_sink_scales(schedule: Schedule, budget: int = 128) -> int:
    """How many first scales are sinks by default: the longest prefix of at most `budget` image tokens.

    The paper keeps scales 0-4 of Infinity 1024 (121 tokens); with a 128-token budget the image
    sinks fill at most one 128-key block, whatever the schedule. At least scale 0 is a sink, and
    with it a text prefix in its slot (HART's), which stays whole like the sink scales.
    """
    count, total = 0, 0
    for n in (h * w for h, w in schedule.sizes):
        if total + n > budget:
            break
        total += n
        count += 1
    return max(count, 1)
