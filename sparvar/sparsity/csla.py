"""CSLA, cross-scale local attention: each query sees a small window around its own place in
every earlier scale, plus all tokens of the sink scales.

A query at cell (y, x) of scale k is projected onto each key scale i (layout.project) and sees
the `side` x `side` square of cells around that projection, clipped at the grid's border.
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


def csla_token_mask(schedule: Schedule, scale: int, windows, device="cpu") -> torch.Tensor:
    """(n_scale, kv_length(scale)) bool token mask of CSLA at query scale `scale`."""
    _check(schedule, scale, windows)
    return torch.cat([layout.window_mask(schedule, scale, i, windows[i], device) for i in range(scale + 1)], dim=1)


@lru_cache(maxsize=256)
def _token_density(schedule: Schedule, scale: int, windows: tuple) -> float:
    kept = 0
    for i in range(scale + 1):
        side = windows[i]
        if side is None:
            kept += schedule.lengths[scale] * schedule.lengths[i]
        elif side > 0:
            h, w = schedule.sizes[i]
            py, px = layout.project(schedule, scale, i, *layout.cells(schedule, scale))
            kept += int((layout.axis_window(py, h, side).sum(1) * layout.axis_window(px, w, side).sum(1)).sum())
    return kept / (schedule.lengths[scale] * schedule.kv_length(scale))


def csla_token_density(schedule: Schedule, scale: int, windows) -> float:
    """Fraction of (query, key) pairs the CSLA token mask keeps, counted per axis (no mask built)."""
    _check(schedule, scale, windows)
    return _token_density(schedule, scale, tuple(windows))


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
def _cached_table(schedule, scale, windows, q_block, key_block, device) -> BlockTable:
    return token_mask_to_table(csla_token_mask(schedule, scale, windows, device), q_block, key_block)


def csla_block_table(
    schedule: Schedule, scale: int, windows, q_block: int = 128, key_block: int = 128, device="cpu"
) -> BlockTable:
    """CSLA block table for query scale `scale`; same for all heads (leading dims 1, 1). Cached."""
    return _cached_table(schedule, scale, tuple(windows), q_block, key_block, str(torch.device(device)))
