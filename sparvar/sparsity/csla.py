"""CSLA, cross-scale local attention: each query sees a small window around its own place in
every earlier scale, plus all tokens of the sink scales.

A query at cell (y, x) of scale k is projected onto each key scale i (layout.project) and sees
the `side` x `side` square of cells around that projection, clipped at the grid's border. Before
the scales, an edit's source slot (Schedule.source) is seen through a window of `source_window`
cells around the query's projection onto the source grid (None: all of it).
The token mask becomes a block table: a key block is kept for a query block when any pair
inside is kept. It depends only on (schedule, scale, windows, block sizes), so it is built once
on the device, cached, and shared by all heads and samples.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from sparvar import layout
from sparvar.attention.tables import BlockTable
from sparvar.errors import SparvarError
from sparvar.schedules import Schedule

# Window side per key scale for Infinity 1024x1024 (13 scales), from the paper's code:
# None = every token of that scale (the sinks, scales 0-4), 0 = no token, s = s x s cells.
PAPER_CSLA_WINDOWS: tuple[int | None, ...] = (None, None, None, None, None, 0, 0, 0, 1, 1, 3, 5, 7)


def _check(schedule: Schedule, scale: int, windows) -> None:
    if len(windows) < scale + 1:
        raise SparvarError(f"CSLA needs a window for each key scale 0..{scale}, got {len(windows)}")


def csla_token_mask(schedule: Schedule, scale: int, windows, device="cpu", source_window: int | None = 0) -> torch.Tensor:
    """(n_scale, kv_length(scale)) bool token mask of CSLA at query scale `scale`."""
    _check(schedule, scale, windows)
    parts = [layout.window_mask(schedule, scale, i, windows[i], device) for i in range(scale + 1)]
    if schedule.source is not None:
        parts.insert(0, layout.source_window_mask(schedule, scale, source_window, device))
    return torch.cat(parts, dim=1)


def _kept_pairs(schedule: Schedule, scale: int, grid: tuple[int, int], side: int | None) -> int:
    """Pairs of scale `scale`'s queries with the cells of `grid` in their windows, counted per axis."""
    if side is None:
        return schedule.lengths[scale] * grid[0] * grid[1]
    if side <= 0:
        return 0
    py, px = layout.project_onto(schedule.sizes[scale], grid, *layout.cells(schedule, scale))
    return int((layout.axis_window(py, grid[0], side).sum(1) * layout.axis_window(px, grid[1], side).sum(1)).sum())


def _kept_pairs_of_scale(schedule: Schedule, scale: int, key_scale: int, side: int | None) -> int:
    """_kept_pairs over key scale `key_scale`; a text prefix in scale 0's slot is kept whole by any
    window but 0, as layout.window_mask keeps it."""
    if key_scale == 0 and schedule.prefix is not None:
        return schedule.lengths[scale] * schedule.prefix if side != 0 else 0
    return _kept_pairs(schedule, scale, schedule.sizes[key_scale], side)


@lru_cache(maxsize=256)
def _token_density(schedule: Schedule, scale: int, windows: tuple, source_window: int | None) -> float:
    kept = sum(_kept_pairs_of_scale(schedule, scale, i, windows[i]) for i in range(scale + 1))
    if schedule.source is not None:
        kept += _kept_pairs(schedule, scale, schedule.source, source_window)
    return kept / (schedule.lengths[scale] * schedule.kv_length(scale))


def csla_token_density(schedule: Schedule, scale: int, windows, source_window: int | None = 0) -> float:
    """Fraction of (query, key) pairs the CSLA token mask keeps, counted per axis (no mask built)."""
    _check(schedule, scale, windows)
    return _token_density(schedule, scale, tuple(windows), source_window)


def token_mask_to_table(mask: torch.Tensor, q_block: int, key_block: int) -> BlockTable:
    """Block table (1, 1, ...) keeping every block that holds at least one True of `mask`."""
    q_len, kv_len = mask.shape
    nq, nk = layout.num_blocks(q_len, q_block), layout.num_blocks(kv_len, key_block)
    padded = torch.nn.functional.pad(mask, (0, nk * key_block - kv_len, 0, nq * q_block - q_len))
    blocks = padded.view(nq, q_block, nk, key_block).any(dim=3).any(dim=1)
    counts = blocks.sum(dim=1).to(torch.int32)
    # kept block ids first, ascending; the rest of each row is padding past the count
    order = torch.argsort((~blocks).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return BlockTable(counts[None, None], order[None, None].contiguous(), q_block, key_block, q_len, kv_len)


@lru_cache(maxsize=256)
def _cached_table(schedule, scale, windows, q_block, key_block, device, source_window) -> BlockTable:
    mask = csla_token_mask(schedule, scale, windows, device, source_window)
    return token_mask_to_table(mask, q_block, key_block)


def csla_block_table(
    schedule: Schedule, scale: int, windows, q_block: int = 128, key_block: int = 128, device="cpu",
    source_window: int | None = 0,
) -> BlockTable:
    """CSLA block table for query scale `scale`; same for all heads (leading dims 1, 1). Cached."""
    return _cached_table(schedule, scale, tuple(windows), q_block, key_block, str(torch.device(device)), source_window)
