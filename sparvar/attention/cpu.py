"""Sparse attention on the CPU: torch's flash SDPA over contiguous key slices or copied key rows.

Torch's CPU flash kernel is fast when it runs unmasked, or masked with at least 192 queries per
call (below 192 it works on 32-query tiles, and a mask then costs several times the unmasked
run); torch.gather of single elements is slow. Hence two paths, both exact for the table (rows
with an empty list give zeros), chosen by the table's form:
- block tables (key_block > 1, CSLA): for each query block, the runs of consecutive listed key
  blocks are sliced out of k and v and concatenated, and one unmasked SDPA runs over every
  (batch, head) that shares the table row. The table is read on the host.
- key lists (key_block == 1, CS4A): for each (batch, head), the listed rows of k and v are
  copied by index_select into one buffer, reused across (batch, head) so it stays in cache, and
  one SDPA over all query groups runs with the list lengths as a mask.
benchmarks/demo_cpu_attention.md has the measurements behind these choices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparvar.attention.tables import BlockTable


def key_runs(blocks: list[int], key_block: int, kv_len: int) -> list[tuple[int, int]]:
    """Token ranges [start, end) covering the listed key blocks, consecutive blocks merged."""
    runs: list[list[int]] = []
    for i in sorted(blocks):
        start, end = i * key_block, min((i + 1) * key_block, kv_len)
        if runs and runs[-1][1] == start:
            runs[-1][1] = end
        else:
            runs.append([start, end])
    return [(s, e) for s, e in runs]


def _slices(x: torch.Tensor, runs) -> torch.Tensor:
    parts = [x[:, :, s:e] for s, e in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _block_attention(q, k, v, table: BlockTable, scale: float) -> torch.Tensor:
    b, h, lq, _ = q.shape
    out = q.new_zeros(b, h, lq, v.shape[-1])
    tb, th = table.counts.shape[:2]
    counts, indices = table.counts.tolist(), table.indices.tolist()
    for bi in range(tb):
        bs = slice(None) if tb == 1 else slice(bi, bi + 1)  # a size-1 table dim serves every sample
        for hi in range(th):
            hs = slice(None) if th == 1 else slice(hi, hi + 1)
            kk, vv = k[bs, hs], v[bs, hs]
            for r, count in enumerate(counts[bi][hi]):
                if count == 0:
                    continue
                runs = key_runs(indices[bi][hi][r][:count], table.key_block, table.kv_len)
                rows = slice(r * table.q_block, (r + 1) * table.q_block)
                out[bs, hs, rows] = F.scaled_dot_product_attention(
                    q[bs, hs, rows], _slices(kk, runs), _slices(vv, runs), scale=scale
                )
    return out


def _list_attention(q, k, v, table: BlockTable, scale: float) -> torch.Tensor:
    b, h, lq, d = q.shape
    g, m, qb, dv = table.num_q_blocks, table.indices.shape[-1], table.q_block, v.shape[-1]
    tb, th = table.counts.shape[:2]
    queries = F.pad(q, (0, 0, 0, g * qb - lq))  # the last group may be short
    out = q.new_empty(b, h, g * qb, dv)
    keys, values = k.new_empty(1, g, m, d), v.new_empty(1, g, m, dv)
    for bi in range(b):
        for hi in range(h):
            counts, rows = table.counts[bi % tb, hi % th], table.indices[bi % tb, hi % th].reshape(-1).long()
            torch.index_select(k[bi, hi], 0, rows, out=keys.view(g * m, d))
            torch.index_select(v[bi, hi], 0, rows, out=values.view(g * m, dv))
            mask = (torch.arange(m, device=q.device) < counts[:, None])[None, :, None, :]
            o = F.scaled_dot_product_attention(queries[bi, hi].reshape(1, g, qb, d), keys, values, attn_mask=mask, scale=scale)
            # torch >= 2.5 gives zeros on rows with no key; older versions give NaN
            out[bi, hi] = torch.where(counts[:, None, None] > 0, o[0], 0.0).reshape(g * qb, dv)
    return out[:, :, :lq]


def cpu_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: BlockTable, scale: float) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D) attending to the keys `table` lists."""
    if table.key_block == 1:
        return _list_attention(q, k, v, table, scale)
    return _block_attention(q, k, v, table, scale)
