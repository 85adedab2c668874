"""CS4A, cross-scale self-similar sparse attention: pick keys once, at a decision scale, reuse
them at the finer scales.

At the decision scale S attention is dense; the column sums of its probabilities over each
group of `group` consecutive queries rank the keys of the scales, and each (sample, head, group)
keeps its top keys. The residual O_dense - O_sparse(kept keys) is cached. At a later scale k each
query group takes the keys of the decision group at the same relative place, plus a local window
on its own scale and the sinks; the residual, upsampled to scale k, is added to the output. An
edit's source slot (Schedule.source) is not ranked: each group sees the source tokens in the
windows around its queries' projections onto the source grid (`source_keys`), at every scale.

Key lists are built on the device without host syncs: candidates are concatenated, sorted and
de-duplicated into the gathered BlockTable form (key_block == 1, q_block == group).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from sparvar import layout
from sparvar.attention.tables import BlockTable
from sparvar.schedules import Schedule

KEY_MAPPINGS = ("decision", "remap")


def topk_budget(kv_len: int, fraction: float, multiple: int) -> int:
    """Keys kept per group: `fraction` of the keys, rounded to a multiple (112 in the paper).

    A budget smaller than one multiple falls back to multiples of 16, so short sequences are not
    forced to keep a large share.
    """
    want = fraction * kv_len
    if want >= kv_len:
        return kv_len
    step = multiple if want >= multiple else 16
    return int(min(kv_len, max(step, step * round(want / step))))


def _group_centres(schedule: Schedule, scale: int, group: int) -> torch.Tensor:
    """(G, 2) mean relative (y, x) of each group of consecutive tokens, in [0, 1]."""
    h, w = schedule.sizes[scale]
    y, x = layout.cells(schedule, scale)
    rel = torch.stack([(y.double() + 0.5) / h, (x.double() + 0.5) / w], dim=1)
    ids = layout.block_ids(schedule.lengths[scale], group)
    sums = torch.zeros(int(ids[-1]) + 1, 2, dtype=torch.float64).index_add_(0, ids, rel)
    return sums / layout.block_sizes(schedule.lengths[scale], group)[:, None]


@lru_cache(maxsize=64)
def group_map(schedule: Schedule, src: int, dst: int, group: int, device="cpu") -> torch.Tensor:
    """For each query group of scale `dst`, the group of scale `src` with the nearest centre."""
    dist = torch.cdist(_group_centres(schedule, dst, group), _group_centres(schedule, src, group))
    return dist.argmin(dim=1).to(device)


@lru_cache(maxsize=64)
def sink_keys(schedule: Schedule, sink_scales: int, device="cpu"):
    """Every token of the first `sink_scales` scales, as an (indices, valid) part of a key list."""
    idx = torch.arange(schedule.source_length, schedule.offsets[sink_scales], device=device)
    return idx, torch.ones_like(idx, dtype=torch.bool)


def _group_keys(mask: torch.Tensor, group: int, offset: int, device):
    """A (queries, keys) window mask -> the keys any query of each group sees, as (indices (G, W)
    int64 from `offset` on, valid (G, W) bool)."""
    n, keys = mask.shape
    mask = F.pad(mask, (0, 0, 0, -n % group)).view(-1, group, keys).any(dim=1)
    width = int(mask.sum(dim=1).max())
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.gather(mask, 1, order)
    return (order + offset).to(device), valid.to(device)


@lru_cache(maxsize=64)
def local_keys(schedule: Schedule, scale: int, group: int, side: int, device="cpu"):
    """Keys of scale `scale` inside the `side` x `side` window of any query of each group.

    Returns (indices (G, W) int64 into the whole sequence, valid (G, W) bool).
    """
    return _group_keys(layout.window_mask(schedule, scale, scale, side), group, schedule.offsets[scale], device)


@lru_cache(maxsize=64)
def source_keys(schedule: Schedule, scale: int, group: int, side: int | None, device="cpu"):
    """Tokens of the source slot inside the window (side None: all) around any query's projection
    of each group of scale `scale`, as local_keys gives them (width 0 without a source)."""
    if schedule.source is None:
        return torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.bool, device=device)
    return _group_keys(layout.source_window_mask(schedule, scale, side), group, 0, device)


@lru_cache(maxsize=64)
def key_remap(schedule: Schedule, src: int, dst: int, sink_scales: int, device="cpu") -> torch.Tensor:
    """The paper's key re-mapping: a key's index among the scales' keys (from scale 0's first
    token) at query scale `src` -> its sequence index at scale `dst`.

    A key of scale j > sinks moves to scale j + (dst - src), at cell
    (floor(y * h_j' / h_j), floor(x * w_j' / w_j)); sink keys stay where they are.
    """
    out = []
    for j in range(src + 1):
        y, x = layout.cells(schedule, j)
        target = j + dst - src
        if j < sink_scales:
            out.append(torch.arange(schedule.lengths[j]) + schedule.offsets[j])
            continue
        (h, w), (ht, wt) = schedule.sizes[j], schedule.sizes[target]
        ty = torch.div(y * ht, h, rounding_mode="floor").clamp(max=ht - 1)
        tx = torch.div(x * wt, w, rounding_mode="floor").clamp(max=wt - 1)
        out.append(schedule.offsets[target] + ty * wt + tx)
    return torch.cat(out).to(device)


def select_keys(colsum: torch.Tensor, budget: int, mass: float | None = None):
    """Top keys per (sample, head, group) from column sums (B, H, G, N).

    With `mass`, each row keeps the fewest keys whose column sums reach that fraction of the
    row's total (a per-head budget), at most `budget` and at least 16. Returns (indices
    (B, H, G, budget) int64, valid bool of the same shape).
    """
    if mass is None:  # unordered: compact() sorts the lists anyway, and topk's own sort is a radix sort
        idx = torch.topk(colsum, budget, dim=-1, sorted=False).indices
        return idx, torch.ones_like(idx, dtype=torch.bool)
    values, idx = torch.topk(colsum, budget, dim=-1)
    before = torch.cumsum(values, dim=-1) - values  # mass of the keys ranked above each key
    need = before < mass * colsum.sum(dim=-1, keepdim=True)
    need[..., :16] = True
    return idx, need


def compact(idx: torch.Tensor, valid: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate lists -> (counts int32, ascending unique indices int32, padded with 0). One sort;
    the kept keys then move to their places by a scatter (a second sort took as long as the first)."""
    v = torch.where(valid, idx, kv_len).sort(dim=-1).values
    keep = v < kv_len
    keep[..., 1:] &= v[..., 1:] != v[..., :-1]
    width = v.shape[-1]
    place = torch.where(keep, keep.cumsum(dim=-1) - 1, width)  # the dropped all go to a spare column
    out = torch.zeros((*v.shape[:-1], width + 1), dtype=torch.int32, device=v.device)
    out.scatter_(-1, place, v.to(torch.int32))
    return keep.sum(dim=-1, dtype=torch.int32), out[..., :width]


def key_table(parts, batch: int, heads: int, q_len: int, group: int, kv_len: int) -> BlockTable:
    """Gathered BlockTable (B, H, G, ...) from (indices, valid) parts broadcastable to (B, H, G, *)."""
    g = layout.num_blocks(q_len, group)
    idx = torch.cat([i.expand(batch, heads, g, i.shape[-1]) for i, _ in parts], dim=-1)
    valid = torch.cat([v.expand(batch, heads, g, v.shape[-1]) for _, v in parts], dim=-1)
    counts, indices = compact(idx, valid, kv_len)
    return BlockTable(counts, indices, group, 1, q_len, kv_len)
